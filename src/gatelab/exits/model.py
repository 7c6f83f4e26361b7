r"""Backbones with early exits: a small ViT, and a generic wrapper for any block sequence.

JEI-DNN (Regol, Chataoui, Coates, ICLR 2024, arXiv:2310.09163) freezes a pretrained backbone of
``L`` blocks and attaches, after every block but the last, an *inference module* (IM, a linear
classifier on the normalised pooled/CLS feature) and a *gating module* (GM, a linear layer and a
sigmoid on four gradient-free confidence features of the IM's softmax). The last exit is the
backbone's own head.

Exit probabilities use one consistent parameterisation, the hazard form of
:func:`gatelab.gates.exit_probabilities`: the gate value :math:`g_l` is the probability of leaving
at exit :math:`l` *given* the sample reached it, so

.. math::
    P_l = g_l \prod_{j<l} (1 - g_j),\qquad P_L = \prod_{j<L} (1 - g_j),

and at test time a sample leaves at the first :math:`l` with :math:`g_l \ge 0.5`
(:func:`gatelab.gates.first_exit`). The authors' code reads :math:`g_l` as a marginal probability
while training it on cumulative targets (papers.md §4.1); the gate targets :math:`1[l \ge l^*]`
used in :mod:`gatelab.exits.train` are exactly the hazard's conditional targets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

N_GATE_FEATURES = 4  # max prob, entropy, top-2 margin, entropy of squared-renormalised probs
N_CONTEXT_FEATURES = 2  # optional: agreement with the previous exit, its max prob


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
    ``FlopCounterMode`` sees both attention products on every backend (papers.md §4.4 (2)).

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


def global_pool(state: torch.Tensor) -> torch.Tensor:
    """Spatial mean of a CNN feature map: ``(B, C, H, W)`` -> ``(B, C)``."""
    return state.mean(dim=(2, 3))


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


def confidence_features(probs: torch.Tensor) -> torch.Tensor:
    r"""The four gradient-free confidence features of JEI-DNN's gates (papers.md §4.1).

    Max probability, entropy :math:`-\sum p\log p`, top-2 margin :math:`p_{(1)} - p_{(2)}`, and the
    entropy of the squared-renormalised probabilities :math:`p^2 / \sum p^2`. Computed under
    ``no_grad`` semantics (the input is detached): gates never push gradients into the IMs.

    Shape:
        probs ``(B, C)`` -> ``(B, 4)``.
    """
    p = probs.detach()
    top2 = p.topk(2, dim=-1).values  # (B, 2)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)  # (B,)
    sq = p.square() / p.square().sum(-1, keepdim=True)  # (B, C)
    sq_entropy = -(sq * sq.clamp_min(1e-12).log()).sum(-1)  # (B,)
    return torch.stack([top2[:, 0], entropy, top2[:, 0] - top2[:, 1], sq_entropy], dim=-1)


def context_features(probs: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Gatelab's optional gate features: does the previous exit agree, and how sure was it.

    ``1[argmax p = argmax p_prev]`` and ``max p_prev`` (the signal PABEE's patience uses). For
    the first exit pass ``prev = probs``. Detached like :func:`confidence_features`.

    Shape:
        probs, prev ``(B, C)`` -> ``(B, 2)``.
    """
    p, q = probs.detach(), prev.detach()
    agree = (p.argmax(-1) == q.argmax(-1)).to(p.dtype)
    return torch.stack([agree, q.amax(-1)], dim=-1)


