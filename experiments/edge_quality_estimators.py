r"""What each subset-quality estimator of ``gatelab.edge.quality`` does to MoE² on the test split.

The sweep chooses its estimator on non-test folds only; this lab script is the after-the-fact
look that the choice must not use. It runs ``run_sweep`` once per estimator, forced
(``SweepConfig(quality=...)``), on one answer cache and prints per estimator: the fold errors
(identical in the three runs, they do not depend on the forced choice), energy AIQ per method,
and MoE² minus each baseline averaged over the budgets where at least two experts fit, with its
paired bootstrap 95% interval. Last, MoE² under each estimator minus MoE² under ``holdout``,
paired over the same test questions and all budgets of the axis. Run:

    PYTHONPATH=src .venv/bin/python experiments/edge_quality_estimators.py \
        [--cache src/gatelab/edge/assets/answers_quick.jsonl] [--quick] [--out runs/edge/estimators]
"""

import argparse
import time
from pathlib import Path

import numpy as np

from gatelab.edge.bootstrap import Interval, paired_bootstrap_budgets
from gatelab.edge.eval import SweepConfig
from gatelab.edge.quality import ESTIMATORS
from gatelab.edge.sweep import run_sweep


def main() -> None:
    """Sweep once per estimator; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("runs/edge/answers.jsonl"))
    parser.add_argument("--quick", action="store_true", help="the quick question set")
    parser.add_argument("--out", type=Path, default=Path("runs/edge/estimators"))
    args = parser.parse_args()
    outcomes = {}
    for name in ESTIMATORS:
        out = args.out / name
        start = time.perf_counter()
        summary = run_sweep(SweepConfig(quick=args.quick, quality=name), args.cache, out)
        choice = summary["quality_estimator"]
        print(f"== {name} ({time.perf_counter() - start:.1f} s); fold errors {choice['errors']}")
        print("   AIQ energy", {m: round(v, 3) for m, v in summary["aiq"]["energy"].items()})
        for axis in ("energy", "delay"):
            diffs = summary["intervals"][axis]["difference"]
            text = {m: Interval(**d["average"]).describe() for m, d in diffs.items()}
            print(f"   MoE² minus, {axis} average:", text)
        outcomes[name] = np.load(out / "outcomes.npz")
    base = outcomes["holdout"]
    for name in ESTIMATORS[1:]:
        for axis in ("energy", "delay"):
            rows = base["axis"] == axis
            _, average = paired_bootstrap_budgets(
                outcomes[name]["moe2"][rows], base["moe2"][rows], np.random.default_rng(0)
            )
            print(f"MoE² {name} minus MoE² holdout, all {axis} budgets: {average.describe()}")


if __name__ == "__main__":
    main()
