import math

import pytest
import torch
from torch import nn

from gatelab import gates
from gatelab.exits import (
    EarlyExitModel,
    ExitGate,
    ViT,
    ViTConfig,
    confidence_features,
    global_pool,
)


def test_vit_shapes_batch_one_and_more():
    model = ViT(ViTConfig())
    for b in (1, 3):
        assert model(torch.randn(b, 1, 28, 28)).shape == (b, 10)
    assert ViTConfig().n_tokens == 50


def test_vit_config_errors():
    with pytest.raises(ValueError, match="patch_size"):
        ViTConfig(patch_size=5)
    with pytest.raises(ValueError, match="n_heads"):
        ViTConfig(d_model=10, n_heads=4)


def test_early_exit_model_shapes_and_frozen_backbone(tiny_exit_model):
    model = tiny_exit_model
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    logits = model.all_exit_logits(x)
    assert logits.shape == (4, 1, 5)
    assert model.gate_values(logits).shape == (1, 3)
    torch.testing.assert_close(logits[-1], model.backbone_forward(x))
    frozen = [p.requires_grad for p in model.blocks.parameters()]
    assert not any(frozen)
    assert all(p.requires_grad for p in model.ims.parameters())
    model.train()
    assert not model.blocks.training and model.ims.training


def test_im_gradients_finite(tiny_exit_model):
    model = tiny_exit_model
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    loss = model.all_exit_logits(x)[:-1].logsumexp(-1).sum()
    loss.backward()
    for p in model.ims.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_confidence_features_against_naive_loop():
    torch.manual_seed(1)
    probs = torch.randn(7, 5, dtype=torch.float64).softmax(-1)
    got = confidence_features(probs)
    for row, p in zip(got, probs.tolist(), strict=True):
        s = sorted(p, reverse=True)
        ent = -sum(q * math.log(q) for q in p)
        sq = [q * q / sum(r * r for r in p) for q in p]
        sq_ent = -sum(q * math.log(q) for q in sq)
        torch.testing.assert_close(row, torch.tensor([s[0], ent, s[0] - s[1], sq_ent]).double())


def test_gate_is_sigmoid_of_linear_features():
    gate = ExitGate().double()
    probs = torch.randn(4, 3, dtype=torch.float64).softmax(-1)
    want = torch.sigmoid(gate.linear(confidence_features(probs))).squeeze(-1)
    torch.testing.assert_close(gate(probs), want)


def test_hazard_exit_probabilities_against_naive_loop():
    torch.manual_seed(2)
    g = torch.rand(5, 4, dtype=torch.float64)
    p = gates.exit_probabilities(g)
    for b in range(5):
        survive = 1.0
        for ell in range(4):
            torch.testing.assert_close(p[b, ell], g[b, ell] * survive)
            survive *= 1 - g[b, ell]
        torch.testing.assert_close(p[b, 4], survive)
    torch.testing.assert_close(p.sum(-1), torch.ones(5, dtype=torch.float64))


def test_generic_wrapper_with_cnn_blocks():
    torch.manual_seed(0)
    blocks = [nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2), nn.Conv2d(6, 6, 3)]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    model = EarlyExitModel(blocks, head, global_pool, [4, 6], n_classes=3)
    assert model.all_exit_logits(torch.randn(2, 1, 9, 9)).shape == (3, 2, 3)
    with pytest.raises(ValueError, match="d_features"):
        EarlyExitModel(blocks, head, global_pool, [4], n_classes=3)
    with pytest.raises(ValueError, match=">= 2 blocks"):
        EarlyExitModel(blocks[:1], head, global_pool, [], n_classes=3)
