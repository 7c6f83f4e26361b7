"""The EfficientNet-Lite0 experiment: fine-tune the head, then the same sweep as the ViT.

Uses the same disjoint splits as the ViT; only the new ``fc`` head is trained on a subset of the
backbone split (sizes in :class:`EffNetConfig`; the frozen 64-pixel network costs ~63 MFLOPs per
image).
After the new ``fc`` head is fine-tuned on backbone-split features, :func:`run_sweep` trains
JEI-DNN over a lambda grid, reads each model at several gate thresholds, selects every method's
points on validation and writes the areas, margins and plots, exactly as for the ViT.
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

from gatelab.exits.backbones import (
    HEAD_FILE,
    extract_stage_features,
    first_n,
    prepared_efficientnet,
    save_head,
)
from gatelab.exits.data import SplitConfig, load_fashion_mnist, make_splits
from gatelab.exits.efficientnet import efficientnet_early_exit
from gatelab.exits.sweep import SweepConfig, run_sweep
from gatelab.runs import atomic_write_bytes, read_json, start_run

Progress = Callable[[int, int], None] | None


def _sweep_defaults() -> SweepConfig:
    return SweepConfig(
        lams=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
        n_timed=2000,
        repeats=1,
        max_baseline_points=12,
        backbone_name="EfficientNet-Lite0 (frozen, 64 px)",
    )


@dataclass(frozen=True)
class EffNetConfig:
    """Sizes and settings of the EfficientNet-Lite0 experiment."""

    resolution: int = 64  # input pixels (224 is the ImageNet size; 64 costs ~1/12)
    n_head: int = 4000  # backbone-split images that fine-tune the new fc head
    n_exits: int = 6000  # exits-split images for IMs and gates (all of them, as for the ViT)
    n_val: int = 3000
    n_calib: int = 3000
    n_test: int = 10000  # the official test set
    head_steps: int = 600  # Adam steps for the fc head (batch 256)
    seed: int = 0  # head fine-tuning and the IM/gate initialisation
    splits: SplitConfig = SplitConfig()  # the disjoint parts (as for the ViT) the subsets come from
    sweep: SweepConfig = dataclasses.field(default_factory=_sweep_defaults)

    def __post_init__(self) -> None:
        for name in ("n_exits", "n_val", "n_calib"):
            if getattr(self, name) > getattr(self.splits, name):
                raise ValueError(
                    f"EffNetConfig.{name}={getattr(self, name)} exceeds its split "
                    f"({getattr(self.splits, name)})"
                )


def run_efficientnet(
    out_dir: Path,
    data_root: Path,
    cfg: EffNetConfig | None = None,
    progress: Progress = None,
    fresh: bool = False,
) -> dict:
    """Fine-tune the head, sweep JEI-DNN and the baselines; write ``metrics.json`` and plots.

    ``out_dir`` is claimed with :func:`gatelab.runs.start_run`: a rerun of the same configuration
    returns the finished run's metrics (or, if it did not finish, runs it again: every step is
    seeded, so the result is the same), another configuration is refused naming ``--fresh``, and
    ``fresh`` starts over.
    """
    cfg = cfg or EffNetConfig()
    metrics_path = Path(out_dir) / "metrics.json"
    if start_run(out_dir, dataclasses.asdict(cfg), fresh=fresh) and metrics_path.is_file():
        return read_json(metrics_path)
    # seeding: the head's initialisation and batches, then the IMs and gates
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = make_splits(load_fashion_mnist(data_root), cfg.splits)
    sizes = {"backbone": cfg.n_head, "exits": cfg.n_exits, "val": cfg.n_val}
    sizes |= {"calib": cfg.n_calib, "test": cfg.n_test}
    parts = {k: first_n(splits[k], n) for k, n in sizes.items()}
    model = efficientnet_early_exit(cfg.resolution).eval()
    raw = {}
    for i, (name, split) in enumerate(parts.items()):
        raw[name] = extract_stage_features(model, split, cfg.resolution)
        if progress:
            progress(i + 1, len(parts))
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
    save_head(model, out_dir)
    del raw["backbone"]  # only the head trains on it
    name = Path(f"efficientnet-lite0-{cfg.resolution}px")  # not a file: the checkpoints' label
    prep = prepared_efficientnet(model, parts, raw, cfg.resolution, name)
    caches, flops = prep.caches, prep.flops
    head_acc = float((caches["test"].head_logits.argmax(-1) == parts["test"].labels).float().mean())
    summary = run_sweep(prep, out_dir, cfg.sweep, progress)
    summary |= {
        "head_test_accuracy": head_acc,
        "head": str(out_dir / HEAD_FILE),
        "flops_per_exit_fraction": flops.fraction.tolist(),
        "backbone_mflops": flops.backbone / 1e6,
        "effnet_config": dataclasses.asdict(cfg),
    }
    atomic_write_bytes(metrics_path, json.dumps(summary, indent=2, default=str).encode())
    return summary
