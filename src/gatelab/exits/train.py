r"""JEI-DNN training of the IMs and gates on a frozen backbone (arXiv:2310.09163).

The backbone is frozen, so each split's pooled features are computed once
(:func:`extract_features`) and every phase trains on them:

1. **IM warm-up**: :math:`\sum_l w_l\,\mathrm{CE}_l` with earlier exits weighted more
   (:math:`w_l` falls linearly from 2 to 1).
2. Alternating phases of ``phase_steps`` mini-batches (the authors switch every 200):

   - **gate phase**: oracle exit :math:`l^*(x, y) = \arg\min_l \mathrm{CE}_l(x, y) + \lambda c_l`
     with :math:`c_l` the measured FLOPs fraction of leaving at :math:`l`; each gate is trained by
     BCE towards :math:`1[l \ge l^*]` (the hazard's conditional target) with the positive class
     weighted by negatives/positives on the validation split;
   - **IM phase**: :math:`\frac1B \sum_b \sum_{l<L} \operatorname{sg}[P_l(x_b)]\,
     \mathrm{CE}_l(x_b, y_b)` with the hazard probabilities :math:`P_l` *detached* (``sg``) and no
     normalising ratio, so the weights really change the gradient (the authors' public code
     divided by an undetached ratio that cancelled them).

After every phase the validation objective (cross-entropy at the hard exit plus
:math:`\lambda` times its cost) is measured and the best IMs and gates are kept (early stopping).
With a run folder (claimed by :func:`gatelab.runs.start_run`), every phase ends with a line of
``metrics.jsonl`` and one atomic checkpoint (:func:`gatelab.runs.save_checkpoint`: IMs, gates,
both optimisers, the batch order and the best state so far, the previous one kept beside it). A
rerun resumes after the last finished phase and ends in the same state, even when the run was
killed inside a checkpoint write; a rerun with another configuration is refused unless ``fresh``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gatelab import gates as gating
from gatelab.exits.backbones import FeatureCache, load_backbone, prepare, save_exits
from gatelab.exits.data import SplitConfig
from gatelab.exits.model import EarlyExitModel, ExitGate
from gatelab.runs import (
    append_metrics,
    checkpoint_exists,
    config_matches,
    fault_point,
    load_checkpoint,
    save_checkpoint,
    start_run,
    truncate_metrics,
)

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None] | None
CHECKPOINT = "train_ckpt.safetensors"  # resumable state, rewritten after every phase


@dataclass(frozen=True)
class TrainConfig:
    """JEI-DNN optimisation of the IMs and gates."""

    lam: float = 0.5  # lambda: weight of the FLOPs fraction in the oracle exit objective
    warmup_epochs: int = 30  # IM warm-up passes over the exits split
    n_rounds: int = 5  # gate phase + IM phase pairs
    phase_steps: int = 200  # mini-batches per phase (the authors' 200)
    batch_size: int = 256
    lr_im: float = 3e-3  # Adam, IMs
    lr_gate: float = 1e-2  # Adam, gates
    weight_decay: float = 1e-4
    balance: float = 0.75  # gate positive weight (neg/pos)^balance; 1 = fully class-balanced as
    # in the paper, which exits far too early here; 0.75 chosen on validation (README,
    # experiments/exits_gate_choice.py)
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name, positive in (
            ("lam", False),
            ("lr_im", True),
            ("lr_gate", True),
            ("weight_decay", False),
            ("balance", False),
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
                wanted = "> 0" if positive else ">= 0"
                raise ValueError(
                    f"TrainConfig: {name} must be a finite number {wanted}, got {value}"
                )
        if self.warmup_epochs < 0 or self.n_rounds < 0 or self.phase_steps < 1:
            raise ValueError("TrainConfig: warmup_epochs, n_rounds >= 0 and phase_steps >= 1")
        if self.batch_size < 1:
            raise ValueError(f"TrainConfig: batch_size must be >= 1, got {self.batch_size}")


def exit_losses(model: EarlyExitModel, cache: FeatureCache) -> tuple[torch.Tensor, torch.Tensor]:
    """Every exit's logits ``(L, N, C)`` and per-sample cross-entropies ``(L, N)``."""
    logits = model.logits_from_features(cache.feats, cache.head_logits)  # (L, N, C)
    ce = F.cross_entropy(logits.flatten(0, 1), cache.labels.repeat(len(logits)), reduction="none")
    return logits, ce.view(len(logits), -1)  # (L, N)


