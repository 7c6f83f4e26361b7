import pytest
import torch

from gatelab.moe import SparseMoE, from_mixtral, to_mixtral, use_sparse_moe

transformers = pytest.importorskip("transformers")
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import (  # noqa: E402
    MixtralSparseMoeBlock,
    load_balancing_loss_func,
)


def _block(seed=0):
    torch.manual_seed(seed)
    config = MixtralConfig(
        hidden_size=16, intermediate_size=12, num_local_experts=6, num_experts_per_tok=2
    )
    block = MixtralSparseMoeBlock(config).double()
    with torch.no_grad():
        for p in block.parameters():  # transformers leaves these torch.empty until init_weights
            p.normal_(0, 0.3)
    return block.eval()


def test_from_mixtral_matches_the_transformers_block_outputs_and_grads():
    block = _block()
    moe = from_mixtral(block, backend="loop")
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 7, 16, dtype=torch.float64)
    y_hf = block(x)
    y = moe(x)
    # the HF router takes its softmax in float32, so agreement is to float32 precision
    torch.testing.assert_close(y, y_hf, atol=1e-5, rtol=1e-5)
    (gx_hf,) = torch.autograd.grad((y_hf * g).sum(), x)
    (gx,) = torch.autograd.grad((y * g).sum(), x)
    torch.testing.assert_close(gx, gx_hf, atol=1e-5, rtol=1e-5)


def test_to_mixtral_round_trip_and_float32_grouped_path():
    torch.manual_seed(1)
    moe = SparseMoE(16, 8, 4, top_k=3)
    block = to_mixtral(moe)
    assert block.experts.gate_up_proj.shape == (4, 16, 16)
    assert block.experts.down_proj.shape == (4, 16, 8)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(block(x), moe(x), atol=1e-5, rtol=1e-4)
    back = from_mixtral(block)
    for name, p in moe.named_parameters():
        assert torch.equal(p, back.get_parameter(name)), name


def test_to_mixtral_rejects_features_mixtral_lacks():
    with pytest.raises(ValueError, match="capacity_factor"):
        to_mixtral(SparseMoE(16, 8, 4, top_k=2, capacity_factor=1.0))
    with pytest.raises(ValueError, match="router"):
        to_mixtral(SparseMoE(16, 8, 4, top_k=2, router="sigmoid"))


def test_from_mixtral_rejects_other_modules():
    with pytest.raises(TypeError, match="MixtralSparseMoeBlock"):
        from_mixtral(torch.nn.Linear(3, 3))


def _tiny_causal_lm(n_layers):
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=12, num_hidden_layers=n_layers,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=32, router_aux_loss_coef=0.02,
    )  # fmt: skip
    return MixtralForCausalLM(config).eval()


@pytest.mark.parametrize("n_layers", [1, 2])
def test_sparse_moe_inside_a_mixtral_model_outputs_router_logits_and_aux_loss(n_layers):
    model = _tiny_causal_lm(n_layers)
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    ref = model(tokens, labels=tokens, output_router_logits=True)
    use_sparse_moe(model, backend="loop")
    moes = [m for m in model.modules() if isinstance(m, SparseMoE)]
    assert len(moes) == n_layers
    assert not any(isinstance(m, MixtralSparseMoeBlock) for m in model.modules())
    out = model(tokens, labels=tokens, output_router_logits=True)
    # the logits the model returns are the SparseMoE routers' own, layer by layer
    assert len(out.router_logits) == n_layers
    for logits, moe in zip(out.router_logits, moes, strict=True):
        assert logits is moe.last_stats.router_logits
    expected = load_balancing_loss_func(out.router_logits, 4, 2)
    torch.testing.assert_close(out.aux_loss, expected)
    # and they agree with the original Mixtral blocks, so the loss does too
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    if n_layers == 1:  # Mixtral divides the counts by N, SparseMoE by N K: a factor K = 2
        torch.testing.assert_close(2 * moes[0].last_stats.balance_loss, out.aux_loss)
    out.loss.backward()
    assert all(m.router.weight.grad is not None for m in moes)


def test_use_sparse_moe_rejects_a_model_without_mixtral_blocks():
    with pytest.raises(TypeError, match="MixtralSparseMoeBlock"):
        use_sparse_moe(torch.nn.Sequential(torch.nn.Linear(2, 2)))
