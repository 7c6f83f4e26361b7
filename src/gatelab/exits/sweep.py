r"""The accuracy/cost sweep: JEI-DNN over a lambda grid against the threshold baselines.

Every method uses the same warmed-up IMs (JEI-DNN then adapts its own in the IM phases). Each
JEI-DNN model (one per lambda) is read at several hazard thresholds tau (a sample leaves at the
first exit with :math:`g_l \ge \tau`; the paper uses 0.5), just as each baseline is read at
several confidence thresholds; only the points whose *validation* (cost, accuracy) lies on the
validation Pareto front count, for every method alike. Accuracy, FLOPs, ECE and conformal sets
come from the cached features of the test and calibration splits (identical to real early exit,
which a test checks); wall-clock comes from real early exit on ``n_timed`` test images at batch
``batch_size``, for the points selected on validation. Returns the curves, areas and margins
and writes four trade-off plots.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gatelab.cost import area_under_tradeoff, pareto_front, plot_tradeoff
from gatelab.exits.backbones import Prepared, save_exits
from gatelab.exits.baselines import (
    baseline_policies,
    margins,
    oracle_exits,
    select_on_validation,
    validation_point,
)
from gatelab.exits.eval import conformal_thresholds, gated_metrics, prediction_sets, set_metrics
from gatelab.exits.inference import GatePolicy, run_early_exit, simulate_exits, time_inference
from gatelab.exits.train import TrainConfig, clone_exits, train

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None] | None
# name -> (gates read the previous exit, gate class-weight exponent; None: TrainConfig's)
VARIANTS = {
    "jei-dnn": (False, None),
    "jei-dnn+ctx": (True, None),
    "jei-dnn-balanced": (False, 1.0),  # the paper's fully class-balanced gate BCE
}
LAMS = (
    0.0,
    0.002,
    0.005,
    0.01,
    0.02,
    0.035,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.6,
    0.8,
    1.5,
    3.0,
)
# hazard thresholds each lambda's gates are read at: 0.2 ... 0.9 raised the validation area over
# 30-90% cost from 0.9297 (0.5 only) to 0.9306 on the 92.77% ViT (docs/notes/exits.md,
# experiments/exits_gate_choice.py)
GATE_THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ORACLE_LAMS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0)  # 0-1 loss + lambda*cost: > 1 trades accuracy


def checkpoint_name(variant: str, lam: float) -> str:
    """File name of a sweep checkpoint, e.g. ``jei_lam0.2.safetensors``, ``jei_lam0.2_ctx...``."""
    suffix = {"jei-dnn": "", "jei-dnn+ctx": "_ctx", "jei-dnn-balanced": "_balanced"}[variant]
    return f"jei_lam{lam:g}{suffix}.safetensors"


@dataclass(frozen=True)
class SweepConfig:
    """What the sweep covers."""

    # JEI-DNN lambdas: dense below 0.1, where the exits move late
    lams: tuple[float, ...] = LAMS
    gate_thresholds: tuple[float, ...] = GATE_THRESHOLDS  # hazard thresholds tau per lambda
    alpha: float = 0.05  # conformal level reported per point
    n_timed: int = 2048  # test images timed per point (real early exit)
    batch_size: int = 256  # inference batch for timing
    repeats: int = 2  # timing repeats (median)
    max_baseline_points: int = 40  # baseline thresholds kept after validation selection
    cost_range: tuple[float, float] = (0.3, 0.9)  # FLOPs-fraction range of the targets
    variants: tuple[str, ...] = ("jei-dnn",)  # JEI-DNN gate variants (see VARIANTS)
    backbone_name: str = "Fashion-MNIST ViT"  # in the plots' titles
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if not self.gate_thresholds or not all(0 < t < 1 for t in self.gate_thresholds):
            raise ValueError(
                f"SweepConfig: gate_thresholds must be non-empty, each in (0, 1), "
                f"got {self.gate_thresholds}"
            )


def _logits(model, cache, device):
    with torch.no_grad():
        return model.logits_from_features(
            [f.to(device) for f in cache.feats], cache.head_logits.to(device)
        ).cpu()


def point_metrics(prep: Prepared, model, policy, alpha: float) -> dict:
    """Test metrics of one operating point from cached features (conformal on calibration)."""
    return point_metrics_from(model, prep.caches, prep.flops.fraction, policy, alpha)


def point_metrics_from(model, caches: dict, cost: torch.Tensor, policy, alpha: float) -> dict:
    """Like :func:`point_metrics`, from ``caches['test']``, ``caches['calib']`` and ``cost``."""
    device = next(model.parameters()).device
    test, calib = caches["test"], caches["calib"]
    out = simulate_exits(_logits(model, test, device), policy)
    metrics = gated_metrics(out.logits, out.exit_index, test.labels, cost, model.n_exits)
    cal = simulate_exits(_logits(model, calib, device), policy)
    scores = 1 - cal.logits.double().softmax(-1)[torch.arange(len(calib.labels)), calib.labels]
    q = conformal_thresholds(scores, cal.exit_index, model.n_exits, alpha)
    sets = prediction_sets(out.logits.double().softmax(-1), out.exit_index, q)
    coverage, size = set_metrics(sets, test.labels)
    return metrics | {"coverage": coverage, "mean_set_size": size}


def _time(prep: Prepared, model, policy, batches, repeats: int) -> float:
    return time_inference(lambda b: run_early_exit(model, b, policy), batches, repeats)


def run_sweep(
    prep: Prepared, out_dir: Path, cfg: SweepConfig = SweepConfig(), progress: Progress = None
) -> dict:
    """Run the sweep and write ``curves.json``-ready results (returned) and the plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(prep.model.parameters()).device
    labels_val = prep.caches["val"].labels
    cost = prep.flops.fraction
    images = prep.transform(prep.splits["test"].images[: cfg.n_timed])
    batches = [
        images[i : i + cfg.batch_size].to(device) for i in range(0, len(images), cfg.batch_size)
    ]
    # warm-up IMs once; baselines use them, JEI-DNN starts from them
    warm_cfg = dataclasses.replace(cfg.train, n_rounds=0)
    train(prep.model, prep.caches["exits"], prep.caches["val"], cost, warm_cfg)
    warm = prep.model
    t_full = time_inference(warm.backbone_forward, batches, cfg.repeats)
    warm_val_logits = _logits(warm, prep.caches["val"], device)  # the baselines' IMs are fixed
    candidates = baseline_policies(warm_val_logits)
    chosen = {}
    for name, policies in candidates.items():
        kept = select_on_validation(policies, warm_val_logits, labels_val, cost)
        step = max(1, int(np.ceil(len(kept) / cfg.max_baseline_points)))
        chosen[name] = kept[::step]
    total = len(cfg.variants) * len(cfg.lams) + sum(len(v) for v in chosen.values())
    done, curves = 0, {m: [] for m in (*cfg.variants, *chosen)}
    for variant in cfg.variants:
        context, balance = VARIANTS[variant]
        models = {}
        for lam in cfg.lams:
            model = clone_exits(warm, context)
            train_cfg = dataclasses.replace(cfg.train, lam=lam, warmup_epochs=0)
            if balance is not None:
                train_cfg = dataclasses.replace(train_cfg, balance=balance)
            train(model, prep.caches["exits"], prep.caches["val"], cost, train_cfg)
            meta = {"lam": lam, "backbone": str(prep.backbone_path)}
            meta |= {"train": dataclasses.asdict(train_cfg)}
            save_exits(model, out_dir / checkpoint_name(variant, lam), meta)
            models[lam] = model
            val_logits = _logits(model, prep.caches["val"], device)
            for tau in cfg.gate_thresholds:
                policy = GatePolicy(model.gates, tau)
                point = point_metrics(prep, model, policy, cfg.alpha)
                point |= _val_point(val_logits, labels_val, cost, policy)
                curves[variant].append({"lam": lam, "tau": tau} | point)
            done += 1
            if progress:
                progress(done, total)
        # wall-clock for the points selected on validation only (the others are never reported)
        kept = {id(p) for p in selected_points(curves[variant])}
        for p in curves[variant]:
            seconds = None
            if id(p) in kept:
                policy = GatePolicy(models[p["lam"]].gates, p["tau"])
                seconds = _time(prep, models[p["lam"]], policy, batches, cfg.repeats)
            p |= {"seconds": seconds, "speedup": None if seconds is None else t_full / seconds}
    for name, policies in chosen.items():
        for policy in policies:
            seconds = _time(prep, warm, policy, batches, cfg.repeats)
            param = getattr(policy, "threshold", getattr(policy, "patience", None))
            point = point_metrics(prep, warm, policy, cfg.alpha)
            point |= _val_point(warm_val_logits, labels_val, cost, policy)
            curves[name].append(
                {"param": param, "seconds": seconds, "speedup": t_full / seconds} | point
            )
            done += 1
            if progress:
                progress(done, total)
    curves["oracle"] = _oracle_curve(prep, warm)
    return _summarise(curves, t_full, cfg, out_dir)


