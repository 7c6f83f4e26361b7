"""Choose JEI-DNN's gate class-weight exponent (and gate features) on the validation split.

Usage: python experiments/exits_gate_choice.py [--backbone runs/exits/backbone.safetensors]
    [--balances 0.5,0.75] [--context] [--lams 0.005,0.01,...] [--taus 0.2,0.3,...]
    [--train lr_im=0.01 --train n_rounds=10] [--out runs/exits_choice/plain.json]

For every exponent b (gate positive weight (neg/pos)^b) it trains JEI-DNN over the lambda grid
from one IM warm-up, keeps the lambdas whose *validation* (cost, accuracy) point is on the
validation Pareto front, and compares that front with the threshold baselines (their thresholds
also selected on validation): area under the accuracy-FLOPs hull over 30-90% cost and the
min/max margin over the best baseline, on validation (used for the choice) and on test
(reported only). With several ``--taus`` every lambda's gates are also read at each hazard
threshold tau, and the comparison is made twice: tau = 0.5 only (the paper's rule) and all
taus. ``--train FIELD=VALUE`` changes a ``TrainConfig`` field of the JEI-DNN phases (the shared
IM warm-up keeps the defaults). No gatelab default changes here: the sweep's defaults are set
by hand from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from gatelab.cost import area_under_tradeoff, pareto_front
from gatelab.exits.backbones import prepare
from gatelab.exits.baselines import (
    baseline_policies,
    margins,
    select_on_validation,
    validation_point,
)
from gatelab.exits.data import fashion_mnist_root
from gatelab.exits.inference import GatePolicy
from gatelab.exits.sweep import SweepConfig
from gatelab.exits.train import TrainConfig, clone_exits, train
from gatelab.threads import torch_threads

COST_RANGE = (0.3, 0.9)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _compare(points: np.ndarray, baselines: dict[str, np.ndarray], keep: np.ndarray) -> dict:
    m = margins(baselines | {"jei": points[keep]}, "jei", *COST_RANGE)
    area = area_under_tradeoff(points[keep], cost_range=COST_RANGE)
    return {
        "area": area,
        "min_margin": m["min_margin_points"],
        "max_margin": m["max_margin_points"],
    }


def _override(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    if name not in fields or not value:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE with a TrainConfig field: {text}")
    return name, int(value) if fields[name] == "int" else float(value)


def main() -> None:
    """Parse the arguments, run, print and write the JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", type=Path, default=Path("runs/exits/backbone.safetensors"))
    parser.add_argument("--data", type=Path, default=fashion_mnist_root())
    parser.add_argument("--balances", type=_floats, default=[0.5, 0.75])
    parser.add_argument("--lams", type=_floats, default=list(SweepConfig().lams))
    parser.add_argument("--taus", type=_floats, default=[0.5], help="gate hazard thresholds")
    parser.add_argument("--train", type=_override, action="append", default=[])
    parser.add_argument("--context", action="store_true", help="gates also read the previous exit")
    parser.add_argument("--out", type=Path, default=Path("runs/exits_choice/choice.json"))
    args = parser.parse_args()
    with torch_threads(1):
        choose(args)


def choose(args: argparse.Namespace) -> None:
    """Train and compare every exponent (see the module docstring); write ``args.out``."""
    prep = prepare(args.backbone, args.data, cache_dir=args.backbone.parent)
    cost, caches = prep.flops.fraction, prep.caches
    base_cfg = TrainConfig()
    train(
        prep.model, caches["exits"], caches["val"], cost, dataclasses.replace(base_cfg, n_rounds=0)
    )
    warm = prep.model

    def logits(model, split):
        with torch.no_grad():
            return model.logits_from_features(caches[split].feats, caches[split].head_logits)

    def point(model, split, policy):
        return validation_point(logits(model, split), caches[split].labels, cost, policy)

    baselines = {"val": {}, "test": {}}
    for name, policies in baseline_policies(logits(warm, "val")).items():
        kept = select_on_validation(policies, logits(warm, "val"), caches["val"].labels, cost)
        for split in baselines:
            baselines[split][name] = np.array([point(warm, split, p) for p in kept])
    result = {"backbone": str(args.backbone), "context": args.context, "lams": args.lams}
    result["taus"] = args.taus
    result["train_overrides"] = dict(args.train)
    result["baseline_area"] = {
        split: {k: area_under_tradeoff(v, cost_range=COST_RANGE) for k, v in b.items()}
        for split, b in baselines.items()
    }
    result["exponents"] = {}
    for balance in args.balances:
        points = {"val": [], "test": []}
        for lam in args.lams:
            model = clone_exits(warm, args.context)
            cfg = dataclasses.replace(base_cfg, lam=lam, warmup_epochs=0, balance=balance)
            cfg = dataclasses.replace(cfg, **dict(args.train))
            train(model, caches["exits"], caches["val"], cost, cfg)
            for split in points:
                for tau in args.taus:
                    points[split].append(point(model, split, GatePolicy(model.gates, tau)))
        arrays = {split: np.array(p) for split, p in points.items()}
        taus = np.tile(args.taus, len(args.lams))
        subsets = {"tau=0.5": taus == 0.5, "all taus": np.ones(len(taus), bool)}
        entry = {k: v.tolist() for k, v in arrays.items()} | {"tau": taus.tolist()}
        for name, mask in subsets.items():
            if not mask.any() or (name == "all taus" and len(args.taus) == 1):
                continue
            sub = {s: a[mask] for s, a in arrays.items()}
            keep = pareto_front(sub["val"])
            entry[name] = {s: _compare(sub[s], baselines[s], keep) for s in sub}
            print(f"exponent {balance}, {name}: " + json.dumps(entry[name]))
        result["exponents"][str(balance)] = entry
    print("baseline areas: " + json.dumps(result["baseline_area"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
