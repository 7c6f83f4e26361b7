"""Train the MoE² gate once, on all experts, by minimising the mixture's cross-entropy.

Loss (MoE², arXiv:2501.09410): ``-log sum_i w_i(x) p_i(y* | x)`` over the training questions, dense
weights over the experts that answered (``top_k = E`` while training; top-k is applied at
inference inside whatever subset is selected). Full-batch Adam with early stopping on the
validation loss; the best validation state is kept.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch

from gatelab.edge.model import EdgeGate, GateConfig, mixture, mixture_nll, subset_mask
from gatelab.threads import torch_threads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of the gate."""

    lr: float = 3e-3  # Adam step size
    weight_decay: float = 1e-3  # AdamW decoupled decay
    max_steps: int = 400  # full-batch steps
    patience: int = 60  # steps without validation improvement before stopping
    d_hidden: int = 64  # gate hidden width (GateConfig.d_hidden)
    dropout: float = 0.1  # gate dropout (GateConfig.dropout)
    seed: int = 0  # seeds the initialisation and dropout
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0 or self.max_steps < 1 or self.patience < 1:
            raise ValueError(
                f"TrainConfig: need lr > 0, weight_decay >= 0, steps, patience >= 1: {self}"
            )


@dataclass(frozen=True)
class GateData:
    """Gate data: embeddings ``x (N, D)``, expert distributions ``probs (N, E, C)``.

    Also ``available (N, E)`` (which experts answered) and the gold option ``answer (N,)``.
    """

    x: np.ndarray
    probs: np.ndarray
    available: np.ndarray
    answer: np.ndarray

    def tensors(self, device: str) -> tuple[torch.Tensor, ...]:
        """As float64/bool/long tensors on ``device``."""
        return (
            torch.as_tensor(self.x, dtype=torch.float64, device=device),
            torch.as_tensor(self.probs, dtype=torch.float64, device=device),
            torch.as_tensor(self.available, dtype=torch.bool, device=device),
            torch.as_tensor(self.answer, dtype=torch.long, device=device),
        )


def evaluate_gate(
    gate: EdgeGate, data: GateData, subset: frozenset[int] | None = None, top_k: int | None = None
) -> dict[str, float]:
    """Cross-entropy and accuracy of the gated mixture restricted to ``subset`` (default: all)."""
    n_experts = data.probs.shape[1]
    device = next(gate.parameters()).device.type
    x, probs, available, answer = data.tensors(device)
    allowed = available & subset_mask(
        subset if subset is not None else range(n_experts), n_experts
    ).to(device)
    gate.eval()
    with torch.no_grad():
        mixed, _ = mixture(gate(x), probs, allowed, top_k or n_experts)
    accuracy = (mixed.argmax(-1) == answer).double().mean()
    return {"nll": float(mixture_nll(mixed, answer)), "accuracy": float(accuracy)}


@torch_threads(1)  # tiny tensors: one thread is fastest (see gatelab.edge.model)
def train_gate(
    train: GateData,
    val: GateData,
    cfg: TrainConfig = TrainConfig(),
    subset: frozenset[int] | None = None,
) -> tuple[EdgeGate, list[dict[str, float]]]:
    """Fit an :class:`EdgeGate` (over all ``E`` experts; only ``subset`` if given).

    Returns:
        The gate at its best validation loss, and the per-step history
        (``train/nll``, ``eval/nll``).
    """
    # setup
    torch.manual_seed(cfg.seed)
    n_experts = train.probs.shape[1]
    gate = (
        EdgeGate(GateConfig(n_experts, train.x.shape[1], cfg.d_hidden, cfg.dropout))
        .double()
        .to(cfg.device)
    )
    optimiser = torch.optim.AdamW(gate.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    mask = subset_mask(subset if subset is not None else range(n_experts), n_experts).to(cfg.device)
    x, probs, available, answer = train.tensors(cfg.device)
    allowed = available & mask
    best, best_state, since, history = np.inf, copy.deepcopy(gate.state_dict()), 0, []
    for step in range(cfg.max_steps):
        # update
        gate.train()
        mixed, _ = mixture(gate(x), probs, allowed, n_experts)
        loss = mixture_nll(mixed, answer)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        # log
        val_nll = evaluate_gate(gate, val, subset)["nll"]
        history.append({"step": step, "train/nll": float(loss.detach()), "eval/nll": val_nll})
        if val_nll < best - 1e-6:
            best, best_state, since = val_nll, copy.deepcopy(gate.state_dict()), 0
        else:
            since += 1
            if since >= cfg.patience:
                break
    gate.load_state_dict(best_state)
    gate.eval()
    log.info("gate trained: %d steps, best eval/nll %.4f", len(history), best)
    return gate, history