def _val_point(val_logits, labels, cost, policy) -> dict:
    """Validation cost and accuracy of one operating point (for selection, never test)."""
    val_cost, val_acc = validation_point(val_logits, labels, cost, policy)
    return {"val_flops_fraction": val_cost, "val_accuracy": val_acc}


def selected_points(points: list[dict]) -> list[dict]:
    """The points whose *validation* (cost, accuracy) lies on the validation Pareto front.

    JEI-DNN's lambdas and the baselines' thresholds are filtered by the same rule, so no method
    picks its operating points on the test split. Points without validation metrics (the
    oracle) are all kept.
    """
    if not points or "val_accuracy" not in points[0]:
        return points
    val = np.array([[p["val_flops_fraction"], p["val_accuracy"]] for p in points])
    keep = set(pareto_front(val).tolist())
    return [p for i, p in enumerate(points) if i in keep]


def _oracle_curve(prep: Prepared, model) -> list[dict]:
    device = next(model.parameters()).device
    test = prep.caches["test"]
    logits = _logits(model, test, device)
    points = []
    for lam in ORACLE_LAMS:
        index = oracle_exits(logits, test.labels, prep.flops.fraction, lam)
        chosen = logits[index, torch.arange(len(index))]
        points.append(
            {"lam": lam}
            | gated_metrics(chosen, index, test.labels, prep.flops.fraction, model.n_exits)
        )
    return points


