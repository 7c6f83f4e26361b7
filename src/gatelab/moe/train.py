"""Train :class:`gatelab.moe.lm.TinyLM` (routed or dense) on the stdlib corpus, resumably.

``train`` is one plain loop (setup, resume, steps, eval, checkpoint); ``train_pair`` runs it for
the MoE model and the equal-active-parameter dense model and draws the comparison figures.
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

import numpy as np
import torch
import torch.nn.functional as F

import gatelab.moe.eval as moe_eval
from gatelab import runs
from gatelab.moe.lm import MoEConfig, TinyLM, load_corpus
from gatelab.threads import torch_threads

log = logging.getLogger(__name__)
CHECKPOINT = (
    "checkpoint.safetensors"  # weights, AdamW state, torch RNG; config and step in metadata
)
Progress = Callable[[int, int], None] | None
RESUMABLE_CHANGES = ("train.steps", "train.threads")  # a rerun may change these and resume


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, data, logging and checkpointing of one run."""

    steps: int = 2000  # optimiser steps
    batch_size: int = 32  # sequences per step
    lr: float = 3e-3  # AdamW peak learning rate (small model, byte vocabulary)
    warmup: int = 100  # linear warm-up steps, then cosine decay to lr / 10
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # global grad-norm clip
    eval_every: int = 250  # steps between held-out evaluations
    eval_batches: int = 16  # held-out batches per evaluation (fixed windows)
    log_every: int = 25  # steps between train/... lines in metrics.jsonl
    checkpoint_every: int = 500  # steps between checkpoints (and at the end)
    max_corpus_bytes: int = 2_000_000  # bytes of training text read (held out: a tenth)
    corpus_dir: str | None = None  # folder of .py files; None = this Python's stdlib
    seed: int = 0  # seeds torch, random, numpy and the batch sampler
    device: str = "cpu"  # torch device
    threads: int | None = None  # torch CPU threads for this run (restored after); None = default
    deterministic: bool = False  # torch.use_deterministic_algorithms

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")


def quick_configs(quick: bool) -> tuple[MoEConfig, TrainConfig]:
    """The demo's model and training settings.

    ``quick``: 600 steps per arm on one thread, within the quick demo's 90 s budget; with
    ``steps=800`` it is the configuration of the 800-step row of docs/moe.md.
    """
    if quick:
        model = MoEConfig(
            d_model=64, n_layers=2, n_heads=4, seq_len=64, n_experts=8, top_k=2, d_hidden=64
        )
        train = TrainConfig(
            steps=600, batch_size=32, eval_every=200, eval_batches=8, checkpoint_every=400,
            warmup=50, max_corpus_bytes=1_000_000, threads=1,
        )  # fmt: skip
        return model, train
    return MoEConfig(), TrainConfig(threads=1)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """1) linear warm-up, 2) cosine decay from ``lr`` to ``lr / 10`` at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_batch(data: torch.Tensor, seq_len: int, batch: int, seed: int, step: int):
    """Random windows ``(B, T+1)`` drawn from a generator seeded by (seed, step): resumable."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=generator)
    return torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])  # (B, T+1)


def train(
    model_cfg: MoEConfig,
    cfg: TrainConfig,
    run_dir: Path,
    progress: Progress = None,
    fresh: bool = False,
):
    """Train one model in ``run_dir``; returns the final metrics.

    A rerun on the same folder resumes from its checkpoint (the same config, up to the step
    budget and threads); a folder holding another configuration is refused with a message
    naming ``--fresh``; ``fresh=True`` empties it and starts over (:func:`gatelab.runs.start_run`).
    Small models are bound by per-op overhead, so one thread is often the fastest setting on a
    CPU: ``cfg.threads`` is applied for the run and restored after.
    """
    with torch_threads(cfg.threads):
        return _train(model_cfg, cfg, Path(run_dir), progress, fresh)


