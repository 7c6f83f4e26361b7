"""Real batched early exit, its post-hoc simulation, exit policies and per-exit FLOPs.

After each block, the samples whose policy fires leave the batch and only the rest continue, so
compute really falls (the authors' public code always ran every block). The same
policies can be replayed post hoc on every exit's logits (:func:`simulate_exits`); a test checks
that both give identical exits and predictions.

A policy is a callable ``policy(l, logits, memory) -> (exit_mask, memory)`` for the early exits
``l < L - 1``; ``memory`` is ``None`` or a tensor with one row per live sample, which the engine
shrinks together with the batch (patience needs the previous predictions).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch
from torch import nn

from gatelab import gates as gating
from gatelab.cost import count_flops
from gatelab.exits.model import EarlyExitModel


class ExitResult(NamedTuple):
    """Final logits ``(B, C)`` and the exit each sample left at ``(B,)`` (0-based)."""

    logits: torch.Tensor
    exit_index: torch.Tensor


class GatePolicy:
    """JEI-DNN: leave at the first exit whose hazard gate value ``g_l >= threshold``."""

    def __init__(self, gates: nn.ModuleList, threshold: float = 0.5) -> None:
        self.gates, self.threshold = gates, threshold

    def __call__(self, ell: int, logits: torch.Tensor, memory: torch.Tensor | None):
        """Exit mask of the live samples at exit ``ell``; memory: this exit's probabilities."""
        probs = logits.softmax(-1)
        prev = probs if memory is None else memory
        return self.gates[ell](probs, prev) >= self.threshold, probs


class MaxProbPolicy:
    """Leave when the exit's top softmax probability reaches ``threshold``."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def __call__(self, ell: int, logits: torch.Tensor, memory: torch.Tensor | None):
        """Exit mask of the live samples at exit ``ell`` and the updated memory."""
        return logits.softmax(-1).amax(-1) >= self.threshold, memory


class EntropyPolicy:
    """Leave when the entropy of the exit's softmax is at most ``threshold`` (nats)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def __call__(self, ell: int, logits: torch.Tensor, memory: torch.Tensor | None):
        """Exit mask of the live samples at exit ``ell`` and the updated memory."""
        logp = logits.log_softmax(-1)
        return -(logp.exp() * logp).sum(-1) <= self.threshold, memory


class PatiencePolicy:
    """PABEE (Zhou et al. 2020): leave once ``patience`` consecutive exits agreed on the class.

    ``memory`` holds ``(previous prediction, consecutive agreements)`` per live sample.
    """

    def __init__(self, patience: int) -> None:
        self.patience = patience

    def __call__(self, ell: int, logits: torch.Tensor, memory: torch.Tensor | None):
        """Exit mask of the live samples at exit ``ell`` and the updated memory."""
        pred = logits.argmax(-1)
        if memory is None:
            streak = torch.zeros_like(pred)
        else:
            streak = torch.where(pred == memory[:, 0], memory[:, 1] + 1, 0)
        return streak >= self.patience, torch.stack([pred, streak], dim=-1)


@torch.no_grad()
def run_early_exit(model: EarlyExitModel, x: torch.Tensor, policy) -> ExitResult:
    """Batched inference where exited samples leave the batch after each block.

    Shape:
        x ``(B, ...)`` -> logits ``(B, C)``, exit_index ``(B,)``.
    """
    n_exits = model.n_exits
    out = torch.empty(len(x), model.n_classes, device=x.device)
    exit_index = torch.full((len(x),), n_exits - 1, dtype=torch.long, device=x.device)
    alive = torch.arange(len(x), device=x.device)
    state, memory = model.stem(x), None
    for ell, block in enumerate(model.blocks):
        state = block(state)
        logits = model.exit_logits(ell, state)  # (B_alive, C)
        if ell == n_exits - 1:
            out[alive] = logits.to(out.dtype)
            break
        leave, memory = policy(ell, logits, memory)
        out[alive[leave]] = logits[leave].to(out.dtype)
        exit_index[alive[leave]] = ell
        keep = ~leave
        if not keep.any():
            break
        state, alive = state[keep], alive[keep]
        memory = None if memory is None else memory[keep]
    return ExitResult(out, exit_index)


