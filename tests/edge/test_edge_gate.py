import numpy as np
import pytest
import torch

from gatelab.edge.model import EdgeGate, GateConfig, mixture, mixture_nll, subset_mask
from gatelab.edge.train import GateData, TrainConfig, evaluate_gate, train_gate

FAST = TrainConfig(d_hidden=16, max_steps=100, patience=30, lr=2e-2)


def _pool(n, rng, n_experts=4, d=8):
    """Expert e is right (p=0.9) on cluster e and near-uniform elsewhere: best expert known."""
    centres = np.eye(n_experts, d) * 3
    cluster = rng.integers(0, n_experts, n)
    x = centres[cluster] + rng.normal(size=(n, d)) * 0.5
    answer = rng.integers(0, 4, n)
    probs = rng.dirichlet(np.full(4, 10.0), size=(n, n_experts))  # off-cluster: near-uniform
    good = np.full((n, 4), 0.1 / 3)
    good[np.arange(n), answer] = 0.9
    probs[np.arange(n), cluster] = good
    return GateData(x, probs, np.ones((n, n_experts), dtype=bool), answer), cluster


@pytest.fixture(scope="module")
def pools():
    rng = np.random.default_rng(0)
    return _pool(160, rng), _pool(60, rng), _pool(150, rng)


@pytest.fixture(scope="module")
def full_gate(pools):
    (train, _), (val, _), _ = pools
    return train_gate(train, val, FAST)


def test_gate_finds_the_known_best_expert(pools, full_gate):
    _, _, (test, cluster) = pools
    gate, history = full_gate
    with torch.no_grad():
        top1 = gate(torch.as_tensor(test.x)).argmax(-1).numpy()
    assert (top1 == cluster).mean() > 0.95
    assert history[-1]["train/nll"] < history[0]["train/nll"]
    uniform = -np.log(test.probs.mean(1)[np.arange(len(test.answer)), test.answer]).mean()
    assert evaluate_gate(gate, test)["nll"] < 0.5 * uniform


def test_optimality_preserving_restriction(pools, full_gate):
    subset = frozenset({0, 2})
    (train, _), (val, _), (test, _) = pools
    gate, _ = full_gate
    retrained, _ = train_gate(train, val, FAST, subset=subset)
    restricted = evaluate_gate(gate, test, subset)["nll"]
    best = evaluate_gate(retrained, test, subset)["nll"]
    assert restricted <= best + 0.05


def test_mixture_matches_naive_loop_and_invariants():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    probs = torch.softmax(torch.randn(6, 5, 4, generator=gen, dtype=torch.float64), -1)
    allowed = torch.rand(6, 5, generator=gen) < 0.7
    allowed[0] = False  # a query nobody answered
    mixed, weights = mixture(logits, probs, allowed, top_k=2)
    for b in range(6):
        idx = [e for e in range(5) if allowed[b, e]]
        if not idx:
            torch.testing.assert_close(mixed[b], torch.full((4,), 0.25, dtype=torch.float64))
            assert weights[b].sum() == 0
            continue
        top = sorted(idx, key=lambda e: -float(logits[b, e]))[:2]
        w = torch.softmax(logits[b, top], 0)
        torch.testing.assert_close(mixed[b], (w[:, None] * probs[b, top]).sum(0))
        assert torch.isclose(weights[b].sum(), torch.tensor(1.0, dtype=torch.float64))
        assert int((weights[b] > 0).sum()) == len(top)
    torch.testing.assert_close(mixed.sum(-1), torch.ones(6, dtype=torch.float64))


def test_gate_shapes_gradient_and_seed():
    gate = EdgeGate(GateConfig(n_experts=3, d_in=7, d_hidden=5)).double()
    assert gate(torch.zeros(1, 7, dtype=torch.float64)).shape == (1, 3)
    x = torch.randn(4, 7, dtype=torch.float64)
    probs = torch.softmax(torch.randn(4, 3, 4, dtype=torch.float64), -1)
    torch.nn.init.normal_(gate.out.weight)
    mixed, _ = mixture(gate(x), probs, subset_mask({0, 1, 2}, 3), top_k=3)
    loss = mixture_nll(mixed, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in gate.parameters())
    with pytest.raises(ValueError, match="GateConfig"):
        GateConfig(n_experts=0)
    with pytest.raises(ValueError, match="TrainConfig"):
        TrainConfig(lr=0)


def test_training_is_deterministic(pools):
    (train, _), (val, _), _ = pools
    cfg = TrainConfig(d_hidden=8, max_steps=10, patience=10, seed=3)
    _, h1 = train_gate(train, val, cfg)
    _, h2 = train_gate(train, val, cfg)
    assert h1 == h2
