r"""The routed expert block as one operator with its own backward: gather, grouped FFN, combine.

Forward, for rows grouped by expert (a :class:`gatelab.moe.dispatch.Dispatch`):

.. math::
    X_s = X[\text{token}],\quad
    Y_s = \big(\operatorname{silu}(X_s W^g_e) \odot X_s W^u_e\big) W^d_e\ \text{(block of } e),
    \quad y_t = \sum_{m:\,\text{token}(m) = t} G_{t, e(m)}\, (Y_s)_m

and the hand-written backward (the MegaBlocks / ScatterMoE scheme, arXiv:2211.15841 §3,
arXiv:2403.08245 §2-3). Writing it as one ``torch.library`` custom op buys three things:

- the permutation is computed once by the router and reused by the backward (no index tensors
  rebuilt, no ``index_put`` into a zero ``(N, D)`` buffer per gather, no contiguity copies); the
  gathered rows ``X_s`` and the hidden activations are saved, never recomputed;
- the per-expert matmuls write into preallocated row blocks (``out=``; ``addmm_`` accumulates the
  two input-gradient products), so on CPU each FLOP is one MKL call with no copies;
- ``torch.compile`` sees one opaque node with a fake (meta) implementation: ``aten._grouped_mm``'s
  own meta function accepts bfloat16 only, so a float32 graph through it cannot be traced.

Kernels (``backend``): ``"loop"`` runs one ``torch.mm`` per non-empty expert (any dtype, one host
sync for the row counts); ``"grouped_mm"`` calls ``torch._grouped_mm`` (CPU: float32/bfloat16/
float16; CUDA: bfloat16; 16-byte rows; one call for all experts, no host sync); ``"auto"`` picks
``grouped_mm`` where it applies and ``loop`` elsewhere (e.g. float64).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from gatelab.moe.dispatch import Dispatch

BACKENDS = ("auto", "grouped_mm", "loop")
# public name from torch 2.12 on; the private op has the same signature in 2.8-2.11
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# dtypes grouped_mm accepts per device type (torch 2.13; CUDA needs compute capability >= 8.0)
_GROUPED_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.bfloat16,),
}


def resolve_backend(backend: str, x: torch.Tensor, *widths: int) -> str:
    """The kernel used for ``x``: ``auto`` -> ``grouped_mm`` where it supports ``x``, else ``loop``.

    ``grouped_mm`` needs a dtype it implements on ``x``'s device and rows that are multiples of
    16 bytes. On CPU it is a C++ loop of the same ``mm`` calls as ``loop``, and the two measure
    the same (``benchmarks/moe_layer.py --backends loop``); it avoids the loop's host sync.
    """
    if backend not in BACKENDS:
        raise ValueError(f"SparseMoE: backend must be one of {BACKENDS}, got {backend!r}")
    dtypes = _GROUPED_DTYPES.get(x.device.type, ())
    supported = (
        _GROUPED_MM is not None
        and x.dtype in dtypes
        and all(w * x.dtype.itemsize % 16 == 0 for w in widths)
        and (x.device.type != "cuda" or torch.cuda.get_device_capability(x.device) >= (8, 0))
    )
    if backend == "auto":
        return "grouped_mm" if supported else "loop"
    if backend == "grouped_mm" and not supported:
        raise ValueError(
            f"SparseMoE: backend='grouped_mm' needs dtype in {dtypes} on {x.device.type} and "
            f"widths {widths} whose rows are multiples of 16 bytes, got {x.dtype}; use 'loop'"
        )
    return backend


def routed_experts(
    x: torch.Tensor,
    gates: torch.Tensor | None,
    token_index: torch.Tensor,
    counts: torch.Tensor,
    w_gate: torch.Tensor | None,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str = "swiglu",
    backend: str = "auto",
) -> torch.Tensor:
    r"""Every expert FFN on its rows, weighted by the gates and summed back to the tokens.

    .. math::
        y_t = \sum_{m:\ \text{token}(m) = t} G_{t, e(m)}\, f_{e(m)}(x_t)

    SwiGLU: :math:`f_e(x) = (\operatorname{silu}(x W^g_e) \odot x W^u_e) W^d_e`; GELU:
    :math:`f_e(x) = \operatorname{gelu}(x W^u_e) W^d_e` (``w_gate`` is None). Differentiable in
    ``x``, ``gates`` and the weights. The gates are dense (zero where a token did not pick an
    expert) so that the backward hands back a dense ``(N, E)`` gradient: the router's backward
    is then elementwise, with no scatter after this op (torch 2.13's inductor orders a scatter
    fed by a custom op's output after its consumer: wrong gradients, see docs/notes/moe.md).

    Args:
        x: the tokens.
        gates: gate weight of token ``t`` for expert ``e``; None means 1 (a plain permutation).
        token_index: the source token of each row, rows grouped by expert (expert 0 first).
        counts: rows per expert; they sum to ``M``.
        w_gate: gate projections (None for GELU experts).
        w_up: up projections.
        w_down: down projections.
        activation: ``"swiglu" | "gelu"``.
        backend: ``"auto" | "grouped_mm" | "loop"`` (see :func:`resolve_backend`).

    Shape:
        x ``(N, D)``, gates ``(N, E)``, token_index ``(M,)``, counts ``(E,)``, w_gate/w_up
        ``(E, D, H)``, w_down ``(E, H, D)`` -> ``(N, D)``; tokens no row points to get zeros.
    """
    kernel = resolve_backend(backend, x, x.shape[1], w_up.shape[2])
    out = torch.ops.gatelab.routed_experts(
        x, gates, token_index, counts, w_gate, w_up, w_down, activation, kernel
    )
    return out[0]


# --------------------------------------------------------------------------- kernels


class _Groups(NamedTuple):
    """Where each expert's rows are: ``grouped_mm`` offsets, or host-side segments for the loop."""

    n_experts: int
    offsets: torch.Tensor | None  # (E,) int32 end row of each expert (grouped_mm)
    segments: list[tuple[int, int, int]]  # (expert, first row, end row) of non-empty experts


def _groups(counts: torch.Tensor, kernel: str) -> _Groups:
    if kernel == "grouped_mm":  # no host sync: the kernel reads the offsets on the device
        return _Groups(counts.shape[0], counts.cumsum(0).to(torch.int32), [])
    ends, sizes = counts.cumsum(0).tolist(), counts.tolist()  # one host sync for the loop
    segments = [(e, end - n, end) for e, (n, end) in enumerate(zip(sizes, ends, strict=True)) if n]
    return _Groups(counts.shape[0], None, segments)


def _mm_rows(a, w, groups: _Groups, out, accumulate=False):
    """``out[rows of e] (+)= a[rows of e] @ w[e]`` for every expert.

    Shape:
        a ``(M, I)``, w ``(E, I, O)``, out ``(M, O)``.
    """
    if groups.offsets is not None:
        product = _GROUPED_MM(a, w, offs=groups.offsets)
        return out.add_(product) if accumulate else product
    for e, lo, hi in groups.segments:
        if accumulate:
            out[lo:hi].addmm_(a[lo:hi], w[e])
        else:
            torch.mm(a[lo:hi], w[e], out=out[lo:hi])
    return out


def _mm_weight_grad(a, g, groups: _Groups):
    """``dW[e] = a[rows of e]^T g[rows of e]``, zero for an expert without rows.

    Shape:
        a ``(M, I)``, g ``(M, O)`` -> ``(E, I, O)``.
    """
    if groups.offsets is not None:
        return _GROUPED_MM(a.T, g, offs=groups.offsets)
    shape = (groups.n_experts, a.shape[1], g.shape[1])
    every_expert_has_rows = len(groups.segments) == groups.n_experts
    grad = a.new_empty(shape) if every_expert_has_rows else a.new_zeros(shape)
    for e, lo, hi in groups.segments:
        torch.mm(a[lo:hi].T, g[lo:hi], out=grad[e])
    return grad


def _gate_index(token_index: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Flat index ``t E + e`` of each row's gate in the ``(N, E)`` gates. Shape: ``(M,)``."""
    return token_index * counts.shape[0] + Dispatch(token_index, counts, 0).row_experts()


@torch.library.custom_op("gatelab::routed_experts", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    gates: torch.Tensor | None,
    token_index: torch.Tensor,
    counts: torch.Tensor,
    w_gate: torch.Tensor | None,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str,
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(out, xs, gate, up, act, rows)``; all but ``out`` are saved for the backward.

    ``act`` is the expert's hidden activation (``silu(gate) * up`` or ``gelu(up)``); ``gate`` is
    empty for GELU experts.
    """
    m, hidden = token_index.shape[0], w_up.shape[2]
    groups = _groups(counts, kernel)
    xs = x.index_select(0, token_index)  # (M, D)
    up = _mm_rows(xs, w_up, groups, xs.new_empty(m, hidden))  # (M, H)
    if activation == "swiglu":
        gate = _mm_rows(xs, w_gate, groups, xs.new_empty(m, hidden))  # (M, H)
        act = F.silu(gate).mul_(up)
    else:
        gate, act = xs.new_empty(0), F.gelu(up)
    rows = _mm_rows(act, w_down, groups, xs.new_empty(m, x.shape[1]))  # (M, D)
    weighted = rows
    if gates is not None:
        row_weight = gates.reshape(-1).index_select(0, _gate_index(token_index, counts))
        weighted = rows * row_weight.to(rows.dtype).unsqueeze(-1)  # (M, D)
    out = x.new_zeros(x.shape).index_add_(0, token_index, weighted)  # (N, D)
    return out, xs, gate, up, act, rows


@_forward_op.register_fake
def _(x, gates, token_index, counts, w_gate, w_up, w_down, activation, kernel):
    m, hidden = token_index.shape[0], w_up.shape[2]
    gate = x.new_empty(m, hidden) if activation == "swiglu" else x.new_empty(0)
    return (
        x.new_empty(x.shape), x.new_empty(m, x.shape[1]), gate, x.new_empty(m, hidden),
        x.new_empty(m, hidden), x.new_empty(m, x.shape[1]),
    )  # fmt: skip


@torch.library.custom_op("gatelab::routed_experts_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    gates: torch.Tensor | None,
    token_index: torch.Tensor,
    counts: torch.Tensor,
    w_gate: torch.Tensor | None,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    xs: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    act: torch.Tensor,
    rows: torch.Tensor,
    activation: str,
    kernel: str,
    need_x: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dx, d_gates, dw_gate, dw_up, dw_down)`` (empty where not applicable)."""
    groups = _groups(counts, kernel)
    g_rows = grad_out.index_select(0, token_index)  # (M, D) dL/d(weighted row), gathered once
    d_gates = g_rows.new_empty(0)
    if gates is not None:
        where = _gate_index(token_index, counts)  # (M,)
        d_row = torch.linalg.vecdot(g_rows, rows)  # (M,) dL/dG_{t,e} = <g_m, f_e(x_t)>
        d_gates = gates.new_zeros(gates.numel()).index_add_(0, where, d_row.to(gates.dtype))
        d_gates = d_gates.view(gates.shape)  # (N, E)
        row_weight = gates.reshape(-1).index_select(0, where)
        g_rows.mul_(row_weight.to(g_rows.dtype).unsqueeze(-1))  # (M, D) now dL/d(rows)
    dw_down = _mm_weight_grad(act, g_rows, groups)  # (E, H, D)
    d_act = _mm_rows(g_rows, w_down.transpose(1, 2), groups, torch.empty_like(act))  # (M, H)
    if activation == "swiglu":
        d_up = F.silu(gate).mul_(d_act)  # (M, H)
        d_gate = d_act.mul_(up)  # (M, H) dL/d silu(gate), then in place dL/d gate:
        torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)
        dw_gate = _mm_weight_grad(xs, d_gate, groups)  # (E, D, H)
    else:
        d_up, d_gate = torch.ops.aten.gelu_backward(d_act, up), None
        dw_gate = xs.new_empty(0)
    dw_up = _mm_weight_grad(xs, d_up, groups)  # (E, D, H)
    dx = grad_out.new_empty(0)
    if need_x:
        d_xs = _mm_rows(d_up, w_up.transpose(1, 2), groups, torch.empty_like(xs))  # (M, D)
        if d_gate is not None:
            d_xs = _mm_rows(d_gate, w_gate.transpose(1, 2), groups, d_xs, accumulate=True)
        dx = grad_out.new_zeros(grad_out.shape).index_add_(0, token_index, d_xs)  # (N, D)
    return dx, d_gates, dw_gate, dw_up, dw_down


@_backward_op.register_fake
def _(grad_out, gates, token_index, counts, w_gate, w_up, w_down, xs, gate, up, act, rows,
      activation, kernel, need_x):  # fmt: skip
    return (
        grad_out.new_empty(grad_out.shape) if need_x else grad_out.new_empty(0),
        gates.new_empty(gates.shape) if gates is not None else xs.new_empty(0),
        w_gate.new_empty(w_gate.shape) if w_gate is not None else xs.new_empty(0),
        w_up.new_empty(w_up.shape),
        w_down.new_empty(w_down.shape),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, gates, token_index, counts, w_gate, w_up, w_down, activation, kernel = inputs
    _, xs, gate, up, act, rows = output
    ctx.save_for_backward(gates, token_index, counts, w_gate, w_up, w_down, xs, gate, up, act,
                          rows)  # fmt: skip
    ctx.activation, ctx.kernel = activation, kernel


def _backward(ctx, grad_out, *_unused):
    gates, token_index, counts, w_gate, w_up, w_down, xs, gate, up, act, rows = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, d_gates, dw_gate, dw_up, dw_down = torch.ops.gatelab.routed_experts_backward(
        grad_out, gates, token_index, counts, w_gate, w_up, w_down, xs, gate, up, act, rows,
        ctx.activation, ctx.kernel, need[0],
    )  # fmt: skip
    return (
        dx if need[0] else None,
        d_gates if gates is not None and need[1] else None,
        None,
        None,
        dw_gate if w_gate is not None else None,
        dw_up,
        dw_down,
        None,
        None,
    )


_forward_op.register_autograd(_backward, setup_context=_setup_context)
