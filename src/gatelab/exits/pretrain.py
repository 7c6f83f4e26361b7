"""Pretrain the Fashion-MNIST ViT backbone that JEI-DNN then freezes.

AdamW with linear warm-up and cosine decay, optional label smoothing, light augmentation (random
shifts of up to ``shift`` pixels and horizontal flips). Trains on the ``backbone`` split only, kept
as one uint8 tensor on ``device``: each epoch draws its order, shifts and flips at once (on the CPU,
seeded by the epoch, so a resumed run is exact) and every mini-batch is gathered and augmented on
the device, so a GPU is not starved by a per-sample loader.

The run folder is ``<out>/pretrain/`` (:func:`gatelab.runs.start_run`): ``config.json``, one
``metrics.jsonl`` record per checkpoint (mean training loss since the previous one) and, every
``ckpt_every`` steps, one atomic checkpoint of the model, the optimiser and the step
(:func:`gatelab.runs.save_checkpoint`, the previous one kept beside it). A rerun resumes from it —
a run killed at any point, even inside the checkpoint write, loses at most ``ckpt_every`` steps and
ends with the same weights and metrics as an uninterrupted one; a rerun with another configuration
is refused unless ``fresh``. Only ``epochs`` may change between a run and its resume (the cosine
schedule is re-timed from there, recorded in ``schedule_history``). The finished backbone is
``<out>/backbone.safetensors`` with ``backbone.json`` beside it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from gatelab.exits.backbones import save_backbone
from gatelab.exits.data import Split, SplitConfig, load_fashion_mnist, make_splits, normalise
from gatelab.exits.vit import ViT, ViTConfig
from gatelab.runs import (
    append_metrics,
    checkpoint_exists,
    fault_point,
    load_checkpoint,
    read_json,
    save_checkpoint,
    start_run,
    truncate_metrics,
)
from gatelab.threads import torch_threads

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None] | None
RUN_DIR = "pretrain"  # <out>/pretrain/: config.json, metrics.jsonl, the resumable checkpoint
CHECKPOINT = "checkpoint.safetensors"  # model, optimiser, step (and its .prev beside it)
RESUME_IGNORES = ("pretrain.epochs", "pretrain.threads")  # may change between a run and its resume


@dataclass(frozen=True)
class PretrainConfig:
    """Optimisation of the ViT backbone."""

    epochs: int = 10  # full passes over the backbone split (48k images)
    batch_size: int = 128
    lr: float = 2e-3  # peak AdamW learning rate
    weight_decay: float = 0.05
    warmup_frac: float = 0.05  # fraction of steps with linear warm-up
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    shift: int = 1  # max random translation in pixels (augmentation)
    flip: bool = True  # random horizontal flips (clothes are left-right symmetric)
    seed: int = 0
    ckpt_every: int = 200  # steps between resumable checkpoints
    eval_batch: int = 1000
    threads: int = 0  # torch CPU threads; 0 keeps torch's default (1 is fastest on a busy CPU)
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "ckpt_every", "eval_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainConfig: {name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"PretrainConfig: lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(
                "PretrainConfig: weight_decay must be a finite number >= 0, "
                f"got {self.weight_decay}"
            )
        if self.shift < 0 or self.threads < 0:
            raise ValueError(
                f"PretrainConfig: shift and threads must be >= 0, got {self.shift}, {self.threads}"
            )
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(
                f"PretrainConfig: warmup_frac must be in [0, 1), got {self.warmup_frac}"
            )
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(
                f"PretrainConfig: label_smoothing must be in [0, 1), got {self.label_smoothing}"
            )


def lr_at(step: int, total: int, cfg: PretrainConfig) -> float:
    """Linear warm-up to ``cfg.lr`` then cosine decay to zero."""
    warmup = max(1, int(cfg.warmup_frac * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, progress)))


class Draws(NamedTuple):
    """One epoch's random draws: order ``(N,)``, shifts ``(N, 2)`` (dy, dx), flips ``(N,)``."""

    order: torch.Tensor
    shifts: torch.Tensor
    flips: torch.Tensor


