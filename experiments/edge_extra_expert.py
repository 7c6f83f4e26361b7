r"""A seventh expert on trial: collect one more served variant in process, then sweep the pool.

``gatelab edge collect --in-process`` scores the demo pool (:data:`gatelab.edge.DEFAULT_POOL`).
This lab script scores one more variant (default ``gemma3-270m-fewshot`` on the RTX 4090
profile, the strongest expert measured on the quick set) on the full question set into its own
cache (resumable: :func:`gatelab.edge.collect.collect` appends and skips answered pairs), writes
the shipped full cache plus those answers to ``<out>/answers.jsonl`` and runs ``gatelab edge
sweep`` on it into ``<out>`` (the run rule and estimator chosen on non-test folds as usual).
Then ``experiments/edge_subset_headroom.py --cache <out>/answers.jsonl --out <out>`` gives the
oracle bounds of the larger pool. Run:

    PYTHONPATH=src .venv/bin/python experiments/edge_extra_expert.py \
        [--expert gemma3-270m-fewshot] [--profile rtx-4090] [--out runs/edge/extra]
"""

import argparse
import json
import time
from pathlib import Path

from gatelab.edge.collect import SHIPPED_FULL_CACHE, collect, start_in_process_pool
from gatelab.edge.eval import SweepConfig, questions_for
from gatelab.edge.sweep import run_sweep
from gatelab.threads import torch_threads


@torch_threads(1)
def main() -> None:
    """Collect, merge and sweep; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expert", default="gemma3-270m-fewshot")
    parser.add_argument("--profile", default="rtx-4090")
    parser.add_argument("--out", type=Path, default=Path("runs/edge/extra"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = SweepConfig(quick=False)
    questions = questions_for(cfg)
    own = args.out / f"{args.expert}.jsonl"
    start = time.perf_counter()
    counts = collect(start_in_process_pool(((args.expert, args.profile),)), questions, own)
    print(f"collected {counts} in {time.perf_counter() - start:.0f} s")
    merged = args.out / "answers.jsonl"
    merged.write_text(SHIPPED_FULL_CACHE.read_text() + own.read_text())
    summary = run_sweep(cfg, merged, args.out)
    print(json.dumps({k: summary[k] for k in ("aiq", "run_rule", "quality_estimator")}, indent=1))
    print(summary["table"])


if __name__ == "__main__":
    main()
