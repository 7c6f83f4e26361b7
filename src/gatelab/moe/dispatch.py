r"""Sort-based dispatch plans: which rows each expert runs, grouped by expert (no one-hot tensors).

A routed layer does three things: *dispatch* (copy each token once per selected expert, rows
grouped by expert), *experts* (one grouped computation over all experts) and *combine* (scale each
row by its gate weight and scatter-add it back to its token). This file computes the plan once
(a stable sort of the expert ids); :func:`gatelab.moe.experts.routed_experts` runs the other two
steps, forward and backward, from it. This is the MegaBlocks / ScatterMoE scheme
(arXiv:2211.15841 §3; arXiv:2403.08245 §2): memory is ``O(N K D)``, never the GShard ``(N, E, C)``
dispatch tensor. Dropless plans have static shapes (``M = N K``, no host sync), so
``torch.compile`` traces them in one graph.

Drop order under a capacity ``C`` (GShard, arXiv:2006.16668 Alg. 1; ST-MoE, arXiv:2202.08906 §2):
each expert keeps the first ``C`` assignments in *choice-major* order — every token's first choice
(in token order) before any token's second choice, and so on. Dropped assignments add nothing to
their token's output and the kept weights are not renormalised.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Dispatch(NamedTuple):
    """Routed rows grouped by expert; the gate weights travel separately as a dense ``(N, E)``.

    Attributes:
        token_index: ``(M,)`` long, the source token of each row, rows sorted by expert.
        expert_index: ``(M,)`` long, the expert of each row (non-decreasing).
        counts: ``(E,)`` long, rows per expert (after dropping); they sum to ``M``.
        n_dropped: number of assignments dropped by the capacity limit (0 when dropless).
    """

    token_index: torch.Tensor
    expert_index: torch.Tensor
    counts: torch.Tensor
    n_dropped: int

    def row_weights(self, gates: torch.Tensor) -> torch.Tensor:
        """Each row's gate ``G[token, expert]``. Shape: gates ``(N, E)`` -> ``(M,)``."""
        return gates[self.token_index, self.expert_index]


def dispatch_topk(
    indices: torch.Tensor,
    n_experts: int,
    capacity: int | None = None,
    ahead: torch.Tensor | None = None,
) -> Dispatch:
    """Group token-choice assignments by expert, dropping past ``capacity`` in choice-major order.

    Args:
        indices: the experts each token chose.
        n_experts: ``E``.
        capacity: rows each expert keeps (None: dropless).
        ahead: assignments of *other* tokens (other ranks' tokens, in expert parallelism) that
            precede this batch's choice-``j`` assignments in expert ``e``'s queue; None: zero.

    Shape:
        indices ``(N, K)``, ahead ``(K, E)`` -> rows ``M <= N K``.
    """
    n_tokens = indices.shape[0]
    flat_expert = indices.T.reshape(-1)  # (K N,) choice-major: all first choices, then second...
    expert, order = torch.sort(flat_expert, stable=True)  # (K N,) stable: choice-major kept
    counts = expert_counts(flat_expert, n_experts)  # (E,)
    n_dropped = 0
    if capacity is not None:
        starts = counts.cumsum(0) - counts  # (E,) first row of each expert's segment
        rank = torch.arange(order.numel(), device=order.device) - starts[expert]  # in queue
        if ahead is not None:
            rank = rank + ahead[order // n_tokens, expert]  # (K N,) choice of each row = order // N
        keep = rank < capacity  # (K N,)
        order, expert = order[keep], expert[keep]  # (M,)
        n_dropped = flat_expert.numel() - order.numel()
        counts = expert_counts(expert, n_experts)  # (E,) kept rows
    return Dispatch(order % n_tokens, expert, counts, n_dropped)


def expert_counts(expert_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Rows per expert, ``bincount`` with a static shape (``bincount``'s depends on the data).

    Shape:
        expert_ids ``(...)`` long in ``[0, E)`` -> ``(E,)`` long.
    """
    flat = expert_ids.reshape(-1)
    return flat.new_zeros(n_experts).scatter_add_(0, flat, torch.ones_like(flat))


def dispatch_expert_choice(taken: torch.Tensor) -> Dispatch:
    """Expert-choice rows: every ``(token, expert)`` pair with ``taken`` set, grouped by expert.

    Shape:
        taken ``(N, E)`` bool -> rows ``M = taken.sum()``.
    """
    expert, token = taken.T.nonzero(as_tuple=True)  # (M,) sorted by expert, then token
    return Dispatch(token, expert, taken.sum(0), 0)