def draw_epoch(n: int, shift: int, flip: bool, generator: torch.Generator) -> Draws:
    """All random draws of one epoch of ``n`` images; shifts lie in ``[0, 2 * shift]``."""
    order = torch.randperm(n, generator=generator)
    shifts = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return Draws(order, shifts, flips)


def augment(x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, shift: int) -> torch.Tensor:
    """Translate each image by ``shifts - shift`` pixels (zero fill), then flip where ``flips``.

    ``shifts[i] = (dy, dx)`` in ``[0, 2 * shift]``; ``(shift, shift)`` leaves image ``i`` in place,
    ``dx = shift + 1`` moves its content one pixel left. Works on any dtype and device.

    Shape:
        ``(B, C, S, S)``, ``(B, 2)``, ``(B,)`` -> ``(B, C, S, S)``.
    """
    b, _, s, _ = x.shape
    if shift > 0:
        padded = F.pad(x, (shift, shift, shift, shift))  # (B, C, S + 2 shift, S + 2 shift)
        grid = torch.arange(s, device=x.device)
        rows = shifts[:, 0, None] + grid[None]  # (B, S)
        cols = shifts[:, 1, None] + grid[None]  # (B, S)
        index = torch.arange(b, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]  # (B, S, S, C)
        x = x.permute(0, 3, 1, 2)
    return torch.where(flips[:, None, None, None], x.flip(-1), x)


@torch.no_grad()
def accuracy(model: torch.nn.Module, split: Split, batch: int, device: str) -> float:
    """Top-1 accuracy of ``model`` on a split."""
    model.eval()
    correct = 0
    for start in range(0, len(split.labels), batch):
        x = normalise(split.images[start : start + batch]).to(device)
        correct += (model(x).argmax(-1).cpu() == split.labels[start : start + batch]).sum().item()
    return correct / len(split.labels)


def pretrain(
    out_dir: Path,
    data_root: Path,
    model_cfg: ViTConfig | None = None,
    cfg: PretrainConfig | None = None,
    split_cfg: SplitConfig | None = None,
    progress: Progress = None,
    *,
    fresh: bool = False,
) -> dict:
    """Train the ViT on the backbone split; a rerun resumes ``<out_dir>/pretrain/``.

    Args:
        out_dir: where ``backbone.safetensors`` (+ ``.json``) and the run folder go.
        data_root: the Fashion-MNIST folder.
        model_cfg: the ViT's architecture.
        cfg: the optimisation.
        split_cfg: the data splits (the backbone trains on ``backbone`` only).
        progress: ``(step, total)`` callback.
        fresh: delete the run folder first instead of resuming it.

    Returns:
        Summary metrics (test accuracy, seconds, steps) also written to ``backbone.json``.

    Raises:
        ValueError: the run folder holds a run of another configuration (and not ``fresh``).
    """
    model_cfg, cfg = model_cfg or ViTConfig(), cfg or PretrainConfig()
    split_cfg = split_cfg or SplitConfig()
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} requested but torch sees no CUDA device")
    config = {
        "pretrain": dataclasses.asdict(cfg),
        "model": dataclasses.asdict(model_cfg),
        "splits": dataclasses.asdict(split_cfg),
    }
    run_dir = Path(out_dir) / RUN_DIR
    start_run(run_dir, config, fresh=fresh, ignore=RESUME_IGNORES)
    with torch_threads(cfg.threads or None):
        return _pretrain(Path(out_dir), run_dir, data_root, model_cfg, cfg, split_cfg, progress)


