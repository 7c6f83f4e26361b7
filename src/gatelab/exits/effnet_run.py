"""The EfficientNet-Lite0 experiment: fine-tune the head, train JEI-DNN exits, measure.

Runs on fixed-size subsets of the same disjoint splits as the ViT (the frozen 64-pixel network
costs ~63 MFLOPs per image, so every split is subsampled; sizes are in :class:`EffNetConfig`).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gatelab.exits.baselines import baseline_policies, select_on_validation
from gatelab.exits.data import Split, SplitConfig, load_fashion_mnist, make_splits
from gatelab.exits.efficientnet import efficientnet_early_exit, fmnist_to_effnet
from gatelab.exits.experiment import save_exits
from gatelab.exits.inference import GatePolicy, exit_flops, run_early_exit, time_inference
from gatelab.exits.model import EarlyExitModel
from gatelab.exits.sweep import point_metrics_from
from gatelab.exits.train import FeatureCache, TrainConfig, train

Progress = Callable[[int, int], None] | None


@dataclass(frozen=True)
class EffNetConfig:
    """Sizes and settings of the EfficientNet-Lite0 experiment."""

    resolution: int = 64  # input pixels (224 is the ImageNet size; 64 costs ~1/12)
    n_head: int = 4000  # backbone-split images that fine-tune the new fc head
    n_exits: int = 3000  # exits-split images for IMs and gates
    n_val: int = 1000
    n_calib: int = 1000
    n_test: int = 2000  # first images of the official test set
    head_steps: int = 600  # Adam steps for the fc head (batch 256)
    lams: tuple[float, ...] = (0.1, 0.3, 1.0)
    alpha: float = 0.05
    batch_size: int = 256
    seed: int = 0
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


@torch.no_grad()
def _extract(model: EarlyExitModel, split: Split, resolution: int, batch: int = 250):
    feats, pooled = [], []
    for i in range(0, len(split.labels), batch):
        state = model.stem(fmnist_to_effnet(split.images[i : i + batch], resolution))
        f = []
        for ell, block in enumerate(model.blocks):
            state = block(state)
            if ell < model.n_exits - 1:
                f.append(model.feature_fn(state))
        feats.append(f)
        pooled.append(model.head.pooled(state))
    return [torch.cat(p) for p in zip(*feats, strict=True)], torch.cat(pooled)


def _subset(split: Split, n: int) -> Split:
    return Split(split.images[:n], split.labels[:n])


def run_efficientnet(
    out_dir: Path, data_root: Path, cfg: EffNetConfig | None = None, progress: Progress = None
) -> dict:
    """Fine-tune the head, train JEI-DNN for each lambda, evaluate; write ``metrics.json``."""
    cfg = cfg or EffNetConfig()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = make_splits(load_fashion_mnist(data_root), SplitConfig(seed=cfg.seed))
    sizes = {"backbone": cfg.n_head, "exits": cfg.n_exits, "val": cfg.n_val}
    sizes |= {"calib": cfg.n_calib, "test": cfg.n_test}
    parts = {k: _subset(splits[k], n) for k, n in sizes.items()}
    model = efficientnet_early_exit(cfg.resolution).eval()
    raw = {}
    for i, (name, split) in enumerate(parts.items()):
        raw[name] = _extract(model, split, cfg.resolution)
        if progress:
            progress(i + 1, len(parts) + len(cfg.lams))
    # fine-tune the new fc head on backbone-split features (the conv layers stay frozen)
    fc = model.head.fc
    fc.requires_grad_(True)
    opt = torch.optim.Adam(fc.parameters(), 1e-2)
    pooled, labels = raw["backbone"][1], parts["backbone"].labels
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.head_steps):
        idx = torch.randint(0, len(labels), (256,), generator=gen)
        loss = F.cross_entropy(fc(pooled[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    fc.requires_grad_(False)
    with torch.no_grad():
        caches = {
            k: FeatureCache(raw[k][0], fc(raw[k][1]), parts[k].labels)
            for k in ("exits", "val", "calib", "test")
        }
    example = fmnist_to_effnet(parts["test"].images[:1], cfg.resolution)
    flops = exit_flops(model, example)
    images = fmnist_to_effnet(parts["test"].images, cfg.resolution)
    batches = [images[i : i + cfg.batch_size] for i in range(0, len(images), cfg.batch_size)]
    t_full = time_inference(model.backbone_forward, batches, 1)
    head_acc = float((caches["test"].head_logits.argmax(-1) == parts["test"].labels).float().mean())
    train(
        model,
        caches["exits"],
        caches["val"],
        flops.fraction,
        dataclasses.replace(cfg.train, n_rounds=0),
    )
    warm = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("ims.", "gates."))}
    results = {"jei-dnn": [], "max-prob": []}
    for j, lam in enumerate(cfg.lams):
        model.load_state_dict(warm, strict=False)
        tcfg = dataclasses.replace(cfg.train, lam=lam, warmup_epochs=0)
        train(model, caches["exits"], caches["val"], flops.fraction, tcfg)
        policy = GatePolicy(model.gates)
        point = point_metrics_from(model, caches, flops.fraction, policy, cfg.alpha)
        seconds = time_inference(lambda b, p=policy: run_early_exit(model, b, p), batches, 1)
        results["jei-dnn"].append(
            {"lam": lam, "seconds": seconds, "speedup": t_full / seconds} | point
        )
        save_exits(
            model,
            out_dir / f"jei_lam{lam:g}.safetensors",
            {"lam": lam, "resolution": cfg.resolution},
        )
        if progress:
            progress(len(parts) + j + 1, len(parts) + len(cfg.lams))
    model.load_state_dict(warm, strict=False)
    val_logits = model.logits_from_features(caches["val"].feats, caches["val"].head_logits)
    candidates = baseline_policies(val_logits.detach())["max-prob"]
    kept = select_on_validation(
        candidates, val_logits.detach(), caches["val"].labels, flops.fraction
    )
    for policy in kept[:: max(1, len(kept) // 6)]:
        point = point_metrics_from(model, caches, flops.fraction, policy, cfg.alpha)
        results["max-prob"].append({"param": policy.threshold} | point)
    summary = {
        "config": dataclasses.asdict(cfg),
        "head_test_accuracy": head_acc,
        "backbone_seconds": t_full,
        "flops_per_exit_fraction": flops.fraction.tolist(),
        "backbone_mflops": flops.backbone / 1e6,
        "curves": results,
    }
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    return summary
