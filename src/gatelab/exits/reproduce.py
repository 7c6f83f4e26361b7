"""``gatelab reproduce exits``: the runs behind the tables of ``docs/exits.md``, and the tables.

Two independent chains, each resumable (a finished step's output is reused, never redone; the
pretraining and JEI-DNN training also resume mid-run from their checkpoints):

1. **ViT**: pretrain the 92.77% backbone (``gatelab exits pretrain --device cuda --epochs 100
   --batch-size 256 --lr 2e-3 --label-smoothing 0.1 --d-model 64 --mlp-ratio 3``; on a machine
   without CUDA it runs on the CPU, much slower and to a slightly different backbone), sweep it
   (``gatelab exits sweep``), then evaluate the chosen point with ``gatelab exits eval`` at
   alpha = 0.05 (timed, 3 repeats) and 0.01 / 0.1 (coverage only).
2. **EfficientNet-Lite0**: ``gatelab exits efficientnet``, then ``gatelab exits eval`` of two of
   its checkpoints (lambda = 1 at tau = 0.5 and lambda = 0.3 at tau = 0.4).

``--jobs 2`` runs the two chains side by side. The tables go to
``<runs_dir>/reproduce/exits/tables.md`` and ``tables.json``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from gatelab.exits.baselines import interpolate_front
from gatelab.exits.data import fashion_mnist_root
from gatelab.exits.effnet_run import EffNetConfig, run_efficientnet
from gatelab.exits.eval import evaluate_checkpoint
from gatelab.exits.operating_point import sweep_and_report
from gatelab.exits.pretrain import PretrainConfig, pretrain
from gatelab.exits.sweep import SweepConfig, checkpoint_name
from gatelab.exits.vit import ViTConfig
from gatelab.runs import atomic_write_json, read_json
from gatelab.threads import torch_threads

Progress = Callable[[int, int], None] | None
EXPECTED_TIME = (
    "about 35 min on 2 CPU cores (ViT sweep 6 min, EfficientNet-Lite0 8 min, the evaluations "
    "about 20 min; --jobs 2 runs the two chains side by side), plus the ViT pretraining: "
    "6 min on one H200 GPU, many hours on 2 CPU cores"
)
# the 92.77% backbone (docs/exits.md, "Backbones")
VIT = ViTConfig(d_model=64, mlp_ratio=3.0)
PRETRAIN = PretrainConfig(
    epochs=100, batch_size=256, lr=2e-3, label_smoothing=0.1, threads=1, device="cuda"
)
SWEEP = SweepConfig()  # `gatelab exits sweep` without --quick
EFFNET = EffNetConfig()  # `gatelab exits efficientnet`
ALPHAS = (0.01, 0.05, 0.1)  # the conformal levels of the eval tables (0.05 is timed)
EFFNET_POINTS = ((1.0, 0.5, ALPHAS), (0.3, 0.4, (0.05,)))  # (lambda, tau, alphas) evaluated
MARGIN_GRID = (0.30, 0.35, 0.40, 0.45, 0.50, 0.55, 0.60, 0.70, 0.80, 0.90)  # FLOPs fractions
EVAL_REPEATS = 3  # timing repeats of the alpha = 0.05 evaluation (0: the others are not timed)


def _eval(checkpoint: Path, data: Path, alpha: float, tau: float, out: Path) -> dict:
    """``gatelab exits eval`` of one checkpoint at one alpha, reused from ``out`` if done."""
    if out.is_file():
        return read_json(out)
    repeats = EVAL_REPEATS if alpha == 0.05 else 0
    flat = evaluate_checkpoint(checkpoint, data, alpha, repeats=repeats, gate_threshold=tau)
    atomic_write_json(out, flat)
    return flat


def run_vit(
    runs_dir: Path,
    data: Path,
    model_cfg: ViTConfig = VIT,
    cfg: PretrainConfig = PRETRAIN,
    sweep: SweepConfig = SWEEP,
    progress: Progress = None,
) -> dict:
    """Pretrain (if needed), sweep (if needed) and evaluate the chosen point; its results."""
    backbone_dir, out = Path(runs_dir) / "exits_gpu100", Path(runs_dir) / "exits_gpu100_tau"
    backbone = backbone_dir / "backbone.safetensors"
    if not backbone.is_file():
        device = cfg.device if torch.cuda.is_available() else "cpu"
        pretrain(backbone_dir, data, model_cfg, dataclasses.replace(cfg, device=device))
    if not (out / "curves.json").is_file():
        with torch_threads(1):
            sweep_and_report(out, backbone, data, sweep, progress=progress)
    curves = read_json(out / "curves.json")
    chosen = curves["chosen"]
    checkpoint = Path(chosen["checkpoint"])
    with torch_threads(1):
        evals = {
            str(a): _eval(checkpoint, data, a, chosen["tau"], out / f"eval_alpha{a}.json")
            for a in ALPHAS
        }
    backbone_meta = read_json(backbone.with_suffix(".json"))
    return {"backbone": backbone_meta, "summary": curves, "eval": evals}


def run_effnet(
    runs_dir: Path,
    data: Path,
    cfg: EffNetConfig = EFFNET,
    points: tuple = EFFNET_POINTS,
    progress: Progress = None,
) -> dict:
    """The EfficientNet-Lite0 experiment (if needed) and its evaluated points; its results."""
    out = Path(runs_dir) / "exits" / "efficientnet"
    with torch_threads(1):
        if not (out / "metrics.json").is_file():
            run_efficientnet(out, data, cfg, progress)
        evals = {}
        for lam, tau, alphas in points:
            checkpoint = out / checkpoint_name("jei-dnn", lam)
            evals[f"{lam:g},{tau:g}"] = {
                str(a): _eval(
                    checkpoint, data, a, tau, out / f"eval_lam{lam:g}_tau{tau:g}_{a}.json"
                )
                for a in alphas
            }
    return {"summary": read_json(out / "metrics.json"), "eval": evals}


def _fmt(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _area_table(summary: dict) -> list[str]:
    lines = ["| method | area under accuracy–FLOPs hull, cost 0.3–0.9 |", "|---|---|"]
    lines += [f"| {m} | {a:.4f} |" for m, a in summary["area_under_tradeoff"].items()]
    return lines


def margin_row(summary: dict, variant: str = "jei-dnn") -> list[float | None]:
    """JEI-DNN's front minus the best baseline's at :data:`MARGIN_GRID`, in accuracy points."""
    fronts = {
        m: np.array([[p["flops_fraction"], p["accuracy"]] for p in pts if p["selected_on_val"]])
        for m, pts in summary["curves"].items()
        if pts and m not in ("oracle",)
    }
    grid = np.array(MARGIN_GRID)
    mine = interpolate_front(fronts.pop(variant), grid)
    others = [interpolate_front(v, grid) for m, v in fronts.items() if "jei" not in m]
    best = np.nanmax(np.where(np.isnan(others), -np.inf, others), axis=0)
    diff = (mine - best) * 100
    return [float(d) if np.isfinite(d) else None for d in diff]


def _margin_table(summary: dict) -> list[str]:
    row = margin_row(summary)
    lines = ["| FLOPs fraction | " + " | ".join(f"{c:.2f}" for c in MARGIN_GRID) + " |"]
    lines += ["|---|" + "---|" * len(MARGIN_GRID)]
    cells = " | ".join("–" if d is None else f"{d:+.2f}" for d in row)
    return [*lines, f"| JEI-DNN − best baseline (points) | {cells} |"]


def _points_table(summary: dict) -> list[str]:
    lines = [
        "| method | λ, τ / threshold | accuracy | FLOPs fraction | speed-up | ECE "
        "| coverage α=0.05 | mean set size |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, points in summary["curves"].items():
        if method == "oracle":
            continue
        for p in sorted(
            (p for p in points if p["selected_on_val"]), key=lambda p: p["flops_fraction"]
        ):
            param = f"λ={p['lam']:g}, τ={p['tau']:g}" if "tau" in p else f"{p['param']:.3g}"
            speedup = "–" if p.get("speedup") is None else f"{p['speedup']:.2f}×"
            lines.append(
                f"| {method} | {param} | {p['accuracy']:.4f} | {p['flops_fraction']:.3f} "
                f"| {speedup} | {p['ece']:.4f} | {p['coverage']:.4f} | {p['mean_set_size']:.2f} |"
            )
    return lines


def _eval_table(evals: dict[str, dict[str, dict]]) -> list[str]:
    lines = [
        "| point | accuracy | FLOPs fraction | speed-up | ECE | coverage α = 0.01 / 0.05 / 0.1 "
        "| mean set size (α = 0.05) | exit histogram |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for point, by_alpha in evals.items():
        main = by_alpha["0.05"]
        coverage = " / ".join(_fmt(by_alpha.get(str(a), {}).get("coverage")) for a in ALPHAS)
        speedup = "–" if main["speedup"] is None else f"{main['speedup']:.2f}×"
        hist = " / ".join(str(c) for c in main["exit_histogram"])
        lines.append(
            f"| {point} | {main['accuracy']:.4f} | {main['flops_fraction']:.3f} | {speedup} "
            f"| {main['ece']:.4f} | {coverage} | {main['mean_set_size']:.2f} | {hist} |"
        )
    return lines


def write_tables(vit: dict, effnet: dict, out_dir: Path) -> Path:
    """The tables of docs/exits.md from the two chains' results: ``tables.md`` and ``.json``."""
    chosen = vit["summary"]["chosen"]
    point = f"λ={chosen['lam']:g}, τ={chosen['tau']:g}"
    lines = [
        "# gatelab.exits: the tables of docs/exits.md",
        "",
        f"ViT backbone: test accuracy {vit['backbone']['test_accuracy']:.4f} "
        f"(validation {vit['backbone']['val_accuracy']:.4f}).",
        "",
        "## ViT sweep: areas",
        "",
        *_area_table(vit["summary"]),
        "",
        "## ViT sweep: margins",
        "",
        *_margin_table(vit["summary"]),
        "",
        "## ViT sweep: points selected on validation",
        "",
        *_points_table(vit["summary"]),
        "",
        "## ViT: the chosen operating point, real early exit on the 10k test images",
        "",
        *_eval_table({point: vit["eval"]}),
        "",
        "## EfficientNet-Lite0: areas",
        "",
        f"Head alone: test accuracy {effnet['summary']['head_test_accuracy']:.4f}.",
        "",
        *_area_table(effnet["summary"]),
        "",
        "## EfficientNet-Lite0: margins",
        "",
        *_margin_table(effnet["summary"]),
        "",
        "## EfficientNet-Lite0: points selected on validation",
        "",
        *_points_table(effnet["summary"]),
        "",
        "## EfficientNet-Lite0: `gatelab exits eval`",
        "",
        *_eval_table(
            {f"λ={k.split(',')[0]}, τ={k.split(',')[1]}": v for k, v in effnet["eval"].items()}
        ),
        "",
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tables.md"
    path.write_text("\n".join(lines))
    payload = {
        "vit": {
            "backbone_test_accuracy": vit["backbone"]["test_accuracy"],
            "area_under_tradeoff": vit["summary"]["area_under_tradeoff"],
            "margins": dict(zip(map(str, MARGIN_GRID), margin_row(vit["summary"]), strict=True)),
            "chosen": {"lam": chosen["lam"], "tau": chosen["tau"], "eval": vit["eval"]},
        },
        "efficientnet": {
            "head_test_accuracy": effnet["summary"]["head_test_accuracy"],
            "area_under_tradeoff": effnet["summary"]["area_under_tradeoff"],
            "margins": dict(zip(map(str, MARGIN_GRID), margin_row(effnet["summary"]), strict=True)),
            "eval": effnet["eval"],
        },
    }
    atomic_write_json(out_dir / "tables.json", json.loads(json.dumps(payload, default=str)))
    return path


def reproduce(runs_dir: Path, jobs: int = 1, progress: Progress = None) -> Path:
    """Run (or reuse) every configuration behind docs/exits.md's tables; write the tables."""
    runs_dir, data = Path(runs_dir), fashion_mnist_root()
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=2) as pool:
            vit = pool.submit(run_vit, runs_dir, data)
            effnet = pool.submit(run_effnet, runs_dir, data)
            vit, effnet = vit.result(), effnet.result()
    else:
        vit = run_vit(runs_dir, data, progress=progress)
        effnet = run_effnet(runs_dir, data, progress=progress)
    return write_tables(vit, effnet, runs_dir / "reproduce" / "exits")
