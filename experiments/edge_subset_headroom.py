r"""How much any per-category subset could gain over the best single expert: oracle bounds on test.

MoE² picks one subset per category. Whatever estimator of subset quality it uses, it cannot beat
the subset that is best *on the test questions themselves*. This lab script trains the gate as
``gatelab edge sweep`` does, then per category scores every non-empty subset on the test split
(the gate's top-k mixture restricted to it, no budget) and prints, pooled over categories
(weighted by test questions):

- ``oracle single``: the best single expert of each category, chosen on test,
- ``oracle subset``: the best subset of each category, chosen on test (an upper bound for MoE²
  at an unlimited budget; equal to ``oracle single`` means mixing cannot help there),
- ``any expert right``: a question counts when at least one expert's top option is right
  (the bound for a per-query router that always picks a right expert).

Selection on test is optimistic by design: these are bounds, not results. Run:

    PYTHONPATH=src .venv/bin/python experiments/edge_subset_headroom.py \
        [--cache src/gatelab/edge/assets/answers_quick.jsonl] [--quick] [--out runs/edge/headroom]
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from gatelab.edge.eval import SweepConfig, build_pool, gate_outputs
from gatelab.edge.model import mixture, subset_mask
from gatelab.edge.quality import all_subsets
from gatelab.edge.train import TrainConfig, train_gate
from gatelab.threads import torch_threads


@torch_threads(1)
def main() -> None:
    """Oracle subset and single-expert accuracies on test; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("runs/edge/answers.jsonl"))
    parser.add_argument("--quick", action="store_true", help="the quick question set")
    parser.add_argument("--out", type=Path, default=Path("runs/edge/headroom"))
    args = parser.parse_args()
    cfg = SweepConfig(quick=args.quick)
    torch.manual_seed(cfg.seed)
    pool = build_pool(cfg, args.cache, args.out)
    gate, _ = train_gate(
        pool.data(pool.split == "train"), pool.data(pool.split == "val"), TrainConfig(seed=cfg.seed)
    )
    logits = torch.as_tensor(gate_outputs(gate, pool))
    t, n_experts = pool.table, len(pool.table.experts)
    subsets = all_subsets(n_experts)
    totals = {"oracle single": 0.0, "oracle subset": 0.0, "any expert right": 0.0}
    n_test = 0
    print("| category | test q | oracle single | oracle subset | best subset |")
    print("|---|---|---|---|---|")
    for c in sorted(set(pool.category)):
        rows = (pool.category == c) & (pool.split == "test")
        probs, avail = torch.as_tensor(t.probs[rows]), torch.as_tensor(t.available[rows])
        accuracy = []
        for subset in subsets:
            allowed = avail & subset_mask(subset, n_experts)
            mixed, _ = mixture(logits[rows], probs, allowed, cfg.top_k)
            accuracy.append(float((mixed.argmax(-1).numpy() == t.answer[rows]).mean()))
        single = max(a for a, s in zip(accuracy, subsets, strict=True) if len(s) == 1)
        best = int(np.argmax(accuracy))
        right = (t.probs[rows].argmax(-1) == t.answer[rows][:, None]) & t.available[rows]
        n = int(rows.sum())
        totals["oracle single"] += n * single
        totals["oracle subset"] += n * accuracy[best]
        totals["any expert right"] += float(right.any(1).sum())
        n_test += n
        names = ", ".join(t.experts[i] for i in sorted(subsets[best]))
        print(f"| {c} | {n} | {single:.3f} | {accuracy[best]:.3f} | {names} |")
    print({k: round(v / n_test, 3) for k, v in totals.items()}, f"over {n_test} test questions")


if __name__ == "__main__":
    main()
