"""Do JEI-DNN's gains come from its gates or from the IMs it adapts?

Usage: python experiments/exits_adapted_ims.py [--run-dir runs/exits]
       python experiments/exits_adapted_ims.py --run-dir runs/exits/efficientnet

``--run-dir`` is the output of ``gatelab exits sweep`` (ViT, default ``runs/exits``) or of
``gatelab exits efficientnet``.
The sweep compares JEI-DNN with threshold baselines on the warmed-up IMs that every method starts
from; JEI-DNN then adapts its own IMs in its IM phases. Here the max-prob threshold is also read on
each lambda's *adapted* IMs (all lambdas pooled; as everywhere, only the points on the validation
Pareto front count), so JEI-DNN's remaining margin over it is the gates' alone. Writes
``adapted_ims.json`` into the run directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from gatelab.cost import area_under_tradeoff, pareto_front
from gatelab.exits.backbones import Prepared, load_exits, prepare, prepare_efficientnet
from gatelab.exits.baselines import baseline_policies, margins, validation_point
from gatelab.exits.data import fashion_mnist_root
from gatelab.exits.inference import GatePolicy
from gatelab.exits.sweep import checkpoint_name
from gatelab.threads import torch_threads


def _prepared(run_dir: Path, effnet: bool, lam: float, data: Path) -> Prepared:
    """The run's model and the val/test features its checkpoints are read on."""
    if effnet:
        return prepare_efficientnet(run_dir, data, ("val", "test"))
    meta = json.loads((run_dir / checkpoint_name("jei-dnn", lam)).with_suffix(".json").read_text())
    return prepare(Path(meta["backbone"]), data, cache_dir=run_dir)


def main() -> None:
    """Parse the arguments, run, print and write the JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, default=Path("runs/exits"))
    parser.add_argument("--data", type=Path, default=fashion_mnist_root())
    args = parser.parse_args()
    with torch_threads(1):
        result = adapted_ims(args.run_dir, args.data)
    print(json.dumps(result, indent=2))
    (args.run_dir / "adapted_ims.json").write_text(json.dumps(result, indent=2))


def adapted_ims(run_dir: Path, data: Path) -> dict:
    """JEI-DNN against max-prob on its own adapted IMs for one run folder."""
    effnet = (run_dir / "metrics.json").exists()
    summary = json.loads((run_dir / ("metrics.json" if effnet else "curves.json")).read_text())
    lams, taus = summary["config"]["lams"], summary["config"]["gate_thresholds"]
    cost_range = tuple(summary["area_cost_range"])
    prep = _prepared(run_dir, effnet, lams[0], data)
    model, cost = prep.model, prep.flops.fraction
    caches = {k: prep.caches[k] for k in ("val", "test")}
    points = {m: {"val": [], "test": []} for m in ("jei-dnn", "max-prob on adapted IMs")}
    for lam in lams:
        load_exits(model, run_dir / checkpoint_name("jei-dnn", lam))
        with torch.no_grad():
            logits = {
                k: model.logits_from_features(c.feats, c.head_logits) for k, c in caches.items()
            }
        policies = baseline_policies(logits["val"])["max-prob"]
        policies += [GatePolicy(model.gates, tau) for tau in taus]
        for policy in policies:
            method = "jei-dnn" if isinstance(policy, GatePolicy) else "max-prob on adapted IMs"
            for split in ("val", "test"):
                point = validation_point(logits[split], caches[split].labels, cost, policy)
                points[method][split].append(point)
    fronts = {}
    for method, by_split in points.items():
        val, test = np.array(by_split["val"]), np.array(by_split["test"])
        fronts[method] = test[pareto_front(val)]
    warm = {
        m: np.array([[p["flops_fraction"], p["accuracy"]] for p in pts if p["selected_on_val"]])
        for m, pts in summary["curves"].items()
        if m in ("max-prob", "entropy", "patience")
    }
    result = {
        "run_dir": str(run_dir),
        "area": {m: area_under_tradeoff(v, cost_range=cost_range) for m, v in fronts.items()}
        | {
            f"{m} (warm IMs)": area_under_tradeoff(v, cost_range=cost_range)
            for m, v in warm.items()
        },
        "jei_vs_max_prob_on_adapted_ims": margins(fronts, "jei-dnn", *cost_range),
        "jei_vs_best_warm_baseline": margins(
            warm | {"jei-dnn": fronts["jei-dnn"]}, "jei-dnn", *cost_range
        ),
    }
    return result


if __name__ == "__main__":
    main()
