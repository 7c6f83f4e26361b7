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
sync for the row counts; on CPU in row chunks of at most 16 MiB per buffer, see
``_CPU_CHUNK_BYTES``); ``"grouped_mm"`` calls ``torch._grouped_mm`` (CPU: float32/bfloat16/
float16; CUDA: bfloat16; 16-byte rows; one call for all experts, no host sync); ``"auto"`` picks
``grouped_mm`` on CUDA where it applies and ``loop`` elsewhere.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "grouped_mm", "loop")
# public name from torch 2.12 on; the private op has the same signature in 2.8-2.11
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# dtypes grouped_mm accepts per device type (torch 2.13; CUDA needs compute capability >= 8.0)
_GROUPED_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.bfloat16,),
}


def resolve_backend(backend: str, x: torch.Tensor, *widths: int) -> str:
    """The kernel for ``x``: ``auto`` -> ``grouped_mm`` on GPUs where it applies, else ``loop``.

    ``grouped_mm`` needs a dtype it implements on ``x``'s device and rows that are multiples of
    16 bytes. On CPU it is a C++ loop of the same ``mm`` calls as ``loop`` (they measure the same
    user time), but ``loop`` also works in row chunks that the allocator reuses.
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
    if backend == "auto":  # CPU: the chunked loop (see _CPU_CHUNK_BYTES)
        return "grouped_mm" if supported and x.device.type != "cpu" else "loop"
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
    expert_index: torch.Tensor,
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
        expert_index: the expert of each row.
        counts: rows per expert; they sum to ``M``.
        w_gate: gate projections (None for GELU experts).
        w_up: up projections.
        w_down: down projections.
        activation: ``"swiglu" | "gelu"``.
        backend: ``"auto" | "grouped_mm" | "loop"`` (see :func:`resolve_backend`).

    Shape:
        x ``(N, D)``, gates ``(N, E)``, token_index/expert_index ``(M,)``, counts ``(E,)``,
        w_gate/w_up ``(E, D, H)``, w_down ``(E, H, D)`` -> ``(N, D)``; tokens no row points to get
        zeros.
    """
    kernel = resolve_backend(backend, x, x.shape[1], w_up.shape[2])
    out = torch.ops.gatelab.routed_experts(
        x, gates, token_index, expert_index, counts, w_gate, w_up, w_down, activation, kernel
    )
    return out[0]


# --------------------------------------------------------------------------- kernels

# CPU: rows are processed in chunks whose (rows, max(D, H)) buffers stay under 16 MiB. glibc
# serves larger blocks with a fresh mmap (its threshold tops out at 32 MiB) and unmaps them on
# free, so every step would page-fault them in again: measured 147k faults (0.24-0.9 s of system
# time) per step at 4096 tokens, top-4, E = 8, against 21k for the per-expert reference loop.
_CPU_CHUNK_BYTES = 16 * 2**20


class _Chunk(NamedTuple):
    """Rows ``[lo, hi)`` and where each expert's rows lie inside them."""

    lo: int
    hi: int
    offsets: torch.Tensor | None  # (E,) int32 end row of each expert in the chunk (grouped_mm)
    segments: list[tuple[int, int, int]]  # (expert, first, end) rows, relative to lo (loop)