def oracle_exit(ce: torch.Tensor, cost: torch.Tensor, lam: float) -> torch.Tensor:
    r"""Oracle exit :math:`l^* = \arg\min_l \mathrm{CE}_l + \lambda c_l` (ties to the earlier exit).

    Shape:
        ce ``(L, N)``, cost ``(L,)`` -> ``(N,)`` long.
    """
    objective = ce + lam * cost.to(ce)[:, None]  # (L, N)
    return objective.argmin(0)  # first minimum: torch returns the lowest index among ties


def gate_targets(oracle: torch.Tensor, n_exits: int) -> torch.Tensor:
    """Hazard targets ``1[l >= l*]`` for the early exits: ``(N,)`` -> ``(N, L-1)`` float."""
    return (torch.arange(n_exits - 1, device=oracle.device)[None] >= oracle[:, None]).float()


def gate_loss(gate_values: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor):
    """Class-balanced BCE of every gate, averaged over gates: ``(N, L-1)`` -> scalar."""
    g = gate_values.clamp(1e-6, 1 - 1e-6)
    loss = -(pos_weight * targets * g.log() + (1 - targets) * (1 - g).log())  # (N, L-1)
    return loss.mean()


def weighted_im_loss(exit_probs: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
    r"""IM-phase loss :math:`\frac1N\sum_n \sum_{l<L} \operatorname{sg}[P_{ln}]\,\mathrm{CE}_{ln}`.

    The weights are detached and *not* renormalised (the public code divided by an undetached
    ratio that cancelled them). The last exit is the frozen head and is left out.

    Shape:
        exit_probs ``(N, L)``, ce ``(L, N)`` -> scalar.
    """
    weights = exit_probs.detach()[:, :-1].T  # (L-1, N)
    return (weights * ce[:-1]).sum(0).mean()


def warmup_weights(n_exits: int) -> torch.Tensor:
    """Warm-up weights of the early exits, falling linearly from 2 to 1 ``(L-1,)``."""
    return torch.linspace(2.0, 1.0, n_exits - 1) if n_exits > 2 else torch.ones(1)


def hard_objective(model: EarlyExitModel, cache: FeatureCache, cost: torch.Tensor, lam: float):
    """Validation objective: mean CE at the gated exit plus ``lam`` times its cost fraction."""
    with torch.no_grad():
        logits, ce = exit_losses(model, cache)
        exit_index = gating.first_exit(model.gate_values(logits), 0.5)  # (N,)
        n = torch.arange(len(exit_index), device=exit_index.device)
        return float((ce[exit_index, n] + lam * cost.to(ce)[exit_index]).mean())


class Batches:
    """Endless mini-batch indices: a fresh seeded order per pass, resumable mid-pass.

    Equivalent to drawing ``torch.randperm(n, generator=generator)`` at the start of every pass
    and cutting it into full batches; :meth:`state` and :meth:`load_state` capture the current
    order and position too, so a resumed run sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.order, self.start = torch.randperm(n, generator=generator), 0

    def __next__(self) -> torch.Tensor:
        """The next batch of indices ``(batch_size,)``."""
        if self.start + self.batch_size > self.n:
            self.order, self.start = torch.randperm(self.n, generator=self.generator), 0
        index = self.order[self.start : self.start + self.batch_size]
        self.start += self.batch_size
        return index

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and JSON state that :meth:`load_state` restores."""
        tensors = {"batches.order": self.order, "batches.generator": self.generator.get_state()}
        return tensors, {"batch_start": self.start}

    def load_state(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Continue from a :meth:`state`."""
        self.order, self.start = tensors["batches.order"], int(state["batch_start"])
        self.generator.set_state(tensors["batches.generator"])


def _phase_loss(kind, model, batch, cost, cfg, warm, pos_weight) -> torch.Tensor:
    """The loss of one mini-batch in a ``warmup``, ``gate`` or ``im`` phase."""
    logits, ce = exit_losses(model, batch)  # (L, B, C), (L, B)
    if kind == "warmup":
        return (warm[:, None] * ce[:-1]).sum(0).mean()
    if kind == "gate":
        targets = gate_targets(oracle_exit(ce.detach(), cost, cfg.lam), model.n_exits)
        return gate_loss(model.gate_values(logits.detach()), targets, pos_weight)
    probs = gating.exit_probabilities(model.gate_values(logits))  # (B, L)
    return weighted_im_loss(probs, ce)


def train(
    model: EarlyExitModel,
    train_cache: FeatureCache,
    val_cache: FeatureCache,
    cost: torch.Tensor,
    cfg: TrainConfig = TrainConfig(),
    run_dir: Path | None = None,
    progress: Progress = None,
    *,
    fresh: bool = False,
    run_config: dict | None = None,
) -> dict:
    """Warm up the IMs, then alternate gate and IM phases; keep the best validation state.

    Args:
        model: an :class:`EarlyExitModel` (only its ``ims`` and ``gates`` change).
        train_cache: features of the exits-training split.
        val_cache: features of the validation split.
        cost: FLOPs fraction of leaving at each exit ``(L,)``.
        cfg: the training configuration.
        run_dir: the run folder (``config.json``, ``metrics.jsonl``, the resumable
            ``train_ckpt.safetensors``); a rerun on it resumes. ``None``: nothing is written.
        progress: ``(done, total)`` callback over phases.
        fresh: delete ``run_dir`` first instead of resuming it.
        run_config: what ``config.json`` records and a resume must match (default: ``cfg``;
            :func:`train_checkpoint` adds the backbone).

    Returns:
        Metrics of the kept state (validation objective, phases run, seconds).

    Raises:
        ValueError: ``run_dir`` holds a run of another configuration (and not ``fresh``).
    """
    # setup
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model.to(cfg.device)
    train_cache, val_cache = train_cache.to(cfg.device), val_cache.to(cfg.device)
    cost = cost.to(cfg.device, torch.float32)
    n = len(train_cache.labels)
    batch_size = min(cfg.batch_size, n)
    batches = Batches(n, batch_size, torch.Generator().manual_seed(cfg.seed))
    opt_im = torch.optim.Adam(model.ims.parameters(), cfg.lr_im, weight_decay=cfg.weight_decay)
    opt_gate = torch.optim.Adam(model.gates.parameters(), cfg.lr_gate)
    modules, optimizers = {"ims": model.ims, "gates": model.gates}, {"im": opt_im, "gate": opt_gate}
    steps_per_epoch = max(1, n // batch_size)
    total_phases = 1 + 2 * cfg.n_rounds
    phase, best, best_state, start = 0, float("inf"), None, time.perf_counter()
    config = run_config if run_config is not None else {"train": dataclasses.asdict(cfg)}
    ckpt = None if run_dir is None else Path(run_dir) / CHECKPOINT
    # resume after the last finished phase of the same run (start_run refuses another config)
    if run_dir is not None and start_run(run_dir, config, fresh=fresh) and checkpoint_exists(ckpt):
        saved = load_checkpoint(ckpt, modules=modules, optimizers=optimizers, device=cfg.device)
        if not config_matches(saved.config, config, ()):
            raise ValueError(
                f"{ckpt}: was written for another configuration than {run_dir}/config.json; "
                "rerun with --fresh to start over"
            )
        phase, best = saved.step, saved.state["best"]
        best = float("inf") if best is None else best
        batches.load_state(saved.tensors, saved.state)
        prefix = "best."
        own = {k[len(prefix) :]: v for k, v in saved.tensors.items() if k.startswith(prefix)}
        best_state = own or None
        log.info("resuming JEI-DNN training at phase %d/%d", phase, total_phases)
    if run_dir is not None:
        truncate_metrics(run_dir, phase)  # records past the checkpoint are logged again
    warm = warmup_weights(model.n_exits).to(cfg.device)
    model.train()
    while phase < total_phases:
        # one phase: IM warm-up, then alternating gate and IM phases
        kind = "warmup" if phase == 0 else ("gate" if phase % 2 == 1 else "im")
        steps = cfg.warmup_epochs * steps_per_epoch if kind == "warmup" else cfg.phase_steps
        opt = opt_gate if kind == "gate" else opt_im
        pos_weight = None
        if kind == "gate":
            pos_weight = _pos_weight(model, val_cache, cost, cfg.lam) ** cfg.balance
        loss = torch.tensor(float("nan"))
        for _ in range(steps):
            batch = train_cache.index(next(batches))
            loss = _phase_loss(kind, model, batch, cost, cfg, warm, pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            fault_point("exits-train-step")  # kill tests: die between two steps
        phase += 1
        # evaluate and keep the best state (gates only exist after the first gate phase)
        score = hard_objective(model, val_cache, cost, cfg.lam) if phase > 1 else float("inf")
        if phase > 1 and score < best:
            best = score
            best_state = {k: v.detach().clone() for k, v in _trainable_state(model).items()}
        # log and checkpoint
        record = {"phase": phase, "kind": kind, "train/loss": float(loss.detach())}
        record["eval/objective"] = score
        log.info("%s", record)
        if run_dir is not None:
            append_metrics(run_dir, {"step": phase} | record)
            batch_tensors, batch_state = batches.state()
            best_tensors = {f"best.{k}": v for k, v in (best_state or {}).items()}
            save_checkpoint(
                ckpt,
                config=config,
                step=phase,
                modules=modules,
                optimizers=optimizers,
                tensors=batch_tensors | best_tensors,
                state={"best": best} | batch_state,
            )
        if progress:
            progress(phase, total_phases)
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    model.eval()
    return {"eval/objective": best, "phases": phase, "seconds": time.perf_counter() - start}


def _trainable_state(model: EarlyExitModel) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith(("ims.", "gates."))}


def _pos_weight(model: EarlyExitModel, val: FeatureCache, cost: torch.Tensor, lam: float):
    """Negatives / positives of each gate's oracle targets on the validation split ``(L-1,)``."""
    with torch.no_grad():
        _, ce = exit_losses(model, val)
        targets = gate_targets(oracle_exit(ce, cost, lam), model.n_exits)  # (N, L-1)
        pos = targets.sum(0).clamp_min(1.0)
        return (len(targets) - targets.sum(0)).clamp_min(1.0) / pos


def clone_exits(model: EarlyExitModel, gate_context: bool | None = None) -> EarlyExitModel:
    """A deep copy sharing nothing with ``model`` (to train several lambdas from one warm-up).

    With ``gate_context`` set to the other value, the copy gets fresh gates of that kind.
    """
    twin = copy.deepcopy(model)
    if gate_context is not None and gate_context != model.gate_context:
        twin.gate_context = gate_context
        with torch.random.fork_rng():
            torch.manual_seed(0)  # fresh gates, initialised the same way every time
            twin.gates = nn.ModuleList(ExitGate(gate_context) for _ in twin.gates)
        twin.to(next(model.parameters()).device)
    return twin


def backbone_digest(path: Path) -> str:
    """SHA-256 of a safetensors file's tensor bytes (its metadata, e.g. timings, left out)."""
    blob = Path(path).read_bytes()
    header = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header :]).hexdigest()


