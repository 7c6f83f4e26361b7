r"""Decoding with the GGUF's own 4-bit weights: Q4_1 blocks as torch int4 matmuls (CPU).

One decode step of a 135M model reads every weight once for one token; in float32 that is
~540 MB per token and memory-bound (~14 tokens/s on one core), while llama.cpp reads the 4-bit
blocks of the same GGUF file. This module gives the served model a second forward path for
decode steps that does the same: each Q4_1 linear layer of the file (blocks of 32 weights
:math:`w_j = d\,q_j + m`, :math:`q_j \in \{0..15\}`, ``d`` and ``m`` float16) becomes an
:class:`Int4Linear` over ``torch.ops.aten._weight_int4pack_mm_for_cpu``, whose groups of 32
compute :math:`(q_j - 8)\,s + z`, so :math:`s = d` and :math:`z = m + 8d`. Activations and
group scales enter the kernel as bfloat16 (the kernel's fast path; llama.cpp itself quantises
activations to 8 bits for these blocks); the LM head stays float32 for one sequence and uses a
bfloat16 copy for batches (:class:`DecodeHead`).

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

GROUP = 32  # weights per Q4_1 block
Q4_1 = 3  # gguf.GGMLQuantizationType.Q4_1
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


class DecodeHead(nn.Module):
    """The LM head for decode steps: float32 for one or two rows, a bfloat16 copy for more.

    On one core the float32 matrix-vector product over the 49k x 576 head is memory-bound and
    no kernel here beats it for one row (bfloat16 is as slow; int8 rows with one scale each,
    ``_weight_int8pack_mm``, halve its time but move log-probabilities by 0.04 on average, twice
    what the 4-bit layers do); from a few rows on, the bfloat16 matrix product is ~3x faster
    than float32 (8 rows: 9.5 vs 29.8 ms).
    """

    min_rows = 3

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight  # the float32 head's own parameter (shared, not copied)
        self.register_buffer("bf16", weight.detach().to(torch.bfloat16), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer."""
        if x.numel() // x.shape[-1] < self.min_rows:
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
            n, k = q.shape
            dequant = (q.view(n, k // GROUP, GROUP).float() * d[..., None] + m[..., None]).view(
                n, k
            )
            if dequant.shape != target.weight.shape or not torch.equal(dequant, target.weight):
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
    outer.lm_head = DecodeHead(model.lm_head.weight)
    return outer, replaced
