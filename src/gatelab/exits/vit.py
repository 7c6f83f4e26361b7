"""A small ViT for 28x28 images: patch embedding, pre-norm blocks, a CLS-token head.

Attention uses explicit matmuls so that ``FlopCounterMode`` counts both attention products on
every backend. :func:`gatelab.exits.model.vit_early_exit` wraps a pretrained
:class:`ViT` with exits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of the Fashion-MNIST ViT (sized to pretrain in minutes on two CPU cores)."""

    image_size: int = 28  # Fashion-MNIST is 28x28 grey
    patch_size: int = 4  # 7x7 = 49 patch tokens + CLS
    in_channels: int = 1
    d_model: int = 48  # token width D (sized for ~2 min/epoch on one CPU core)
    n_heads: int = 4  # head width 12
    n_blocks: int = 6  # transformer blocks = exits (the issue asks for >= 6)
    mlp_ratio: float = 2.0  # hidden width H = mlp_ratio * D (2 instead of 4: half the FLOPs)
    n_classes: int = 10

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ViTConfig: patch_size={self.patch_size} must divide image_size={self.image_size}"
            )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ViTConfig: n_heads={self.n_heads} must divide d_model={self.d_model}"
            )
        if self.n_blocks < 2:
            raise ValueError(f"ViTConfig: n_blocks must be >= 2 for exits, got {self.n_blocks}")

    @property
    def n_tokens(self) -> int:
        """Tokens T including CLS."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def d_hidden(self) -> int:
        """MLP hidden width H."""
        return int(self.mlp_ratio * self.d_model)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, a learned CLS token and learned positions.

    Shape:
        ``(B, C_in, S, S)`` -> ``(B, T, D)`` with ``T = (S / patch)^2 + 1``.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.d_model, cfg.patch_size, cfg.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.pos = nn.Parameter(torch.zeros(1, cfg.n_tokens, cfg.d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal(0.02) CLS and positions, as in ViT (Dosovitskiy et al. 2021)."""
        nn.init.trunc_normal_(self.cls, std=0.02)
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the module; shapes as in the class docstring."""
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # (B, T-1, D)
        cls = self.cls.expand(len(x), -1, -1)  # (B, 1, D)
        return torch.cat([cls, tokens], dim=1) + self.pos  # (B, T, D)


class Attention(nn.Module):
    r"""Multi-head self-attention written with explicit matmuls.

    :math:`\mathrm{softmax}(QK^\top/\sqrt{d_h})V`. Plain matmuls (not the fused kernel) so that
    ``FlopCounterMode`` sees both attention products on every backend.

    Shape:
        ``(B, T, D)`` -> ``(B, T, D)``.
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the module; shapes as in the class docstring."""
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.n_heads, d // self.n_heads)  # (B, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, T, hs)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.n_heads)  # (B, nh, T, T)
        out = scores.softmax(-1) @ v  # (B, nh, T, hs)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))  # (B, T, D)

    def extra_repr(self) -> str:
        """The number of heads, for ``print(model)``."""
        return f"n_heads={self.n_heads}"


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``.

    Shape:
        ``(B, T, D)`` -> ``(B, T, D)``.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.d_hidden), nn.GELU(), nn.Linear(cfg.d_hidden, cfg.d_model)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the module; shapes as in the class docstring."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClassifierHead(nn.Module):
    """LayerNorm then a linear classifier on a pooled feature ``(B, D)`` -> logits ``(B, C)``."""

    def __init__(self, d_in: int, n_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_in)
        self.linear = nn.Linear(d_in, n_classes)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """Apply the module; shapes as in the class docstring."""
        return self.linear(self.norm(feature))


def cls_token(state: torch.Tensor) -> torch.Tensor:
    """The CLS token of a ViT state: ``(B, T, D)`` -> ``(B, D)``."""
    return state[:, 0]


class ViTHead(nn.Module):
    """The ViT's own head: classifier on the CLS token of the final state."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.classifier = ClassifierHead(cfg.d_model, cfg.n_classes)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        """Apply the module; shapes as in the class docstring."""
        return self.classifier(cls_token(state))


class ViT(nn.Module):
    """Small ViT for 28x28 images: patch embedding, ``n_blocks`` pre-norm blocks, CLS head.

    Shape:
        ``(B, 1, 28, 28)`` -> logits ``(B, C)``.
    """

    def __init__(self, cfg: ViTConfig = ViTConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_blocks))
        self.head = ViTHead(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the module; shapes as in the class docstring."""
        state = self.embed(x)
        for block in self.blocks:
            state = block(state)
        return self.head(state)