def train_checkpoint(
    backbone: Path,
    data_root: Path,
    out: Path,
    cfg: TrainConfig,
    progress: Progress = None,
    *,
    fresh: bool = False,
) -> dict:
    """Train JEI-DNN for ``cfg.lam`` on a ViT backbone; write ``out`` (+ .json) and a run folder.

    The run folder ``out`` without suffix holds ``config.json`` (the training config and the
    backbone's tensor digest), ``metrics.jsonl`` and the resumable ``train_ckpt.safetensors``; a
    rerun resumes it, one with another configuration or backbone is refused unless ``fresh``.
    """
    out, backbone = Path(out), Path(backbone)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must name a .safetensors file, got {out}")
    load_backbone(backbone)  # a missing, truncated or foreign file fails here, before any work
    run_config = {
        "train": dataclasses.asdict(cfg),
        "backbone_sha256": backbone_digest(backbone),  # the same weights, wherever they lie
    }
    run_dir = out.with_suffix("")
    start_run(run_dir, run_config, fresh=fresh)
    prep = prepare(backbone, data_root, SplitConfig(), cfg.device, cache_dir=backbone.parent)
    caches, cost = prep.caches, prep.flops.fraction
    metrics = train(
        prep.model, caches["exits"], caches["val"], cost, cfg, run_dir, progress,
        run_config=run_config,
    )  # fmt: skip
    meta = {"lam": cfg.lam, "backbone": str(backbone), "train": dataclasses.asdict(cfg)}
    save_exits(prep.model, out, meta | {"metrics": metrics})
    return metrics
