"""The record a system demo hands to ``gatelab demo``, and the report built from all of them."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class DemoResult:
    """What one system's demo produced.

    Attributes:
        name: short system name (``gmoe``, ``moe``, ...), also its folder under ``runs/``.
        title: a human title for the report section.
        metrics: headline numbers, flat and JSON-ready.
        figures: PNG files the demo wrote (under ``runs/<name>/``).
        markdown: a paragraph or table for the report, already measured.
        seconds: wall-clock time of the demo.
    """

    name: str
    title: str
    metrics: dict[str, float | int | str] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    markdown: str = ""
    seconds: float = 0.0


def write_report(results: list[DemoResult], out_dir: Path, header: str = "") -> Path:
    """Write ``out_dir/report.md`` with every demo's section; figures are copied beside it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# gatelab demo report", "", header, ""]
    for result in results:
        folders = sorted({_run_folder(f, out_dir.parent) for f in result.figures}) or [
            f"runs/{result.name}/"
        ]
        lines += [
            f"## {result.title}",
            "",
            f"_{result.seconds:.1f} s; files in {', '.join(folders)}_",
            "",
        ]
        if result.markdown:
            lines += [result.markdown.strip(), ""]
        if result.metrics:
            lines += ["| metric | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in result.metrics.items()]
            lines.append("")
        names = [f.name for f in result.figures]
        for figure in result.figures:
            # figures of one system may share a file name across its run folders
            unique = names.count(figure.name) == 1
            prefix = result.name if unique else f"{result.name}__{figure.parent.name}"
            copy = out_dir / f"{prefix}__{figure.name}"
            if figure.resolve() != copy.resolve():
                shutil.copyfile(figure, copy)
            lines += [f"![{figure.stem}]({copy.name})", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _run_folder(figure: Path, runs_dir: Path) -> str:
    """The figure's folder as ``runs/<...>/`` when it lies under the runs folder."""
    try:
        return f"runs/{figure.parent.resolve().relative_to(runs_dir.resolve()).as_posix()}/"
    except ValueError:
        return f"{figure.parent}/"


def _fmt(value: float | int | str) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
