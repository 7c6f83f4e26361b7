"""The 4-bit decode path against independent references: gguf's own Q4_1 dequantiser, float64
matrix products, and transformers' float32 model loaded from the same file."""

import numpy as np
import pytest
import torch

from gatelab.edge.quant import (
    GROUP,
    DecodeHead,
    Int4Linear,
    Q8Head,
    q4_1_blocks,
    q8_0_blocks,
    unpermute_rows,
)

gguf = pytest.importorskip("gguf")


def test_q4_1_blocks_match_gguf_dequantize():
    x = np.random.default_rng(0).standard_normal((16, 128)).astype(np.float32)
    raw = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_1)  # gguf's own quantiser
    q, d, m = q4_1_blocks(raw)
    mine = (q.reshape(16, -1, GROUP) * d[..., None] + m[..., None]).reshape(q.shape)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1)
    assert mine.shape == want.shape and np.array_equal(mine.astype(np.float32), want)
    assert q.min() == 0 and q.max() == 15


def test_q8_0_blocks_match_gguf_dequantize():
    x = np.random.default_rng(2).standard_normal((16, 128)).astype(np.float32)
    raw = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)  # gguf's own quantiser
    q, d = q8_0_blocks(raw)
    mine = (q.reshape(16, -1, GROUP) * d[..., None]).reshape(q.shape)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0)
    assert mine.shape == want.shape and np.array_equal(mine.astype(np.float32), want)
    assert q.min() >= -128 and q.max() <= 127 and q.min() < -64 < 64 < q.max()


def test_q8_head_equals_the_dequantised_product():
    gen = torch.Generator().manual_seed(3)
    n, k = 192, 128  # the CPU int4 packing needs N divisible by 16
    q = torch.randint(-128, 128, (n, k), generator=gen)
    d = torch.rand(n, k // GROUP, generator=gen) * 0.01
    weight = (q.view(n, -1, GROUP).double() * d[..., None]).view(n, k)  # float64 reference
    head = Q8Head(q, d)
    for rows in (1, 8):  # one sequence, and a batch of them
        x = torch.randn(rows, 1, k, generator=gen)
        got, want = head(x), x.double() @ weight.T
        assert got.shape == (rows, 1, n) and got.dtype == torch.float32
        assert torch.allclose(got.double(), want, rtol=0, atol=1e-2 * want.abs().max())  # bf16


def test_unpermute_rows_inverts_llama_cpp_permutation():
    rows = np.arange(8 * 3).reshape(8, 3)
    n_head = 2  # llama.cpp's convert_hf_to_gguf permute, written out independently
    permuted = rows.reshape(n_head, 2, 8 // n_head // 2, 3).swapaxes(1, 2).reshape(8, 3)
    assert np.array_equal(unpermute_rows(permuted, n_head), rows)


def test_int4_linear_equals_the_dequantised_product():
    gen = torch.Generator().manual_seed(0)
    n, k = 96, 128
    q = torch.randint(0, 16, (n, k), generator=gen)
    d = torch.rand(n, k // GROUP, generator=gen) * 0.02
    m = -torch.rand(n, k // GROUP, generator=gen) * 0.1
    weight = (q.view(n, -1, GROUP).double() * d[..., None] + m[..., None]).view(n, k)
    layer = Int4Linear(q, d, m)
    x = torch.randn(2, 5, k, generator=gen)
    got = layer(x)
    want = x.double() @ weight.T
    assert got.shape == (2, 5, n) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=0, atol=1e-2 * want.abs().max())  # bfloat16


def test_decode_head_is_float32_for_one_row_and_close_for_batches():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(300, 64, generator=gen)
    head = DecodeHead(weight)
    one, many = torch.randn(1, 1, 64, generator=gen), torch.randn(8, 1, 64, generator=gen)
    assert torch.equal(head(one), torch.nn.functional.linear(one, weight))
    want = many.double() @ weight.double().T
    assert torch.allclose(head(many).double(), want, atol=2e-2 * want.abs().max())


def test_decode_head_uses_the_q8_planes_for_small_batches_only():
    gen = torch.Generator().manual_seed(4)
    q = torch.randint(-128, 128, (64, 64), generator=gen)
    d = torch.rand(64, 2, generator=gen) * 0.01
    weight = (q.view(64, -1, GROUP).float() * d[..., None]).view(64, 64)
    head = DecodeHead(weight, Q8Head(q, d))
    few, many = torch.randn(2, 1, 64, generator=gen), torch.randn(8, 1, 64, generator=gen)
    assert torch.equal(head(few), head.q8(few))
    assert torch.equal(head(many), (many.to(torch.bfloat16) @ head.bf16.T).float())
    want = many.double() @ weight.double().T
    assert torch.allclose(head(many).double(), want, atol=2e-2 * want.abs().max())


@pytest.mark.slow
def test_smollm2_decode_model_runs_every_q4_1_layer_in_4_bits(monkeypatch):
    """Loads the 135M GGUF twice (~1 min): 210 layers in 4 bits, decode log-probs within 0.1."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from gatelab.edge.generate import new_cache
    from gatelab.edge.quant import int4_decode_model
    from gatelab.edge.weights import base_gguf, load_smollm2

    tokenizer, model = load_smollm2()
    decode, replaced = int4_decode_model(model, base_gguf("smollm2-135m"))
    assert replaced == 30 * 7 and decode is not model
    assert isinstance(decode.model.layers[5].self_attn.q_proj, Int4Linear)
    assert isinstance(decode.lm_head.q8, Q8Head)  # the file's Q8_0 head, as two 4-bit planes
    assert not isinstance(model.model.layers[5].self_attn.q_proj, Int4Linear)  # untouched
    ids = tokenizer("The capital of France is Paris, and the capital of Italy is").input_ids
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        cache, got = new_cache(30), []
        for token in ids:  # decode steps, one token each, as the engine runs them
            logits = decode(torch.tensor([[token]]), cache=cache, use_cache=True).logits
            got.append(torch.log_softmax(logits[0, -1].double(), -1))
    got = torch.stack(got)
    nxt = torch.tensor(ids[1:])[:, None]
    error = (got[:-1].gather(1, nxt) - want[:-1].gather(1, nxt)).abs()
    assert error.max() < 0.1 and (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
