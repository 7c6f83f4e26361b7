"""``gatelab demo`` entry for CommFormer: the comparison of ``gatelab comm compare``.

The quick tour runs the configuration behind docs/comm.md's table (Predator-Prey, ``--memory``,
causal temporal gates under a 0.22 budget) at the quick preset's sizes, one seed; the full mode
runs ``gatelab comm compare`` with its defaults on every environment.
"""

from __future__ import annotations

from pathlib import Path

from gatelab.comm.compare import VARIANTS, compare, compare_configs, results_markdown
from gatelab.comm.config import Env
from gatelab.report import DemoResult


def run_demo(runs_dir: Path, quick: bool, progress=None) -> DemoResult:
    """Run the comparison (quick or full) and summarise it for the demo report."""
    if quick:
        configs = compare_configs(True, envs=[Env.predator_prey], comm_budget=0.22, memory=True)
    else:
        configs = compare_configs(False)
    total = sum(len(c.seeds) for c in configs) * len(VARIANTS)
    done, metrics, figures, text = 0, {}, [], []
    for cfg in configs:
        summary = compare(
            cfg, runs_dir / "comm", lambda d, _t, o=done: progress and progress(o + d, total)
        )
        done += len(cfg.seeds) * len(VARIANTS)
        env = cfg.base.env.name
        for variant, row in summary["table"].items():
            metrics[f"{env}/{variant}/success_rate"] = row["success_rate"][0]
            metrics[f"{env}/{variant}/comm_rate"] = row["comm_rate"][0]
            metrics[f"{env}/{variant}/mean_return"] = row["mean_return"][0]
        figures += [Path(f) for f in summary["figures"]]
        text.append(results_markdown(summary))
    intro = (
        "CommFormer (learned graph, S = 0.4) against full, random-graph and no communication, "
        "with and without temporal gates; comm rate = active edges / A(A-1) per step."
        + (
            " Quick: the docs table's configuration (memory, gate budget 0.22), one seed."
            if quick
            else ""
        )
    )
    return DemoResult("comm", "CommFormer learned communication", metrics, figures,
                      "\n\n".join([intro, *text]))  # fmt: skip
