"""The ViT study: sweep, then choose and evaluate one operating point (``gatelab exits sweep``).

The point is the cheapest JEI-DNN (lambda, tau) whose *validation* accuracy is within 1 point of
the backbone's validation accuracy; it is then evaluated with real early exit on the test split,
at three conformal levels, and drawn as a reliability diagram.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from gatelab.exits.backbones import load_exits, prepare
from gatelab.exits.data import SplitConfig
from gatelab.exits.eval import evaluate, reliability
from gatelab.exits.inference import GatePolicy, run_early_exit
from gatelab.exits.sweep import VARIANTS, SweepConfig, checkpoint_name, run_sweep
from gatelab.exits.train import TrainConfig, clone_exits
from gatelab.runs import atomic_write_bytes

Progress = Callable[[int, int], None] | None
ALPHAS = (0.01, 0.05, 0.1)


def sweep_config(quick: bool, variants: tuple[str, ...] = ("jei-dnn",)) -> SweepConfig:
    """The full sweep, or the quick one (< 5 min with a cached backbone)."""
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise ValueError(
            f"unknown JEI-DNN variant {unknown[:1]}; choose from {', '.join(VARIANTS)}"
        )
    if not quick:
        return SweepConfig(variants=variants)
    return SweepConfig(
        variants=variants,
        lams=(0.01, 0.05, 0.2, 0.6, 1.5),
        n_timed=1024,
        repeats=1,
        max_baseline_points=12,
        train=TrainConfig(warmup_epochs=20, n_rounds=3, phase_steps=100),
    )


def sweep_and_report(
    out: Path,
    backbone: Path,
    data_root: Path,
    cfg: SweepConfig | None = None,
    quick: bool = False,
    device: str = "cpu",
    progress: Progress = None,
) -> dict:
    """Sweep, then evaluate the cheapest JEI-DNN point within 1 accuracy point of the backbone.

    A point is a lambda (its checkpoint) read at a gate threshold tau. The point is chosen on
    the validation split (its accuracy there within 1 point of the backbone's validation
    accuracy), then evaluated with real early exit on the test split; writes ``curves.json``.
    ``cfg`` defaults to :func:`sweep_config` of ``quick``; ``quick`` also times only
    ``cfg.n_timed`` test images of the chosen point (the full mode times all 10k).
    """
    prep = prepare(backbone, data_root, SplitConfig(), device, cache_dir=out)
    cfg = cfg or sweep_config(quick)
    summary = run_sweep(prep, out, cfg, progress)
    backbone_acc = float(
        (prep.caches["test"].head_logits.argmax(-1) == prep.caches["test"].labels).double().mean()
    )
    val = prep.caches["val"]
    backbone_val = float((val.head_logits.argmax(-1) == val.labels).double().mean())
    # the primary variant's cheapest point on validation (FLOPs: deterministic, unlike noisy
    # sweep timings) within 1 validation accuracy point of the backbone
    variant = cfg.variants[0]
    points = summary["curves"][variant]
    within = [p for p in points if p["val_accuracy"] >= backbone_val - 0.01] or points
    best = min(within, key=lambda p: (p["val_flops_fraction"], -p["val_accuracy"]))
    checkpoint = out / checkpoint_name(variant, best["lam"])
    prep = prep._replace(model=clone_exits(prep.model, VARIANTS[variant][0]))
    load_exits(prep.model, checkpoint)
    policy = GatePolicy(prep.model.gates, best["tau"])
    n_timed = cfg.n_timed if quick else None
    chosen = {
        a: evaluate(prep, a, cfg.batch_size, cfg.repeats, n_timed, policy, time_it=a == 0.05)
        for a in ALPHAS
    }
    main = chosen[0.05]
    figure = plot_reliability(
        _probs(prep, policy),
        prep.splits["test"].labels,
        out / "reliability.png",
        f"{variant} lambda={best['lam']:g} tau={best['tau']:g} (gated prediction)",
    )
    summary["figures"].append(str(figure))
    summary["backbone_accuracy"] = backbone_acc
    summary["backbone_val_accuracy"] = backbone_val
    summary["chosen"] = {
        "checkpoint": str(checkpoint),
        "variant": variant,
        "lam": best["lam"],
        "tau": best["tau"],
        "eval": {k: v for k, v in main.items() if k != "reliability"},
        "coverage_by_alpha": {str(a): chosen[a]["coverage"] for a in ALPHAS},
        "set_size_by_alpha": {str(a): chosen[a]["mean_set_size"] for a in ALPHAS},
    }
    atomic_write_bytes(out / "curves.json", json.dumps(summary, indent=2, default=str).encode())
    return summary


def _probs(prep, policy):
    with torch.no_grad():
        x = prep.transform(prep.splits["test"].images)
        device = next(prep.model.parameters()).device
        outs = [
            run_early_exit(prep.model, x[i : i + 1000].to(device), policy)
            for i in range(0, len(x), 1000)
        ]
        return torch.cat([o.logits.cpu() for o in outs]).double().softmax(-1)


def plot_reliability(probs: torch.Tensor, labels: torch.Tensor, path: Path, title: str) -> Path:
    """Reliability diagram (15 equal-width bins) with the ECE in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rel = reliability(probs, labels)
    centers = (torch.arange(15) + 0.5) / 15
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    mask = rel.counts > 0
    ax.bar(
        centers[mask], rel.accuracy[mask], width=1 / 15, edgecolor="k", alpha=0.7, label="accuracy"
    )
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE = {rel.ece:.4f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