def _summarise(curves: dict, t_full: float, cfg: SweepConfig, out_dir: Path) -> dict:
    for pts in curves.values():
        kept = {id(p) for p in selected_points(pts)}
        for p in pts:
            p["selected_on_val"] = id(p) in kept
    xy = {
        m: np.array([[p["flops_fraction"], p["accuracy"]] for p in pts if p["selected_on_val"]])
        for m, pts in curves.items()
        if pts
    }
    auc = {m: area_under_tradeoff(v, cost_range=cfg.cost_range) for m, v in xy.items()}

    def versus(ours: str) -> dict:
        pool = {m: v for m, v in xy.items() if m == ours or m not in ("oracle", *VARIANTS)}
        return margins(pool, ours, *cfg.cost_range)

    summary = {
        "backbone_seconds": t_full,
        "area_under_tradeoff": auc,
        "area_cost_range": list(cfg.cost_range),
        "jei_vs_best_baseline": {v: versus(v) for v in cfg.variants},
        "config": dataclasses.asdict(cfg),
        "curves": curves,
    }
    figures = [
        plot_tradeoff(
            xy,
            out_dir / "accuracy_vs_flops.png",
            xlabel="FLOPs fraction of the backbone",
            ylabel="test accuracy",
            title=f"{cfg.backbone_name}: accuracy vs FLOPs",
            hull=True,
        ),
        plot_tradeoff(
            {
                m: [[p["seconds"], p["accuracy"]] for p in pts if p.get("seconds") is not None]
                for m, pts in curves.items()
                if pts and "seconds" in pts[0]
            },
            out_dir / "accuracy_vs_seconds.png",
            xlabel=f"seconds for {cfg.n_timed} images at batch {cfg.batch_size} "
            f"(backbone {t_full:.2f} s)",
            ylabel="test accuracy",
            title="accuracy vs real wall-clock",
        ),
        plot_tradeoff(
            {
                m: [[p["flops_fraction"], p["ece"]] for p in pts if p["selected_on_val"]]
                for m, pts in curves.items()
                if pts
            },
            out_dir / "ece_vs_flops.png",
            xlabel="FLOPs fraction",
            ylabel="ECE (15 bins, whole test set)",
            title="calibration vs cost",
        ),
        plot_tradeoff(
            {
                m: [[p["flops_fraction"], p["mean_set_size"]] for p in pts if p["selected_on_val"]]
                for m, pts in curves.items()
                if pts and "mean_set_size" in pts[0]
            },
            out_dir / "set_size_vs_flops.png",
            xlabel="FLOPs fraction",
            ylabel=f"mean conformal set size (alpha={cfg.alpha})",
            title="conformal set size vs cost",
        ),
    ]
    summary["figures"] = [str(f) for f in figures]
    return summary
