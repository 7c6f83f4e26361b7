"""``gatelab demo`` for JEI-DNN: pretrain (if needed), sweep, evaluate the chosen point."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from gatelab.exits.data import DEFAULT_FASHION_MNIST
from gatelab.exits.effnet_run import run_efficientnet
from gatelab.exits.operating_point import sweep_and_report
from gatelab.exits.pretrain import PretrainConfig, pretrain
from gatelab.report import DemoResult
from gatelab.runs import read_json
from gatelab.threads import torch_threads

Progress = Callable[[int, int], None] | None
QUICK_PRETRAIN_EPOCHS = 1  # a fresh clone in quick mode pretrains one epoch (a weaker backbone)


def run_demo(runs_dir: Path, quick: bool, progress: Progress = None) -> DemoResult:
    """Pretrain the ViT if no cached backbone exists, then sweep and evaluate (docs/exits.md).

    The full demo also runs the EfficientNet-Lite0 experiment (8 min here); quick mode skips it.
    """
    out = Path(runs_dir) / "exits"
    # House rule 27 keeps environment variables in cli.py, but `gatelab demo` has no --data flag
    # of ours to pass; the user's copy of the data wins over the rule here.
    data_root = Path(os.environ.get("GATELAB_FASHION_MNIST", DEFAULT_FASHION_MNIST))
    backbone = out / "backbone.safetensors"
    pretrained_now = False
    if not backbone.exists():
        epochs = QUICK_PRETRAIN_EPOCHS if quick else PretrainConfig().epochs
        pretrain(out, data_root, cfg=PretrainConfig(epochs=epochs, threads=1))
        pretrained_now = True
    with torch_threads(1):  # steady timings on a shared CPU
        summary = sweep_and_report(out, backbone, data_root, quick=quick, progress=progress)
        effnet = (
            None if quick else run_efficientnet(out / "efficientnet", data_root, None, progress)
        )
    chosen = summary["chosen"]["eval"]
    backbone_meta = read_json(backbone.with_suffix(".json"))
    metrics = {
        "backbone_accuracy": summary["backbone_accuracy"],
        "backbone_epochs": backbone_meta["pretrain"]["epochs"],
        "jei_variant": summary["chosen"]["variant"],
        "jei_lambda": summary["chosen"]["lam"],
        "jei_gate_threshold": summary["chosen"]["tau"],
        "jei_accuracy": chosen["accuracy"],
        "jei_flops_fraction": chosen["flops_fraction"],
        "jei_speedup": chosen["speedup"],
        "jei_ece": chosen["ece"],
        **{f"coverage_alpha{a}": c for a, c in summary["chosen"]["coverage_by_alpha"].items()},
        **{f"auc_{m}": v for m, v in summary["area_under_tradeoff"].items()},
        **{
            f"{v}_margin_{k}": summary["jei_vs_best_baseline"][v][k]
            for v in summary["jei_vs_best_baseline"]
            for k in ("min_margin_points", "max_margin_points")
        },
    }
    text = (
        f"Frozen ViT backbone ({'pretrained in this run, ' if pretrained_now else ''}"
        f"{backbone_meta['pretrain']['epochs']} epochs, "
        f"test accuracy {summary['backbone_accuracy']:.4f}). "
        f"{summary['chosen']['variant']} at lambda={summary['chosen']['lam']:g}, "
        f"gate threshold tau={summary['chosen']['tau']:g}, "
        "real batched early exit at batch 256: "
        f"accuracy {chosen['accuracy']:.4f} at {chosen['flops_fraction']:.3f} "
        "of the backbone's FLOPs, "
        f"wall-clock speed-up {chosen['speedup']:.2f}x. Quick mode: {quick}."
    )
    figures = [Path(f) for f in summary["figures"]]
    if effnet is not None:
        margin = effnet["jei_vs_best_baseline"]["jei-dnn"]
        metrics |= {f"effnet_auc_{m}": v for m, v in effnet["area_under_tradeoff"].items()}
        metrics |= {
            f"effnet_jei-dnn_{k}": margin[k] for k in ("min_margin_points", "max_margin_points")
        }
        figures.append(Path(effnet["figures"][0]))  # its accuracy vs FLOPs
        text += (
            f" EfficientNet-Lite0 (frozen, head accuracy {effnet['head_test_accuracy']:.4f}): "
            f"JEI-DNN minus the best baseline {margin['min_margin_points']:+.2f} to "
            f"{margin['max_margin_points']:+.2f} points over 30-90% of the FLOPs."
        )
    return DemoResult("exits", "JEI-DNN early exits (gatelab.exits)", metrics, figures, text)


__all__ = ["run_demo"]
