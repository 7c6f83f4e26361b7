"""How much can any exit gate gain over one max-probability threshold on a given backbone?

Usage: python experiments/exits_gate_ceiling.py [--backbone runs/exits/backbone.safetensors ...]
    [--out runs/exits_choice/ceiling.json]

On the warmed-up IMs that every method shares, it measures two upper-bound style quantities:

1. **Per-exit thresholds.** A rule "leave at the first exit l with max p_l >= t_l" with one
   threshold per exit is what a JEI-DNN gate on max p amounts to. ``--n-rules`` threshold vectors
   are drawn from per-exit validation quantiles (plus one-threshold rules, the baseline's among
   them). The ones on the
   *validation* Pareto front are read on test (a method). The ones on the *test* Pareto front are
   an in-sample ceiling: no per-exit threshold rule among them can do better on this test split.
   Both are compared with the one-threshold max-prob baseline (selected on validation, as in the
   sweep): area under the accuracy-FLOPs hull over 30-90% cost and the largest margin there.
2. **Hidden-feature correctness predictor.** Per exit, a logistic regression on the normalised
   CLS feature plus the four confidence features, fitted on the exits split, predicts whether
   the IM is right. Its test AUROC is compared with that of max p alone. A gate cannot order
   samples better than the best predictor of correctness it can learn.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from gatelab.cost import area_under_tradeoff, pareto_front
from gatelab.exits.backbones import prepare
from gatelab.exits.baselines import (
    baseline_policies,
    margins,
    select_on_validation,
    validation_point,
)
from gatelab.exits.data import fashion_mnist_root
from gatelab.exits.model import confidence_features
from gatelab.exits.train import TrainConfig, train
from gatelab.threads import torch_threads

COST_RANGE = (0.3, 0.9)


def per_exit_points(maxprob: torch.Tensor, correct: torch.Tensor, cost: torch.Tensor, rules):
    """(cost, accuracy) of "leave at the first l with max p_l >= t_l" for each row of ``rules``.

    Shape:
        maxprob ``(L-1, N)``, correct ``(L, N)``, cost ``(L,)``, rules ``(M, L-1)`` -> ``(M, 2)``.
    """
    out = []
    for chunk in rules.split(500):
        fire = maxprob[None] >= chunk[:, :, None]  # (m, L-1, N)
        last = torch.ones(len(chunk), 1, maxprob.shape[1], dtype=torch.bool)
        exit_index = torch.cat([fire, last], 1).int().argmax(1)  # first exit that fires (m, N)
        acc = correct[None].expand(len(chunk), -1, -1).gather(1, exit_index[:, None]).squeeze(1)
        out.append(torch.stack([cost[exit_index].mean(1), acc.mean(1)], 1))
    return torch.cat(out).numpy()


def _compare(ours: np.ndarray, baseline: np.ndarray) -> dict:
    m = margins({"ours": ours, "max-prob": baseline}, "ours", *COST_RANGE)
    return {
        "area": area_under_tradeoff(ours, cost_range=COST_RANGE),
        "min_margin_points": m["min_margin_points"],
        "max_margin_points": m["max_margin_points"],
        "at_cost": m["at_cost"],
    }


def _gate_inputs(feature: torch.Tensor, logits: torch.Tensor) -> np.ndarray:
    normed = F.layer_norm(feature, feature.shape[-1:])
    return torch.cat([normed, confidence_features(logits.softmax(-1))], -1).numpy()


def ceiling(backbone: Path, data: Path, n_rules: int, seed: int) -> dict:
    """Both measurements for one backbone (see the module docstring)."""
    prep = prepare(backbone, data, cache_dir=backbone.parent)
    cost, caches = prep.flops.fraction.double(), prep.caches
    train(prep.model, caches["exits"], caches["val"], cost.float(), TrainConfig(n_rounds=0))
    with torch.no_grad():
        logits = {
            s: prep.model.logits_from_features(c.feats, c.head_logits).double()
            for s, c in caches.items()
        }
    correct = {s: (logits[s].argmax(-1) == caches[s].labels).double() for s in logits}
    maxprob = {s: logits[s][:-1].softmax(-1).amax(-1) for s in logits}  # (L-1, N)

    policies = baseline_policies(logits["val"])["max-prob"]
    kept = select_on_validation(policies, logits["val"], caches["val"].labels, cost)
    baseline = np.array(
        [validation_point(logits["test"], caches["test"].labels, cost, p) for p in kept]
    )

    generator = torch.Generator().manual_seed(seed)
    n_exits = len(cost)
    quantiles = torch.rand(n_rules, n_exits - 1, generator=generator, dtype=torch.float64)
    rules = torch.stack(
        [torch.quantile(maxprob["val"][ell], quantiles[:, ell]) for ell in range(n_exits - 1)], 1
    )
    one_threshold = torch.quantile(maxprob["val"].flatten(), torch.linspace(0, 1, 200).double())
    baseline_thresholds = torch.tensor([p.threshold for p in kept], dtype=torch.float64)
    one_threshold = torch.cat([one_threshold, baseline_thresholds])  # the ceiling covers them
    rules = torch.cat([rules, one_threshold[:, None].expand(-1, n_exits - 1)])
    points = {s: per_exit_points(maxprob[s], correct[s], cost, rules) for s in ("val", "test")}
    on_val = points["test"][pareto_front(points["val"])]
    on_test = points["test"][pareto_front(points["test"])]

    auroc = []
    for ell in range(n_exits - 1):
        x = {
            s: _gate_inputs(caches[s].feats[ell], logits[s][ell].float()) for s in ("exits", "test")
        }
        predictor = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        predictor.fit(x["exits"], correct["exits"][ell].numpy())
        y = correct["test"][ell].numpy()
        auroc.append(
            {
                "exit": ell,
                "max_prob": roc_auc_score(y, maxprob["test"][ell].numpy()),
                "hidden_feature_predictor": roc_auc_score(
                    y, predictor.predict_proba(x["test"])[:, 1]
                ),
            }
        )
    return {
        "backbone": str(backbone),
        "test_accuracy_per_exit": correct["test"].mean(1).tolist(),
        "max_prob_area": area_under_tradeoff(baseline, cost_range=COST_RANGE),
        "per_exit_selected_on_val": _compare(on_val, baseline),
        "per_exit_in_sample_ceiling": _compare(on_test, baseline),
        "auroc": auroc,
    }


def main() -> None:
    """Parse the arguments, run, print and write the JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--backbone", type=Path, action="append", help="repeat for several (runs/exits/...)"
    )
    parser.add_argument("--data", type=Path, default=fashion_mnist_root())
    parser.add_argument("--n-rules", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/exits_choice/ceiling.json"))
    args = parser.parse_args()
    results = []
    for backbone in args.backbone or [Path("runs/exits/backbone.safetensors")]:
        with torch_threads(1):
            result = ceiling(backbone, args.data, args.n_rules, args.seed)
        results.append(result)
        print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
