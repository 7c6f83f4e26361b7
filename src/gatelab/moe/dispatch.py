r"""Sort-based token dispatch and grouped expert computation (no one-hot tensors, no token loops).

A routed layer does three things: *dispatch* (copy each token once per selected expert, rows
grouped by expert), *experts* (one grouped computation over all experts) and *combine* (scale each
row by its gate weight and scatter-add it back to its token). This is the MegaBlocks / ScatterMoE
scheme (arXiv:2211.15841 §3; arXiv:2403.08245 §2): memory is ``O(N K D)``, never the GShard
``(N, E, C)`` dispatch tensor.

Drop order under a capacity ``C`` (GShard, arXiv:2006.16668 Alg. 1; ST-MoE, arXiv:2202.08906 §2):
each expert keeps the first ``C`` assignments in *choice-major* order — every token's first choice
(in token order) before any token's second choice, and so on. Dropped assignments add nothing to
their token's output and the kept weights are not renormalised.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "grouped_mm", "loop", "padded")
# public name from torch 2.12 on; the private op has the same signature in 2.8-2.11
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Dispatch(NamedTuple):
    """Routed rows grouped by expert.

    Attributes:
        token_index: ``(M,)`` long, the source token of each row, rows sorted by expert.
        weight: ``(M,)`` gate weight of each row.
        counts: ``(E,)`` long, rows per expert (after dropping); they sum to ``M``.
        n_dropped: number of assignments dropped by the capacity limit (0 when dropless).
    """

    token_index: torch.Tensor
    weight: torch.Tensor
    counts: torch.Tensor
    n_dropped: int


def dispatch_topk(
    weights: torch.Tensor, indices: torch.Tensor, n_experts: int, capacity: int | None = None
) -> Dispatch:
    """Group token-choice assignments by expert, dropping past ``capacity`` in choice-major order.

    Shape:
        weights, indices ``(N, K)`` -> rows ``M <= N K``.
    """
    n_tokens = indices.shape[0]
    flat_expert = indices.T.reshape(-1)  # (K N,) choice-major: all first choices, then second...
    order = torch.sort(flat_expert, stable=True).indices  # (K N,) stable keeps choice-major order
    counts = torch.bincount(flat_expert, minlength=n_experts)  # (E,)
    n_dropped = 0
    if capacity is not None:
        starts = counts.cumsum(0) - counts  # (E,) first row of each expert's segment
        rank = torch.arange(order.numel(), device=order.device) - starts[flat_expert[order]]
        keep = rank < capacity  # (K N,)
        order = order[keep]  # (M,)
        kept = counts.clamp(max=capacity)
        n_dropped = int(counts.sum() - kept.sum())
        counts = kept
    token_index = order % n_tokens  # (M,)
    weight = weights.T.reshape(-1)[order]  # (M,)
    return Dispatch(token_index, weight, counts, n_dropped)


def dispatch_expert_choice(weights: torch.Tensor, token_indices: torch.Tensor) -> Dispatch:
    """Expert-choice routing is already grouped: expert ``e`` owns row block ``e`` of ``(E, C)``."""
    n_experts, capacity = token_indices.shape
    counts = torch.full((n_experts,), capacity, dtype=torch.long, device=token_indices.device)
    return Dispatch(token_indices.reshape(-1), weights.reshape(-1), counts, 0)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``grouped_mm``'s CPU backward rejects expanded (stride-0) gradients such as the one
    ``y.sum().backward()`` produces.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad.contiguous()


def _grouped(xs: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(_GROUPED_MM(xs, w, offs=offsets))


def _activate(gate: torch.Tensor | None, up: torch.Tensor, activation: str) -> torch.Tensor:
    return F.silu(gate) * up if activation == "swiglu" else F.gelu(up)


def resolve_backend(backend: str, dtype: torch.dtype, *widths: int) -> str:
    """``auto`` -> ``grouped_mm`` where the build supports it, else ``fallback`` (decided per call).

    torch 2.13's ``grouped_mm`` takes float32/bfloat16/float16 (no float64) and needs every row
    stride to be a multiple of 16 bytes. Measured on the 2-core CPU (1 thread, CPU time, fwd+bwd,
    2048 tokens, D=128, H=256, top-2, float64): segment loop 0.094 s vs padded bmm 0.107 s at
    E=8, but 1.02 s vs 0.17 s at E=64; so the fallback pads when padding at most doubles the rows.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    supported = (
        _GROUPED_MM is not None
        and dtype in _GROUPED_DTYPES
        and all(w * torch.empty((), dtype=dtype).element_size() % 16 == 0 for w in widths)
    )
    if backend == "auto":
        return "grouped_mm" if supported else "fallback"
    if backend == "grouped_mm" and not supported:
        raise ValueError(
            f"backend='grouped_mm' needs dtype in {_GROUPED_DTYPES} and widths {widths} whose rows "
            f"are multiples of 16 bytes, got {dtype}; use 'loop'"
        )
    return backend


