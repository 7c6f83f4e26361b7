r"""Early exits on any frozen block sequence (the small ViT itself is in :mod:`gatelab.exits.vit`).

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
while training it on cumulative targets (arXiv:2310.09163); the gate targets :math:`1[l \ge l^*]`
used in :mod:`gatelab.exits.train` are exactly the hazard's conditional targets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from gatelab.exits.vit import ClassifierHead, ViT, cls_token

N_GATE_FEATURES = 4  # max prob, entropy, top-2 margin, entropy of squared-renormalised probs
N_CONTEXT_FEATURES = 2  # optional: agreement with the previous exit, its max prob


def global_pool(state: torch.Tensor) -> torch.Tensor:
    """Spatial mean of a CNN feature map: ``(B, C, H, W)`` -> ``(B, C)``."""
    return state.mean(dim=(2, 3))


def confidence_features(probs: torch.Tensor) -> torch.Tensor:
    r"""The four gradient-free confidence features of JEI-DNN's gates (arXiv:2310.09163).

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