@torch.no_grad()
def simulate_exits(exit_logits: torch.Tensor, policy) -> ExitResult:
    """Replay ``policy`` on every exit's logits (full compute) and pick each sample's exit.

    Shape:
        exit_logits ``(L, N, C)`` -> logits ``(N, C)``, exit_index ``(N,)``.
    """
    n_exits, n = exit_logits.shape[:2]
    fired, memory = [], None
    for ell in range(n_exits - 1):
        leave, memory = policy(ell, exit_logits[ell], memory)
        fired.append(leave)
    if fired:
        # first_exit takes hazard values; fired exits are 1, others 0
        exit_index = gating.first_exit(torch.stack(fired, dim=-1).float(), 0.5)  # (N,)
    else:
        exit_index = torch.zeros(n, dtype=torch.long, device=exit_logits.device)
    logits = exit_logits[exit_index, torch.arange(n, device=exit_logits.device)]  # (N, C)
    return ExitResult(logits, exit_index)


class ExitFlops(NamedTuple):
    """FLOPs per sample: cumulative cost of leaving at each exit ``(L,)`` and of the backbone."""

    per_exit: torch.Tensor
    backbone: float

    @property
    def fraction(self) -> torch.Tensor:
        """Cost of leaving at each exit as a fraction of the plain backbone ``(L,)``."""
        return self.per_exit / self.backbone


@torch.no_grad()
def exit_flops(model: EarlyExitModel, example: torch.Tensor) -> ExitFlops:
    """Count FLOPs per sample with ``FlopCounterMode``, block by block, for one input.

    Every matmul and convolution is counted with its token dimension, including both attention
    products (the authors' public counter missed the token dimension and attention). Leaving at
    exit ``l`` costs the stem, blocks ``0..l``, and the IMs and gates of exits ``0..l`` (the last
    exit runs the head instead of an IM and gate).
    """
    model.eval()
    x = example[:1]
    state = model.stem(x)
    spent = float(count_flops(model.stem, x))
    backbone = spent
    per_exit = []
    for ell, block in enumerate(model.blocks):
        backbone += count_flops(block, state)
        spent += count_flops(block, state)
        state = block(state)
        if ell == model.n_exits - 1:
            head = count_flops(model.head, state)
            per_exit.append(spent + head)
            backbone += head
        else:
            spent += count_flops(_im_and_gate, model, ell, state)
            per_exit.append(spent)
    return ExitFlops(torch.tensor(per_exit, dtype=torch.float64), backbone)


def _im_and_gate(model: EarlyExitModel, ell: int, state: torch.Tensor) -> torch.Tensor:
    return model.gates[ell](model.exit_logits(ell, state).softmax(-1))


@torch.no_grad()
def time_pair(fn_a, fn_b, batches: list[torch.Tensor], repeats: int = 3) -> tuple[float, float]:
    """Median seconds of ``fn_a`` and ``fn_b`` over ``batches``, timed in alternation.

    Alternating the two within each repeat exposes both to the same load on a shared machine.
    """
    fn_a(batches[0])
    fn_b(batches[0])
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(_seconds_over(fn_a, batches))
        times_b.append(_seconds_over(fn_b, batches))
    return _median(times_a), _median(times_b)


@torch.no_grad()
def time_inference(fn, batches: list[torch.Tensor], repeats: int = 3) -> float:
    """Median over ``repeats`` of the wall-clock seconds to run ``fn`` over all ``batches``."""
    fn(batches[0])  # warm-up
    return _median([_seconds_over(fn, batches) for _ in range(repeats)])


def _seconds_over(fn, batches: list[torch.Tensor]) -> float:
    """Wall-clock seconds of one pass of ``fn`` over ``batches`` (CUDA work included)."""
    start = time.perf_counter()
    for batch in batches:
        fn(batch)
    if batches[0].is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _median(times: list[float]) -> float:
    return sorted(times)[len(times) // 2]
