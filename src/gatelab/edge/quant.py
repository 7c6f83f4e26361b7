r"""Decoding with the GGUF's own 4-bit weights: Q4_1 blocks as torch int4 matmuls (CPU).

One decode step of a 135M model reads every weight once for one token; in float32 that is
~540 MB per token and memory-bound (~14 tokens/s on one core), while llama.cpp reads the 4-bit
blocks of the same GGUF file. This module gives the served model a second forward path for
decode steps that does the same: each Q4_1 linear layer of the file (blocks of 32 weights
:math:`w_j = d\,q_j + m`, :math:`q_j \in \{0..15\}`, ``d`` and ``m`` float16) becomes an
:class:`Int4Linear` over ``torch.ops.aten._weight_int4pack_mm_for_cpu``, whose groups of 32
compute :math:`(q_j - 8)\,s + z`, so :math:`s = d` and :math:`z = m + 8d`. Activations and
group scales enter the kernel as bfloat16 (the kernel's fast path; llama.cpp itself quantises
activations to 8 bits for these blocks). The LM head (tied to the embeddings) is stored as Q8_0
in SmolLM2's file: blocks of 32 int8 weights :math:`w_j = d\,q_j` with one float16 ``d``. Torch
has no fast kernel for 8-bit groups on the CPU, so :class:`Q8Head` splits each weight into two
4-bit planes, :math:`q = 16h + l` with :math:`l \in \{0..15\}`, :math:`h \in \{-8..7\}`, and
runs the same int4 kernel twice: :math:`y = x (l\,d)^\top + x (16 h\,d)^\top` (exact weights;
the plane of ``l`` has :math:`s = d, z = 8d`, the plane of ``h`` stored as ``h + 8`` has
:math:`s = 16d, z = 0`). It reads 28 MB per token instead of the float32 head's 113 MB (3.0 against
10.1 ms for one row here); :class:`DecodeHead` uses it for small batches and a bfloat16 copy
for larger ones, and float32 for one sequence when the head is of another type.

The blocks are read from the GGUF file, put in the row order transformers uses (it un-permutes
the query and key rows of llama.cpp's rotary layout) and checked to dequantise bit-exactly to
the float32 weights transformers loaded; a tensor that does not is left in float32. Prefill and
scoring (``echo``, lm-eval) keep the float32 model: only generated tokens after the first use
this path.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

GROUP = 32  # weights per Q4_1 / Q8_0 block
Q4_1 = 3  # gguf.GGMLQuantizationType.Q4_1
Q8_0 = 8  # gguf.GGMLQuantizationType.Q8_0
LINEARS = {  # GGUF tensor -> transformers module path inside a decoder layer
    "attn_q": ("self_attn", "q_proj"),
    "attn_k": ("self_attn", "k_proj"),
    "attn_v": ("self_attn", "v_proj"),
    "attn_output": ("self_attn", "o_proj"),
    "ffn_gate": ("mlp", "gate_proj"),
    "ffn_up": ("mlp", "up_proj"),
    "ffn_down": ("mlp", "down_proj"),
}


def q4_1_blocks(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split Q4_1 rows ``(N, K/32 * 20)`` bytes into ``q (N, K)`` and ``d, m (N, K/32)``.

    A block is ``d`` (float16), ``m`` (float16), then 16 bytes: weight ``j < 16`` in the low
    nibble of byte ``j``, weight ``j >= 16`` in the high nibble of byte ``j - 16``.
    """
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, 20)  # (N, K/32, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (N, K/32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:]  # (N, K/32, 16)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (N, K/32, 32)
    return q.reshape(n, -1), d, m


def q8_0_blocks(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split Q8_0 rows ``(N, K/32 * 34)`` bytes into ``q (N, K)`` int8 values and ``d (N, K/32)``.

    A block is ``d`` (float16), then 32 signed bytes.
    """
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, 34)  # (N, K/32, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (N, K/32)
    q = blocks[..., 2:].copy().view(np.int8).astype(np.int32)  # (N, K/32, 32)
    return q.reshape(n, -1), d


def unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a query/key weight (as transformers does)."""
    dim = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, dim, 2, *rows.shape[1:]).swapaxes(2, 1).reshape(rows.shape)