class ExitGate(nn.Module):
    r"""Gating module: :math:`g = \sigma(w^\top f(p) + b)` on the confidence features of one IM.

    With ``context=True`` the features also include :func:`context_features` of the previous
    exit (a gatelab addition, measured against the paper's four in the README).

    Shape:
        probs, prev ``(B, C)`` -> hazard gate values ``(B,)`` in (0, 1).
    """

    def __init__(self, context: bool = False) -> None:
        super().__init__()
        self.context = context
        self.linear = nn.Linear(N_GATE_FEATURES + N_CONTEXT_FEATURES * context, 1)

    def forward(self, probs: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """Gate values; ``prev`` (the previous exit's probabilities) is used only with context."""
        features = confidence_features(probs)
        if self.context:
            prev = probs if prev is None else prev
            features = torch.cat([features, context_features(probs, prev)], dim=-1)
        return torch.sigmoid(self.linear(features)).squeeze(-1)

    def extra_repr(self) -> str:
        """Whether the gate reads the previous exit."""
        return f"context={self.context}"


class EarlyExitModel(nn.Module):
    """Any frozen block sequence with an IM and a GM after every block but the last.

    Args:
        blocks: the backbone's ``L`` blocks, each mapping a state to the next state.
        head: the backbone's own classifier on the final state (the last exit).
        feature_fn: pooled feature of a state, e.g. :func:`cls_token` or :func:`global_pool`.
        d_features: width of ``feature_fn``'s output after each of the first ``L - 1`` blocks
            (one int if all are equal).
        n_classes: number of classes ``C``.
        stem: optional module applied to the input before the first block.
        arch: a name stored in checkpoints, so a checkpoint of another backbone is refused.
        gate_context: gates also read the previous exit (:func:`context_features`).

    The backbone (``stem``, ``blocks``, ``head``) is frozen and always kept in eval mode; only the
    IMs (``ims``) and gates (``gates``) train. ``train()``/``eval()`` change nothing else.

    Shape:
        input ``(B, ...)`` -> exit logits ``(L, B, C)`` (:meth:`all_exit_logits`).
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        head: nn.Module,
        feature_fn: Callable[[torch.Tensor], torch.Tensor],
        d_features: int | Sequence[int],
        n_classes: int,
        stem: nn.Module | None = None,
        arch: str = "custom",
        gate_context: bool = False,
    ) -> None:
        super().__init__()
        if len(blocks) < 2:
            raise ValueError(f"EarlyExitModel needs >= 2 blocks, got {len(blocks)}")
        n_exits = len(blocks) - 1
        if isinstance(d_features, int):
            d_features = [d_features] * n_exits
        if len(d_features) != n_exits:
            raise ValueError(
                f"EarlyExitModel: d_features needs {n_exits} widths (one per early exit), "
                f"got {len(d_features)}"
            )
        self.stem = stem if stem is not None else nn.Identity()
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.feature_fn = feature_fn
        self.n_classes = n_classes
        self.arch = arch
        self.ims = nn.ModuleList(ClassifierHead(d, n_classes) for d in d_features)
        self.gate_context = gate_context
        self.gates = nn.ModuleList(ExitGate(gate_context) for _ in range(n_exits))
        for module in (self.stem, self.blocks, self.head):
            module.requires_grad_(False)
        self.train()

    @property
    def n_exits(self) -> int:
        """Number of exits ``L`` (the last is the backbone's head)."""
        return len(self.blocks)

    def train(self, mode: bool = True) -> EarlyExitModel:
        """Set IMs and gates to ``mode``; the frozen backbone stays in eval mode."""
        super().train(mode)
        for module in (self.stem, self.blocks, self.head):
            module.eval()
        return self

    def exit_logits(self, ell: int, state: torch.Tensor) -> torch.Tensor:
        """Logits of exit ``l`` from the state after block ``l``: ``(B, ...)`` -> ``(B, C)``."""
        if ell == self.n_exits - 1:
            return self.head(state)
        return self.ims[ell](self.feature_fn(state))

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Pooled features after blocks ``0..L-2`` and the head's logits, with full compute.

        Training JEI-DNN only needs these (the backbone is frozen), so they are computed once.
        """
        state = self.stem(x)
        feats = []
        for ell, block in enumerate(self.blocks):
            state = block(state)
            if ell < self.n_exits - 1:
                feats.append(self.feature_fn(state))  # (B, D_l)
        return feats, self.head(state)

    def logits_from_features(
        self, feats: Sequence[torch.Tensor], head_logits: torch.Tensor
    ) -> torch.Tensor:
        """Stack every exit's logits from cached features: ``(L, B, C)``."""
        early = [im(f) for im, f in zip(self.ims, feats, strict=True)]
        return torch.stack([*early, head_logits])

    def all_exit_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every exit with full computation: ``(L, B, C)``."""
        return self.logits_from_features(*self.features(x))

    def gate_values(self, exit_logits: torch.Tensor) -> torch.Tensor:
        """Hazard gate values of the early exits: logits ``(L, B, C)`` -> ``(B, L-1)``."""
        probs = exit_logits[:-1].softmax(-1)  # (L-1, B, C)
        prev = torch.cat([probs[:1], probs[:-1]])  # previous exit's probs; the first sees itself
        values = [gate(p, q) for gate, p, q in zip(self.gates, probs, prev, strict=True)]
        return torch.stack(values, dim=-1)  # (B, L-1)

    def backbone_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The plain backbone, no exits: the full-cost reference. ``(B, ...)`` -> ``(B, C)``."""
        state = self.stem(x)
        for block in self.blocks:
            state = block(state)
        return self.head(state)


def vit_early_exit(vit: ViT, gate_context: bool = False) -> EarlyExitModel:
    """Wrap a (pretrained) :class:`ViT` with exits after its first ``n_blocks - 1`` blocks."""
    cfg = vit.cfg
    return EarlyExitModel(
        list(vit.blocks),
        vit.head,
        cls_token,
        cfg.d_model,
        cfg.n_classes,
        stem=vit.embed,
        arch="vit",
        gate_context=gate_context,
    )
