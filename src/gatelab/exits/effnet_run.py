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
import functools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from gatelab.exits.data import Split, SplitConfig, load_fashion_mnist, make_splits
from gatelab.exits.efficientnet import efficientnet_early_exit, fmnist_to_effnet
from gatelab.exits.experiment import Prepared
from gatelab.exits.inference import exit_flops
from gatelab.exits.model import EarlyExitModel
from gatelab.exits.sweep import SweepConfig, run_sweep
from gatelab.exits.train import FeatureCache

Progress = Callable[[int, int], None] | None
HEAD_FILE = "head.safetensors"  # the fine-tuned fc (the exits checkpoints hold IMs and gates)


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


@torch.no_grad()
def extract_stage_features(
    model: EarlyExitModel, split: Split, resolution: int, batch: int = 250
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Pooled features after stages 1..6 ``(N, C_l)`` and the head's pooled input ``(N, 1280)``.

    The head's input rather than its logits, because the new ``fc`` is trained on it.
    """
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


def first_n(split: Split, n: int) -> Split:
    """The first ``n`` images of a split (the splits are already shuffled by seed)."""
    return Split(split.images[:n], split.labels[:n])


def run_efficientnet(
    out_dir: Path, data_root: Path, cfg: EffNetConfig | None = None, progress: Progress = None
) -> dict:
    """Fine-tune the head, sweep JEI-DNN and the baselines; write ``metrics.json`` and plots."""
    cfg = cfg or EffNetConfig()
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
    save_file({k: v.contiguous() for k, v in fc.state_dict().items()}, out_dir / HEAD_FILE)
    del raw["backbone"]  # only the head trains on it
    name = Path(f"efficientnet-lite0-{cfg.resolution}px")  # not a file: the checkpoints' label
    prep = _prepared(model, parts, raw, cfg.resolution, name)
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
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
    (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    return summary


def _prepared(
    model: EarlyExitModel, parts: dict[str, Split], raw: dict, resolution: int, label: Path
) -> Prepared:
    """Caches (head logits from the model's ``fc``), transform and FLOPs of extracted splits."""
    with torch.no_grad():
        caches = {
            k: FeatureCache(feats, model.head.fc(pooled), parts[k].labels)
            for k, (feats, pooled) in raw.items()
        }
    transform = functools.partial(fmnist_to_effnet, resolution=resolution)
    flops = exit_flops(model, transform(parts["test"].images[:1]))
    return Prepared(model, parts, caches, flops, transform, label)


def prepare_efficientnet(
    run_dir: Path, data_root: Path, split_names: tuple[str, ...] = ("calib", "test")
) -> Prepared:
    """A finished :func:`run_efficientnet` run, ready for :func:`~gatelab.exits.evaluate`.

    Reads the run's ``config.json`` and fine-tuned head; extracts the features of
    ``split_names`` (by default the calibration and test splits, the only ones evaluation
    reads; ``test`` is always included). Load a checkpoint's exits into ``.model``.
    """
    config_path, head_path = Path(run_dir) / "config.json", Path(run_dir) / HEAD_FILE
    for path in (config_path, head_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: an EfficientNet checkpoint needs its run folder "
                "(`gatelab exits efficientnet` writes it)"
            )
    saved = json.loads(config_path.read_text())
    resolution, split_cfg = saved["resolution"], SplitConfig(**saved["splits"])
    splits = make_splits(load_fashion_mnist(data_root), split_cfg)
    names = dict.fromkeys((*split_names, "test"))  # ordered, without repeats
    parts = {k: first_n(splits[k], saved[f"n_{k}"]) for k in names}
    model = efficientnet_early_exit(resolution).eval()
    model.head.fc.load_state_dict(load_file(head_path))
    raw = {k: extract_stage_features(model, part, resolution) for k, part in parts.items()}
    return _prepared(model, parts, raw, resolution, Path(run_dir))
