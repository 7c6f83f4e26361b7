import pytest
import torch

from gatelab.moe import SparseMoE

transformers = pytest.importorskip("transformers")
from transformers import MixtralConfig  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402


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
    moe = SparseMoE.from_mixtral(block, backend="loop")
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
    block = moe.to_mixtral()
    assert block.experts.gate_up_proj.shape == (4, 16, 16)
    assert block.experts.down_proj.shape == (4, 16, 8)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(block(x), moe(x), atol=1e-5, rtol=1e-4)
    back = SparseMoE.from_mixtral(block)
    for name, p in moe.named_parameters():
        assert torch.equal(p, back.get_parameter(name)), name


def test_to_mixtral_rejects_features_mixtral_lacks():
    with pytest.raises(ValueError, match="capacity_factor"):
        SparseMoE(16, 8, 4, top_k=2, capacity_factor=1.0).to_mixtral()
    with pytest.raises(ValueError, match="router"):
        SparseMoE(16, 8, 4, top_k=2, router="sigmoid").to_mixtral()


def test_from_mixtral_rejects_other_modules():
    with pytest.raises(TypeError, match="MixtralSparseMoeBlock"):
        SparseMoE.from_mixtral(torch.nn.Linear(3, 3))