class Int4Linear(nn.Module):
    """``y = x W^T`` with ``W`` as 4-bit groups of 32 (see module doc); ``(..., K) -> (..., N)``."""

    def __init__(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        self.register_buffer("packed", packed, persistent=False)
        scales = torch.stack([d.T, (m + 8 * d).T], dim=-1).to(torch.bfloat16)  # (K/32, N, 2)
        self.register_buffer("scales_zeros", scales.contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer."""
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (rows, K)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.scales_zeros)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class Q8Head(nn.Module):
    """``y = x W^T`` for Q8_0 weights ``W = d q`` as two 4-bit planes (see module doc).

    Args:
        q: ``(N, K)`` integers in [-128, 127]; d: ``(N, K/32)`` block scales.
    """

    def __init__(self, q: torch.Tensor, d: torch.Tensor) -> None:
        super().__init__()
        q = q.to(torch.int32)
        low, high = q & 15, q >> 4  # q = 16 * high + low; low in 0..15, high in -8..7
        zero = torch.zeros_like(d)
        self.low = Int4Linear(low, d, zero)  # (low - 8) d + 8 d = low d
        self.high = Int4Linear(high + 8, 16 * d, -8 * 16 * d)  # (high + 8 - 8) 16 d + 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer."""
        return self.low(x) + self.high(x)


class DecodeHead(nn.Module):
    """The LM head for decode steps: per batch size the fastest kernel measured here.

    One core, the 49k x 576 head, CPU milliseconds (`experiments/edge_decode_head.py` and a
    micro-benchmark): for 1 / 2 / 4 / 8 rows the float32 product takes 9.6 / 17.4 / - / -, the
    Q8_0 planes (:class:`Q8Head`) 3.2 / 3.3 / 4.5 / 8.8 and the bfloat16 copy - / - / 5.8 / 4.9.
    So: ``q8`` below :attr:`bf16_rows` rows when the file's head is Q8_0, float32 for one or two
    rows otherwise (int8 rows with one scale each, ``_weight_int8pack_mm``, halve its time but
    move log-probabilities by 0.04 on average), the bfloat16 copy for batches.
    """

    bf16_rows = 6  # rows from which the bfloat16 copy is used (with a Q8_0 head)
    min_rows = 3  # the same without one

    def __init__(self, weight: torch.Tensor, q8: Q8Head | None = None) -> None:
        super().__init__()
        self.weight = weight  # the float32 head's own parameter (shared, not copied)
        self.q8 = q8
        self.register_buffer("bf16", weight.detach().to(torch.bfloat16), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer."""
        rows = x.numel() // x.shape[-1]
        if self.q8 is not None and rows < self.bf16_rows:
            return self.q8(x)
        if self.q8 is None and rows < self.min_rows:
            return nn.functional.linear(x, self.weight)
        return (x.to(torch.bfloat16) @ self.bf16.T).to(x.dtype)


def _swap(module: nn.Module, path: tuple[str, str], layer: nn.Module) -> nn.Module:
    """A shallow copy of a decoder layer with ``path`` replaced (the original is untouched)."""
    outer = copy.copy(module)
    outer._modules = dict(outer._modules)
    inner = copy.copy(outer._modules[path[0]])
    inner._modules = dict(inner._modules)
    inner._modules[path[1]] = layer
    outer._modules[path[0]] = inner
    return outer


def int4_decode_model(model: nn.Module, gguf_path: str) -> tuple[nn.Module, int]:
    """A view of a Llama-style ``model`` whose Q4_1 layers of ``gguf_path`` run in 4 bits.

    Returns:
        The decode model (weights shared with ``model`` wherever not replaced) and the number
        of linear layers replaced; ``(model, 0)`` off the CPU or when no tensor qualifies.
    """
    if next(model.parameters()).device.type != "cpu":
        return model, 0
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(gguf_path).tensors}
    config = model.config
    layers = list(model.model.layers)
    replaced = 0
    for i, layer in enumerate(layers):
        for name, path in LINEARS.items():
            tensor = tensors.get(f"blk.{i}.{name}.weight")
            target = getattr(getattr(layer, path[0]), path[1])
            if tensor is None or int(tensor.tensor_type) != Q4_1 or target.bias is not None:
                continue
            q, d, m = q4_1_blocks(np.asarray(tensor.data))
            if name in ("attn_q", "attn_k"):
                heads = (
                    config.num_attention_heads if name == "attn_q" else config.num_key_value_heads
                )
                q, d, m = (unpermute_rows(a, heads) for a in (q, d, m))
            q, d, m = (torch.from_numpy(np.ascontiguousarray(a)) for a in (q, d, m))
            if not _is_loaded(target.weight, q, d, m):
                continue  # not the tensor transformers loaded: keep float32
            layer = _swap(layer, path, Int4Linear(q, d, m))
            replaced += 1
        layers[i] = layer
    if not replaced:
        return model, 0
    inner = copy.copy(model.model)
    inner._modules = dict(inner._modules)
    inner.layers = nn.ModuleList(layers)
    outer = copy.copy(model)
    outer._modules = dict(outer._modules)
    outer.model = inner
    outer.lm_head = _decode_head(model.lm_head.weight, tensors)
    return outer, replaced


def _decode_head(weight: torch.Tensor, tensors: dict) -> DecodeHead:
    """The :class:`DecodeHead` of ``weight``, with :class:`Q8Head` planes where possible.

    Possible when the file's head (``output``, else the tied ``token_embd``) is Q8_0 and
    dequantises bit-exactly to ``weight``.
    """
    tensor = tensors.get("output.weight", tensors.get("token_embd.weight"))
    if tensor is None or int(tensor.tensor_type) != Q8_0 or weight.shape[0] % 16:
        return DecodeHead(weight)  # (the CPU int4 packing needs rows in multiples of 16)
    q, d = (torch.from_numpy(np.ascontiguousarray(a)) for a in q8_0_blocks(np.asarray(tensor.data)))
    if not _is_loaded(weight, q, d):
        return DecodeHead(weight)
    return DecodeHead(weight, Q8Head(q, d))


def _is_loaded(
    weight: torch.Tensor, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None
) -> bool:
    """Whether blocks ``q (N, K)``, ``d, m (N, K/32)`` dequantise bit-exactly to ``weight``."""
    n, k = q.shape
    blocks = q.view(n, k // GROUP, GROUP).float() * d[..., None]  # (N, K/32, 32)
    if m is not None:
        blocks = blocks + m[..., None]
    dequant = blocks.view(n, k)
    return dequant.shape == weight.shape and torch.equal(dequant, weight)
