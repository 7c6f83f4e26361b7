"""Do JEI-DNN's gains come from its gates or from the IMs it adapts?

Usage: python benchmarks/exits_adapted_ims.py --run-dir runs/exits_gpu100_tau
       python benchmarks/exits_adapted_ims.py --run-dir runs/exits/efficientnet

``--run-dir`` is the output of ``gatelab exits sweep`` (ViT) or ``gatelab exits efficientnet``.
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
from safetensors.torch import load_file

from gatelab.cost import area_under_tradeoff, pareto_front
from gatelab.exits.baselines import baseline_policies, margins, validation_point
from gatelab.exits.data import fashion_mnist_root, load_fashion_mnist, make_splits
from gatelab.exits.experiment import load_exits, prepare
from gatelab.exits.inference import GatePolicy
from gatelab.exits.sweep import checkpoint_name


def _effnet_caches(run_dir: Path, summary: dict, data: Path):
    """The EfficientNet run's model (saved head) and its val/test features."""
    from gatelab.exits.data import SplitConfig
    from gatelab.exits.efficientnet import efficientnet_early_exit
    from gatelab.exits.effnet_run import HEAD_FILE, extract_stage_features, first_n

    cfg = summary["effnet_config"]
    splits = make_splits(load_fashion_mnist(data), SplitConfig(**cfg["splits"]))
    model = efficientnet_early_exit(cfg["resolution"]).eval()
    model.head.fc.load_state_dict(load_file(run_dir / HEAD_FILE))
    caches = {}
    for name in ("val", "test"):
        part = first_n(splits[name], cfg[f"n_{name}"])
        feats, pooled = extract_stage_features(model, part, cfg["resolution"])
        with torch.no_grad():
            caches[name] = (feats, model.head.fc(pooled), part.labels)
    return model, caches, torch.tensor(summary["flops_per_exit_fraction"])


def _vit_caches(run_dir: Path, lam: float, data: Path):
    meta = json.loads((run_dir / checkpoint_name("jei-dnn", lam)).with_suffix(".json").read_text())
    prep = prepare(Path(meta["backbone"]), data, cache_dir=run_dir)
    caches = {k: (c.feats, c.head_logits, c.labels) for k, c in prep.caches.items()}
    return prep.model, caches, prep.flops.fraction


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=fashion_mnist_root())
    args = parser.parse_args()
    torch.set_num_threads(1)
    effnet = (args.run_dir / "metrics.json").exists()
    summary = json.loads((args.run_dir / ("metrics.json" if effnet else "curves.json")).read_text())
    lams, taus = summary["config"]["lams"], summary["config"]["gate_thresholds"]
    cost_range = tuple(summary["area_cost_range"])
    if effnet:
        model, caches, cost = _effnet_caches(args.run_dir, summary, args.data)
    else:
        model, caches, cost = _vit_caches(args.run_dir, lams[0], args.data)
    points = {m: {"val": [], "test": []} for m in ("jei-dnn", "max-prob on adapted IMs")}
    for lam in lams:
        load_exits(model, args.run_dir / checkpoint_name("jei-dnn", lam))
        with torch.no_grad():
            logits = {k: model.logits_from_features(f, h) for k, (f, h, _) in caches.items()}
        policies = baseline_policies(logits["val"])["max-prob"]
        policies += [GatePolicy(model.gates, tau) for tau in taus]
        for policy in policies:
            method = "jei-dnn" if isinstance(policy, GatePolicy) else "max-prob on adapted IMs"
            for split in ("val", "test"):
                point = validation_point(logits[split], caches[split][2], cost, policy)
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
        "run_dir": str(args.run_dir),
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
    print(json.dumps(result, indent=2))
    (args.run_dir / "adapted_ims.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
