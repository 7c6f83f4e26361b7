"""The ``gatelab`` command: ``version``, ``demo`` and one sub-command group per system."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

import gatelab
from gatelab import _cli
from gatelab import demo as demo_lib
from gatelab.report import write_report

app = typer.Typer(
    name="gatelab",
    help="Learned gating under explicit budgets.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

# Each system mounts its own typer app as `gatelab <system> ...` once its package has a cli.py.
for _system in demo_lib.SYSTEMS[1:]:
    if importlib.util.find_spec(f"gatelab.{_system}") and importlib.util.find_spec(
        f"gatelab.{_system}.cli"
    ):
        app.add_typer(importlib.import_module(f"gatelab.{_system}.cli").app, name=_system)


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=_cli.stderr(), show_path=False)],
    )


@app.command()
def version() -> None:
    """Print gatelab's version and the torch build it runs on."""
    import torch

    cuda = torch.version.cuda or "none"
    typer.echo(f"gatelab {gatelab.__version__} (torch {torch.__version__}, cuda {cuda})")


@app.command()
def demo(
    quick: Annotated[bool, typer.Option(help="Small, fast versions of every experiment.")] = False,
    runs_dir: Annotated[Path, typer.Option(help="Where experiments write their folders.")] = Path(
        "runs"
    ),
    only: Annotated[
        list[str] | None, typer.Option(help="Run only these systems (repeatable).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Run every system demo, then write runs/demo/report.md and runs/demo/summary.json."""
    names = demo_lib.available_systems()
    if only:
        unknown = sorted(set(only) - set(demo_lib.SYSTEMS))
        if unknown:
            raise _cli.fail(
                f"--only: unknown system {unknown[0]!r}; choose from {', '.join(names)}"
            )
        names = [n for n in names if n in only]
    results = []
    with _cli.progress_bar("demo", total=len(names)) as update:
        for i, name in enumerate(names):
            results.append(demo_lib.run_system_demo(name, runs_dir, quick))
            update(i + 1, len(names))
    out = runs_dir / "demo"
    report = write_report(results, out, header=f"gatelab {gatelab.__version__}, quick={quick}")
    summary = {
        "quick": quick,
        "systems": {r.name: {"seconds": r.seconds, **r.metrics} for r in results},
        "report": str(report),
    }
    _cli.write_json(out / "summary.json", summary)
    if as_json:
        typer.echo(json.dumps(summary["systems"], indent=2))
        return
    table = Table(title=f"gatelab demo -> {report}")
    for column in ("system", "seconds", "headline metrics"):
        table.add_column(column)
    for r in results:
        headline = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in list(r.metrics.items())[:4]
        )
        table.add_row(r.title, f"{r.seconds:.1f}", headline)
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    """Entry point: usage errors become one line on stderr with exit code 2, never a traceback."""
    try:
        code = app(args=argv, standalone_mode=False)  # an Exit raised inside returns its code
    except typer.TyperException as error:  # click-level usage errors (bad flag, bad value)
        if error.format_message():  # empty for `gatelab` alone, which has printed the help
            _cli.stderr().print(
                f"gatelab: error: {error.format_message()}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        return getattr(error, "exit_code", 2)
    except typer.Exit as done:
        return done.exit_code
    except typer.Abort:
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
