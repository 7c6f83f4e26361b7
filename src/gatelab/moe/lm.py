"""A small decoder-only byte-level language model whose feed-forward layers are SparseMoE or dense.

Used by ``gatelab moe train`` to compare a routed model with a dense one of equal *active*
parameters (the dense FFN is ``top_k * d_hidden`` wide, so each token runs through the same
number of expert weights; the router's ``E * D`` weights per layer are the only extra active
parameters). Corpus: the Python standard library's own ``.py`` files, present on every machine.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gatelab.moe.model import ROUTERS, SparseMoE


@dataclass(frozen=True)
class MoEConfig:
    """Architecture of :class:`TinyLM` (byte-level, so the vocabulary is fixed at 256)."""

    ffn: str = "moe"  # "moe" (SparseMoE FFN) or "dense" (SwiGLU of width top_k * d_hidden)
    d_model: int = 128  # D, residual width
    n_layers: int = 2  # transformer blocks
    n_heads: int = 4  # attention heads; d_model must be divisible by it
    seq_len: int = 128  # T, context in bytes
    n_experts: int = 8  # E
    top_k: int = 2  # K experts per token
    d_hidden: int = 128  # H per expert; the dense FFN is top_k * d_hidden wide
    router: str = "softmax"  # SparseMoE router
    capacity_factor: float | None = None  # None: dropless
    balance_coef: float = 0.01  # Switch loss weight (Fedus et al. use 0.01)
    z_coef: float = 1e-3  # router z-loss weight (Zoph et al. use 1e-3)

    def __post_init__(self) -> None:
        if self.ffn not in ("moe", "dense"):
            raise ValueError(f"MoEConfig.ffn must be 'moe' or 'dense', got {self.ffn!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"MoEConfig.router must be one of {ROUTERS}, got {self.router!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"MoEConfig: d_model={self.d_model} must be divisible by n_heads={self.n_heads}"
            )
        for name in ("d_model", "n_layers", "seq_len", "d_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(
                f"MoEConfig.top_k must be in [1, n_experts={self.n_experts}], got {self.top_k}"
            )

    @property
    def vocab_size(self) -> int:
        """Bytes."""
        return 256


class DenseFFN(nn.Module):
    r"""SwiGLU feed-forward :math:`(\operatorname{silu}(xW_g) \odot xW_u) W_d` of width ``H``."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(d_model, d_hidden, bias=False)
        self.w_up = nn.Linear(d_model, d_hidden, bias=False)
        self.w_down = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then the (routed or dense) FFN."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.norm1, self.norm2 = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        if cfg.ffn == "moe":
            self.ffn = SparseMoE(
                cfg.d_model, cfg.d_hidden, cfg.n_experts, cfg.top_k, router=cfg.router,
                capacity_factor=cfg.capacity_factor, balance_coef=cfg.balance_coef,
                z_coef=cfg.z_coef,
            )  # fmt: skip
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.top_k * cfg.d_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.n_heads, -1).unbind(2)  # (B,T,nh,hs)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )  # (B, nh, T, hs)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.ffn(self.norm2(x))


class TinyLM(nn.Module):
    """Byte-level GPT with learned positions. Shape: tokens ``(B, T)`` -> logits ``(B, T, 256)``."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.seq_len, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]  # (B, T, D)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))  # (B, T, 256)

    def moe_layers(self) -> list[SparseMoE]:
        """The routed FFNs (empty for the dense model)."""
        return [b.ffn for b in self.blocks if isinstance(b.ffn, SparseMoE)]

    def aux_loss(self) -> torch.Tensor:
        """Sum of every routed layer's weighted auxiliary loss from the latest forward."""
        return sum((m.last_stats.aux_loss for m in self.moe_layers()), torch.zeros(()))

    def active_parameters(self) -> int:
        """Parameters one token runs through: experts count ``top_k / n_experts`` of theirs."""
        total, routed = 0, self.cfg.ffn == "moe"
        for name, p in self.named_parameters():
            share = self.cfg.top_k / self.cfg.n_experts if routed and ".ffn.w_" in name else 1.0
            total += round(p.numel() * share)
        return total


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The corpus files in a fixed order: ``*.py`` directly under ``root`` (default: the stdlib)."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus directory {root} does not exist")
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if len(files) < 10:
        raise ValueError(f"corpus directory {root} has {len(files)} .py files; need at least 10")
    return files


def load_corpus(
    root: Path | None = None, max_bytes: int = 2_000_000, heldout_every: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte tensors (train, held-out): every ``heldout_every``-th file is held out, whole.

    Splitting by file keeps held-out text unseen (no shared windows across the boundary). Each
    split is capped at ``max_bytes`` (held out at ``max_bytes // heldout_every``).
    """
    train, heldout = bytearray(), bytearray()
    for i, path in enumerate(stdlib_files(root)):
        part, cap = (heldout, max_bytes // heldout_every) if i % heldout_every == 0 else (
            train, max_bytes
        )  # fmt: skip
        if len(part) < cap:
            part.extend(path.read_bytes()[: cap - len(part)])
    as_tensor = lambda b: torch.from_numpy(np.frombuffer(bytes(b), np.uint8).astype(np.int64))  # noqa: E731
    return as_tensor(train), as_tensor(heldout)