def _pretrain(out_dir, run_dir, data_root, model_cfg, cfg, split_cfg, progress) -> dict:
    # setup
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    splits = make_splits(load_fashion_mnist(data_root), split_cfg)
    train = splits["backbone"]
    model = ViT(model_cfg).to(cfg.device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0}],
        lr=cfg.lr,
        fused=cfg.device.startswith("cuda") or None,  # one kernel per step on a GPU
    )
    n = len(train.labels)
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size={cfg.batch_size} exceeds the {n} backbone images")
    total = cfg.epochs * steps_per_epoch
    # resume from the last good checkpoint (start_run has checked that the config is the same;
    # only `epochs` may differ, which re-times the cosine schedule from there)
    ckpt_path = run_dir / CHECKPOINT
    step, seconds, history = 0, 0.0, []
    if checkpoint_exists(ckpt_path):
        ckpt = load_checkpoint(
            ckpt_path, modules={"model": model}, optimizers={"opt": opt}, device=cfg.device
        )
        step, seconds = ckpt.step, float(ckpt.state["seconds"])
        if step > total:
            raise ValueError(
                f"{run_dir}: its checkpoint is at step {step}, past the {total} steps of "
                f"epochs={cfg.epochs}; ask for more epochs, or rerun with --fresh to start over"
            )
        history = list(ckpt.state.get("schedule_history", []))
        if ckpt.config["pretrain"]["epochs"] != cfg.epochs:
            history.append({"epochs": ckpt.config["pretrain"]["epochs"], "until_step": step})
        log.info("resuming backbone pretraining at step %d/%d", step, total)
    truncate_metrics(run_dir, step)  # records past the checkpoint are logged again
    run_config = read_json(run_dir / "config.json")
    # train
    images, labels = train.images.to(cfg.device), train.labels.to(cfg.device)  # uint8, int64
    start = time.perf_counter()
    loss_sum, losses = torch.zeros((), dtype=torch.float64, device=cfg.device), 0
    model.train()
    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        draws = Draws(*(t.to(cfg.device) for t in draw_epoch(n, cfg.shift, cfg.flip, generator)))
        for i in range(offset, steps_per_epoch):
            index = draws.order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            x = augment(images[index], draws.shifts[index], draws.flips[index], cfg.shift)
            logits = model(normalise(x))
            loss = F.cross_entropy(logits, labels[index], label_smoothing=cfg.label_smoothing)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum, losses = loss_sum + loss.detach().double(), losses + 1
            if step % 50 == 0:
                log.info("step %d/%d loss %.4f", step, total, loss.item())
            if progress:
                progress(step, total)
            if step % cfg.ckpt_every == 0 or step == total:
                # the record first: killed before the checkpoint lands, the resume drops it
                record = {"step": step, "epoch": step / steps_per_epoch}
                record |= {
                    "lr": lr_at(step - 1, total, cfg),
                    "train/loss": float(loss_sum) / losses,
                }
                append_metrics(run_dir, record)
                loss_sum, losses = torch.zeros_like(loss_sum), 0
                elapsed = seconds + time.perf_counter() - start
                save_checkpoint(
                    ckpt_path,
                    config=run_config,
                    step=step,
                    modules={"model": model},
                    optimizers={"opt": opt},
                    state={"seconds": elapsed, "schedule_history": history},
                )
            fault_point("exits-pretrain-step")  # kill tests: die between two steps
    seconds += time.perf_counter() - start
    # evaluate and export
    test_acc = accuracy(model, splits["test"], cfg.eval_batch, cfg.device)
    val_acc = accuracy(model, splits["val"], cfg.eval_batch, cfg.device)
    summary = {
        "model": dataclasses.asdict(model_cfg),
        "pretrain": dataclasses.asdict(cfg),
        "splits": dataclasses.asdict(split_cfg),
        "test_accuracy": test_acc,
        "val_accuracy": val_acc,
        "train_seconds": seconds,
        "steps": step,
        "schedule_history": history,
        "torch_threads": torch.get_num_threads(),
    }
    save_backbone(model, out_dir / "backbone.safetensors", summary)
    return read_json(out_dir / "backbone.json")