def expert_forward(
    xs: torch.Tensor,
    counts: torch.Tensor,
    w_gate: torch.Tensor | None,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str = "swiglu",
    backend: str = "auto",
) -> torch.Tensor:
    r"""Run every expert FFN on its contiguous block of rows in one grouped computation.

    SwiGLU: :math:`y = (\operatorname{silu}(x W_g) \odot x W_u) W_d`; GELU:
    :math:`y = \operatorname{gelu}(x W_u) W_d` (``w_gate`` is None).

    Shape:
        xs ``(M, D)`` grouped by expert, counts ``(E,)``, w_gate/w_up ``(E, D, H)``, w_down
        ``(E, H, D)`` -> ``(M, D)``.
    """
    backend = resolve_backend(backend, xs.dtype, xs.shape[1], w_up.shape[2])
    if backend == "grouped_mm":
        offsets = counts.cumsum(0).to(torch.int32)  # (E,) end of each expert's rows
        gate = _grouped(xs, w_gate, offsets) if w_gate is not None else None  # (M, H)
        hidden = _activate(gate, _grouped(xs, w_up, offsets), activation)  # (M, H)
        return _grouped(hidden, w_down, offsets)  # (M, D)
    if backend == "fallback":
        width = int(counts.max()) if counts.numel() else 0
        backend = "padded" if counts.numel() * width <= 2 * xs.shape[0] else "loop"
    if backend == "padded":
        return _padded_forward(xs, counts, w_gate, w_up, w_down, activation)
    outputs = []
    for e, rows in enumerate(torch.split(xs, counts.tolist())):
        if rows.shape[0] == 0:
            continue
        gate = rows @ w_gate[e] if w_gate is not None else None  # (M_e, H)
        outputs.append(_activate(gate, rows @ w_up[e], activation) @ w_down[e])  # (M_e, D)
    return torch.cat(outputs) if outputs else xs.new_zeros(0, w_down.shape[-1])


def _padded_forward(xs, counts, w_gate, w_up, w_down, activation) -> torch.Tensor:
    n_experts, width = counts.numel(), int(counts.max()) if counts.numel() else 0
    expert = torch.repeat_interleave(torch.arange(n_experts, device=xs.device), counts)  # (M,)
    slot = torch.arange(xs.shape[0], device=xs.device) - (counts.cumsum(0) - counts)[expert]
    padded = xs.new_zeros(n_experts, width, xs.shape[1]).index_put((expert, slot), xs)  # (E, C, D)
    gate = torch.bmm(padded, w_gate) if w_gate is not None else None  # (E, C, H)
    out = torch.bmm(_activate(gate, torch.bmm(padded, w_up), activation), w_down)  # (E, C, D)
    return out[expert, slot]  # (M, D)


def combine(
    rows: torch.Tensor, dispatch: Dispatch, n_tokens: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Weighted scatter-add of expert outputs back to their tokens.

    Shape:
        rows ``(M, D)`` -> ``(N, D)``; tokens no expert kept get zeros.
    """
    weighted = rows * dispatch.weight.to(rows.dtype).unsqueeze(-1)  # (M, D)
    out = rows.new_zeros(n_tokens, rows.shape[-1], dtype=dtype or rows.dtype)
    return out.index_add(0, dispatch.token_index, weighted.to(out.dtype))  # (N, D)