def _train(model_cfg: MoEConfig, cfg: TrainConfig, run_dir: Path, progress: Progress, fresh):
    # setup
    random.seed(cfg.seed)
    np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(cfg.deterministic)
    config = {"model": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(cfg)}
    resuming = runs.start_run(run_dir, config, fresh=fresh, ignore=RESUMABLE_CHANGES)
    device = torch.device(cfg.device)
    corpus_dir = Path(cfg.corpus_dir) if cfg.corpus_dir else None
    train_data, heldout = load_corpus(corpus_dir, cfg.max_corpus_bytes)
    model = TinyLM(model_cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    if resuming and runs.checkpoint_exists(run_dir / CHECKPOINT):
        step = _resume(model, optimizer, run_dir)
    runs.truncate_metrics(run_dir, step)  # a resumed run never logs a step twice
    name = f"moe__{model_cfg.ffn}__seed{cfg.seed}__{time.strftime('%Y%m%dT%H%M%S')}"
    log.info("run %s from step %d: %s", name, step, config)
    tokens_per_step = cfg.batch_size * model_cfg.seq_len
    window = _Timer()  # update time since the last log line
    total = _Timer()  # update time of this invocation
    while step < cfg.steps:
        # update
        window.start()
        model.train()
        batch = sample_batch(train_data, model_cfg.seq_len, cfg.batch_size, cfg.seed, step)
        batch = batch.to(device)
        logits = model(batch[:, :-1])  # (B, T, 256)
        lm_loss = F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        loss = lm_loss + model.aux_loss().to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        total.add(window.stop())
        # log
        if step % cfg.log_every == 0 or step == cfg.steps:
            record = {"step": step, "train/loss": lm_loss.item(), **window.rates(tokens_per_step)}
            record.update(_router_metrics(model, "train"))
            runs.append_metrics(run_dir, record)
            window = _Timer()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics = moe_eval.evaluate(model, heldout, cfg.eval_batches, cfg.batch_size)
            runs.append_metrics(run_dir, {"step": step, **metrics})
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save(model, optimizer, config, step, run_dir)
        runs.fault_point("moe-step")  # kill tests: between two steps
        if progress:
            progress(step, cfg.steps)
    final = moe_eval.evaluate(model, heldout, cfg.eval_batches, cfg.batch_size)
    final.update(
        {
            "params/total": sum(p.numel() for p in model.parameters()),
            "params/active": model.active_parameters(),
            **total.rates(tokens_per_step),
        }
    )
    return final


class _Timer:
    """Wall and process-CPU seconds of the update steps (forward, backward, optimizer)."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        self.steps = 0

    def start(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self._wall, time.process_time() - self._cpu

    def add(self, seconds: tuple[float, float]) -> None:
        self.wall += seconds[0]
        self.cpu += seconds[1]
        self.steps += 1

    def rates(self, tokens_per_step: int) -> dict:
        """``perf/`` metrics: tokens/s (wall), step time in ms (wall and process CPU time)."""
        if not self.steps:
            return {}
        return {
            "perf/tokens_per_s": tokens_per_step * self.steps / max(self.wall, 1e-9),
            "perf/step_ms": 1e3 * self.wall / self.steps,
            "perf/step_cpu_ms": 1e3 * self.cpu / self.steps,
        }


def _router_metrics(model: TinyLM, prefix: str) -> dict:
    out = {}
    for i, layer in enumerate(model.moe_layers()):
        st = layer.last_stats
        out[f"{prefix}/balance_loss_l{i}"] = st.balance_loss.item()
        out[f"{prefix}/z_loss_l{i}"] = st.z_loss.item()
        out[f"{prefix}/load_l{i}"] = st.tokens_per_expert.tolist()
    return out


def _save(model, optimizer, config: dict, step: int, run_dir: Path) -> None:
    runs.save_checkpoint(
        run_dir / CHECKPOINT, config=config, step=step, modules={"model": model},
        optimizers={"adamw": optimizer}, tensors={"rng.torch": torch.get_rng_state()},
    )  # fmt: skip


def _resume(model, optimizer, run_dir: Path) -> int:
    """Load ``run_dir``'s checkpoint (or the previous one if it is torn); returns its step."""
    path = run_dir / CHECKPOINT
    device = next(model.parameters()).device
    ckpt = runs.load_checkpoint(
        path, modules={"model": model}, optimizers={"adamw": optimizer}, device=device
    )
    torch.set_rng_state(ckpt.tensors["rng.torch"].cpu())
    return ckpt.step


def train_pair(
    model_cfg: MoEConfig,
    cfg: TrainConfig,
    run_dir: Path,
    progress: Progress = None,
    fresh: bool = False,
) -> dict:
    """Train the MoE model and the equal-active-parameter dense model; write the figures.

    Each arm's metrics carry ``perf/tokens_per_s`` and its step time; ``step_time_ratio`` is
    the MoE arm's process-CPU time per step over the dense arm's (absent when an arm was
    already finished and ran no step).

    Returns:
        ``{"moe": metrics, "dense": metrics, "step_time_ratio": float | None,
        "figures": [paths]}``.
    """
    run_dir = Path(run_dir)
    results = {}
    for i, ffn in enumerate(("moe", "dense")):
        arm = dataclasses.replace(model_cfg, ffn=ffn)
        tick = (lambda d, t, i=i: progress(i * t + d, 2 * t)) if progress else None
        results[ffn] = train(arm, cfg, run_dir / ffn, tick, fresh=fresh)
    moe_ms, dense_ms = (results[a].get("perf/step_cpu_ms") for a in ("moe", "dense"))
    ratio = moe_ms / dense_ms if moe_ms and dense_ms else None
    figures = [
        moe_eval.plot_loss_curves(run_dir, run_dir / "loss_curves.png"),
        moe_eval.plot_expert_load(run_dir / "moe", run_dir / "expert_load.png"),
    ]
    summary = {**results, "step_time_ratio": ratio, "figures": [str(f) for f in figures]}
    runs.atomic_write_json(run_dir / "summary.json", summary)
    return {**results, "step_time_ratio": ratio, "figures": figures}
