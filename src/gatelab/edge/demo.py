"""``gatelab demo`` for MoE²: seed/build the answer cache if needed, then sweep budgets."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from gatelab.edge.collect import collect, read_cache, seed_from_shipped, start_local_pool
from gatelab.edge.eval import SweepConfig, questions_for
from gatelab.edge.experts import DEFAULT_POOL
from gatelab.edge.sweep import run_sweep
from gatelab.report import DemoResult


def run_demo(
    runs_dir: Path, quick: bool, progress: Callable[[int, int], None] | None = None
) -> DemoResult:
    """Seed the cache from the shipped answers, collect what is missing over HTTP, sweep budgets.

    The cache (``runs/edge/answers.jsonl``) is reused across runs and first seeded from the
    shipped quick-set answers (:func:`seed_from_shipped`); only answers still missing are asked
    (which serves the models locally), so the quick demo goes straight to the sweep.
    ``quick`` uses 12 questions per category and writes its sweep to ``runs/edge/quick/``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the models ship in packages; never download
    out = Path(runs_dir) / "edge"
    cache = out / "answers.jsonl"
    cfg = SweepConfig(quick=quick)
    questions = questions_for(cfg)
    seed_from_shipped(cache, questions)
    done = {key for key, record in read_cache(cache).items() if record["ok"]}
    todo = [q for q in questions if any((q.qid, n) not in done for n, _ in DEFAULT_POOL)]
    if todo:
        servers, experts = start_local_pool()
        try:
            collect(experts, todo, cache)
        finally:
            for server in servers:
                server.stop()
    summary = run_sweep(cfg, cache, out / "quick" if quick else out, progress=progress)
    metrics: dict[str, float | int | str] = {
        "n_questions": summary["n_questions"],
        "aiq_energy_moe2": summary["aiq"]["energy"]["moe2"],
        "aiq_energy_best_single": summary["aiq"]["energy"]["best_single"],
        "aiq_delay_moe2": summary["aiq"]["delay"]["moe2"],
        "aiq_delay_best_single": summary["aiq"]["delay"]["best_single"],
        "selector_evaluations": summary["selector_evaluations"],
        "feasible_subsets": summary["feasible_subsets"],
    }
    text = (
        "Accuracy of MoE² (exact subset selection + gate) and the baselines per energy budget "
        "(modelled Jetson AGX Orin / RTX 4090 / CPU costs):\n\n" + summary["table"]
    )
    figures = [Path(f) for f in summary["figures"]]
    return DemoResult("edge", "MoE² edge-LLM collaboration", metrics, figures, text)