def _n_chunks(m: int, width: int, x: torch.Tensor, kernel: str) -> int:
    """Number of row chunks (static: the fake implementation must return as many tensors)."""
    if m == 0:
        return 0
    if kernel == "grouped_mm" or x.device.type != "cpu":
        return 1
    rows = max(1, _CPU_CHUNK_BYTES // (width * x.dtype.itemsize))
    return -(-m // rows)


def _chunks(counts: torch.Tensor, m: int, n_chunks: int, kernel: str) -> list[_Chunk]:
    if kernel == "grouped_mm":  # one chunk, no host sync: the kernel reads offsets on the device
        return [_Chunk(0, m, counts.cumsum(0).to(torch.int32), [])] if n_chunks else []
    ends, sizes = counts.cumsum(0).tolist(), counts.tolist()  # one host sync for the loop
    rows = -(-m // n_chunks) if n_chunks else 0
    chunks = []
    for lo in range(0, m, rows or 1):
        hi = min(m, lo + rows)
        segments = []
        for e, (size, end) in enumerate(zip(sizes, ends, strict=True)):
            first, last = max(end - size, lo), min(end, hi)
            if first < last:
                segments.append((e, first - lo, last - lo))
        chunks.append(_Chunk(lo, hi, None, segments))
    return chunks


def _mm_rows(a, w, chunk: _Chunk, out, accumulate=False):
    """``out[rows of e] (+)= a[rows of e] @ w[e]`` for every expert of the chunk.

    Shape:
        a ``(R, I)``, w ``(E, I, O)``, out ``(R, O)``.
    """
    if chunk.offsets is not None:
        product = _GROUPED_MM(a, w, offs=chunk.offsets)
        return out.add_(product) if accumulate else product
    for e, lo, hi in chunk.segments:
        if accumulate:
            out[lo:hi].addmm_(a[lo:hi], w[e])
        else:
            torch.mm(a[lo:hi], w[e], out=out[lo:hi])
    return out


class _WeightGrad:
    """``dW[e] = sum over chunks of a[rows of e]^T g[rows of e]``; zero for experts without rows.

    Each expert's block is written by its first product (``mm(out=)``) and accumulated by later
    ones (``addmm_``), so no zero fill is needed where every expert has rows.
    """

    def __init__(self, like: torch.Tensor, shape: tuple[int, int, int]) -> None:
        self.grad = like.new_empty(shape)  # (E, I, O)
        self.written = [False] * shape[0]

    def add(self, a: torch.Tensor, g: torch.Tensor, chunk: _Chunk) -> None:
        if chunk.offsets is not None:  # the one chunk of the grouped kernel
            self.grad = _GROUPED_MM(a.T, g, offs=chunk.offsets)
            self.written = [True] * len(self.written)
            return
        for e, lo, hi in chunk.segments:
            if self.written[e]:
                self.grad[e].addmm_(a[lo:hi].T, g[lo:hi])
            else:
                torch.mm(a[lo:hi].T, g[lo:hi], out=self.grad[e])
                self.written[e] = True

    def result(self) -> torch.Tensor:
        for e, written in enumerate(self.written):
            if not written:
                self.grad[e].zero_()
        return self.grad


Tensors = list[torch.Tensor]


@torch.library.custom_op("gatelab::routed_experts", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    gates: torch.Tensor | None,
    token_index: torch.Tensor,
    expert_index: torch.Tensor,
    counts: torch.Tensor,
    w_gate: torch.Tensor | None,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str,
    kernel: str,
) -> tuple[torch.Tensor, Tensors, Tensors, Tensors, Tensors]:
    """Returns ``out`` and, per row chunk, ``xs, gate, up, act`` saved for the backward.

    ``act`` is the expert's hidden activation (``silu(gate) * up`` or ``gelu(up)``); ``gate`` is
    empty for GELU experts.
    """
    m, hidden, d_model = token_index.shape[0], w_up.shape[2], x.shape[1]
    chunks = _chunks(counts, m, _n_chunks(m, max(hidden, d_model), x, kernel), kernel)
    where = token_index * counts.shape[0] + expert_index if gates is not None else None  # (M,)
    out = x.new_zeros(x.shape)  # (N, D)
    saved = ([], [], [], [])
    for chunk in chunks:
        rows_of = slice(chunk.lo, chunk.hi)
        n_rows = chunk.hi - chunk.lo
        xs = x.index_select(0, token_index[rows_of])  # (R, D)
        up = _mm_rows(xs, w_up, chunk, xs.new_empty(n_rows, hidden))  # (R, H)
        if activation == "swiglu":
            gate = _mm_rows(xs, w_gate, chunk, xs.new_empty(n_rows, hidden))  # (R, H)
            act = F.silu(gate).mul_(up)
        else:
            gate, act = xs.new_empty(0), F.gelu(up)
        rows = _mm_rows(act, w_down, chunk, xs.new_empty(n_rows, d_model))  # (R, D)
        if where is not None:  # in place: the backward needs <g, rows>, got as <g W_d^T, act>
            weight = gates.reshape(-1).index_select(0, where[rows_of]).to(rows.dtype)  # (R,)
            rows.mul_(weight.unsqueeze(-1))
        out.index_add_(0, token_index[rows_of], rows)
        for store, tensor in zip(saved, (xs, gate, up, act), strict=True):
            store.append(tensor)
    return (out, *saved)


@_forward_op.register_fake
def _(x, gates, token_index, expert_index, counts, w_gate, w_up, w_down, activation, kernel):
    m, hidden, d_model = token_index.shape[0], w_up.shape[2], x.shape[1]
    n_chunks = _n_chunks(m, max(hidden, d_model), x, kernel)
    rows = [-(-m // n_chunks)] * (n_chunks - 1) + [m - (n_chunks - 1) * -(-m // n_chunks)]
    rows = rows if n_chunks else []
    swiglu = activation == "swiglu"
    return (
        x.new_empty(x.shape),
        [x.new_empty(r, d_model) for r in rows],
        [x.new_empty(r, hidden) if swiglu else x.new_empty(0) for r in rows],
        [x.new_empty(r, hidden) for r in rows],
        [x.new_empty(r, hidden) for r in rows],
    )


@torch.library.custom_op("gatelab::routed_experts_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    gates: torch.Tensor | None,
    token_index: torch.Tensor,
    expert_index: torch.Tensor,
    counts: torch.Tensor,
    w_gate: torch.Tensor | None,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    xs_chunks: Tensors,
    gate_chunks: Tensors,
    up_chunks: Tensors,
    act_chunks: Tensors,
    activation: str,
    kernel: str,
    need_x: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dx, d_gates, dw_gate, dw_up, dw_down)`` (empty where not applicable)."""
    m, (n_experts, d_model, hidden) = token_index.shape[0], w_up.shape
    chunks = _chunks(counts, m, len(xs_chunks), kernel)
    swiglu = activation == "swiglu"
    d_gates = grad_out.new_empty(0)
    if gates is not None:
        where = token_index * n_experts + expert_index  # (M,) flat index of each row's gate
        d_gates = gates.new_zeros(gates.numel())  # (N E,) flat
    dw_down = _WeightGrad(grad_out, (n_experts, hidden, d_model))
    dw_up = _WeightGrad(grad_out, (n_experts, d_model, hidden))
    dw_gate = _WeightGrad(grad_out, (n_experts, d_model, hidden)) if swiglu else None
    dx = grad_out.new_zeros(grad_out.shape) if need_x else grad_out.new_empty(0)
    for i, chunk in enumerate(chunks):
        rows_of = slice(chunk.lo, chunk.hi)
        xs, gate, up, act = xs_chunks[i], gate_chunks[i], up_chunks[i], act_chunks[i]
        g_rows = grad_out.index_select(0, token_index[rows_of])  # (R, D) dL/d(weighted row)
        d_act = _mm_rows(g_rows, w_down.transpose(1, 2), chunk, torch.empty_like(act))  # (R, H)
        # one (R, H) scratch buffer: first <d_act, act>'s products, then d_up. A fresh temporary
        # per chunk (as linalg.vecdot makes) is page-faulted in on every step once it is large
        spare = torch.empty_like(act)
        if gates is not None:  # dL/dG_{t,e} = <g, f_e(x_t)> = <g W_d^T, act>
            d_row = torch.mul(d_act, act, out=spare).sum(-1)  # (R,)
            d_gates.index_add_(0, where[rows_of], d_row.to(d_gates.dtype))
            weight = gates.reshape(-1).index_select(0, where[rows_of]).to(g_rows.dtype)
            g_rows.mul_(weight.unsqueeze(-1))  # (R, D) now dL/d(rows)
            d_act.mul_(weight.unsqueeze(-1))  # (R, H) dL/d act
        dw_down.add(act, g_rows, chunk)
        if swiglu:
            d_up = torch.ops.aten.silu.out(gate, out=spare).mul_(d_act)  # (R, H)
            d_gate = d_act.mul_(up)  # (R, H) dL/d silu(gate), then in place dL/d gate:
            torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)
            dw_gate.add(xs, d_gate, chunk)
        else:
            d_up = torch.ops.aten.gelu_backward.grad_input(d_act, up, grad_input=spare)
            d_gate = None
        dw_up.add(xs, d_up, chunk)
        if need_x:
            d_xs = _mm_rows(d_up, w_up.transpose(1, 2), chunk, g_rows)  # (R, D) reuses g_rows
            if d_gate is not None:
                d_xs = _mm_rows(d_gate, w_gate.transpose(1, 2), chunk, d_xs, accumulate=True)
            dx.index_add_(0, token_index[rows_of], d_xs)
    return (
        dx,
        d_gates.view(gates.shape) if gates is not None else d_gates,
        dw_gate.result() if swiglu else grad_out.new_empty(0),
        dw_up.result(),
        dw_down.result(),
    )


@_backward_op.register_fake
def _(grad_out, gates, token_index, expert_index, counts, w_gate, w_up, w_down, xs_chunks,
      gate_chunks, up_chunks, act_chunks, activation, kernel, need_x):  # fmt: skip
    return (
        grad_out.new_empty(grad_out.shape) if need_x else grad_out.new_empty(0),
        gates.new_empty(gates.shape) if gates is not None else grad_out.new_empty(0),
        w_gate.new_empty(w_gate.shape) if w_gate is not None else grad_out.new_empty(0),
        w_up.new_empty(w_up.shape),
        w_down.new_empty(w_down.shape),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, gates, token_index, expert_index, counts, w_gate, w_up, w_down, activation, kernel = inputs
    _, *saved = output
    ctx.n_chunks = len(saved[0])
    flat = [t for store in saved for t in store]
    ctx.save_for_backward(gates, token_index, expert_index, counts, w_gate, w_up, w_down, *flat)
    ctx.activation, ctx.kernel = activation, kernel
    # the saved-tensor outputs never get a gradient: without this autograd would fill a zero
    # tensor for each of them on every backward (measured: 1.5 ms of a 14 ms step at N = 2048)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, *_unused):
    if grad_out is None:  # only saved-tensor outputs got a gradient: they carry none back
        return (None,) * 10
    gates, token_index, expert_index, counts, w_gate, w_up, w_down, *flat = ctx.saved_tensors
    k = ctx.n_chunks
    saved = [list(flat[i * k : (i + 1) * k]) for i in range(4)]
    need = ctx.needs_input_grad
    dx, d_gates, dw_gate, dw_up, dw_down = torch.ops.gatelab.routed_experts_backward(
        grad_out, gates, token_index, expert_index, counts, w_gate, w_up, w_down, *saved,
        ctx.activation,
        ctx.kernel, need[0],
    )  # fmt: skip
    return (
        dx if need[0] else None,
        d_gates if gates is not None and need[1] else None,
        None,
        None,
        None,
        dw_gate if w_gate is not None else None,
        dw_up,
        dw_down,
        None,
        None,
    )


_forward_op.register_autograd(_backward, setup_context=_setup_context)
