"""``gatelab reproduce comm``: the runs behind docs/comm.md's results table, and the table.

The table is the 6-seed Predator-Prey comparison with one-step memory and causal temporal gates
at budget 0.22, i.e. ``gatelab comm compare --env predator_prey --seeds 6 --updates 200
--comm-budget 0.22 --memory``: 5 variants x 6 seeds = 30 runs of 200 updates. Runs already
finished under ``runs_dir`` are reused (compare skips an evaluated run and resumes a cut one).
"""

from __future__ import annotations

from pathlib import Path

from gatelab.comm.compare import VARIANTS, CompareConfig, compare, compare_configs
from gatelab.comm.compare import results_markdown as _results_markdown
from gatelab.comm.config import Env
from gatelab.runs import atomic_write_json

# 28 of the 30 runs took 65 min on the 2-core machine with --jobs 2 (25 min 25 s, then 39 min 35 s)
EXPECTED_TIME = "about 70 min on 2 cores with --jobs 2 (about 2 h with --jobs 1)"


def configs(jobs: int = 1) -> list[CompareConfig]:
    """The comparison behind the table (the command in the module docstring)."""
    return compare_configs(
        False, [Env.predator_prey], seeds=6, updates=200, jobs=jobs, comm_budget=0.22, memory=True
    )


def per_seed_markdown(summary: dict) -> str:
    """Success per seed, the gated variant at its comm rate (docs/comm.md's second table)."""
    seeds = summary["seeds"]
    lines = ["| variant | " + " | ".join(str(s) for s in seeds) + " |"]
    lines.append("|---|" + "---|" * len(seeds))
    for variant in VARIANTS:
        cells = []
        for run in summary["runs"][variant]:
            cell = f"{run['success_rate']:.3f}"
            if variant == "commformer_tg":
                cell += f" at {run['comm_rate']:.3f}"
            cells.append(cell)
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reproduce(runs_dir: Path, jobs: int = 1, progress=None) -> Path:
    """Train (or reuse) every run of the table, then write ``reproduce/comm/tables.md|json``."""
    runs_dir = Path(runs_dir)
    out = runs_dir / "reproduce" / "comm"
    tables, text = {}, []
    for cfg in configs(jobs):
        summary = compare(cfg, runs_dir / "comm", progress)
        env = cfg.base.env.name.value
        tables[env] = {"table": summary["table"], "targets": summary["targets"],
                       "runs": summary["runs"]}  # fmt: skip
        text += [
            _results_markdown(summary),
            "",
            "Success per seed:",
            "",
            per_seed_markdown(summary),
        ]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "tables.json", tables)
    path = out / "tables.md"
    path.write_text("\n".join(text) + "\n")
    return path
