import math

import pytest
import torch

from gatelab import gates
from gatelab.comm.graph import (
    CommGraph,
    TemporalGate,
    comm_rate,
    gate_graph,
    n_senders,
    scaled_gumbel_topk,
)


@pytest.mark.parametrize(
    ("sparsity", "agents", "k"),
    [(0.4, 5, 2), (0.0, 5, 1), (1.0, 5, 4), (0.4, 3, 1), (0.5, 2, 1), (0.375, 9, 3), (0.5, 6, 3)],
)
def test_k_excludes_self(sparsity, agents, k):
    assert n_senders(sparsity, agents) == k
    assert k == max(1, math.floor(sparsity * (agents - 1) + 0.5))


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_bad_sparsity(bad):
    with pytest.raises(ValueError, match="sparsity"):
        n_senders(bad, 5)


def test_sampled_graphs_have_k_others_and_self():
    graph = CommGraph(6, 0.4, "learned", seed=3)
    sample = graph.sample(500, seed=1)  # (B, A, A)
    eye = torch.eye(6)
    assert torch.equal(torch.diagonal(sample, dim1=-2, dim2=-1), torch.ones(500, 6))
    assert torch.equal((sample * (1 - eye)).sum(-1), torch.full((500, 6), 2.0))
    assert torch.equal(graph.sample(500, seed=1), sample)  # a deterministic function of the seed
    assert not torch.equal(graph.sample(500, seed=2), sample)


def test_execution_graph_is_topk_of_alpha_naive():
    graph = CommGraph(5, 0.5, "learned", seed=0)
    alpha = graph.alpha.detach()
    expected = torch.eye(5)
    for i in range(5):
        others = sorted((j for j in range(5) if j != i), key=lambda j: -alpha[i, j].item())
        expected[i, others[:2]] = 1
    assert torch.equal(graph.execution(), expected)


def test_symmetry_breaking_init():
    alpha = CommGraph(5, 0.4, "learned", seed=0).alpha.detach()
    off = alpha[~torch.eye(5, dtype=torch.bool)]
    assert off.unique().numel() == off.numel()  # no ties: the graph is not degenerate


def test_fixed_graphs():
    rand = CommGraph(5, 0.4, "random", seed=0)
    assert torch.equal(rand.sample(3, 0)[0], rand.execution())
    assert torch.equal((rand.execution() - torch.eye(5)).sum(-1), torch.full((5,), 2.0))
    assert not torch.equal(rand.execution(), CommGraph(5, 0.4, "random", seed=1).execution())
    assert torch.equal(CommGraph(4, 0.4, "full").execution(), torch.ones(4, 4))
    assert torch.equal(CommGraph(4, 0.4, "none").execution(), torch.eye(4))


def test_relax_keeps_the_stored_value_and_reaches_alpha():
    graph = CommGraph(5, 0.4, "learned", seed=0)
    stored = graph.sample(8, seed=5)
    relaxed = graph.relax(stored, seed=5)
    assert torch.equal(relaxed, stored)
    weights = torch.randn(8, 5, 5, generator=torch.Generator().manual_seed(0))
    (relaxed * weights).sum().backward()
    assert graph.alpha.grad is not None and graph.alpha.grad.abs().sum() > 0
    assert torch.all(torch.diagonal(graph.alpha.grad) == 0)  # self is never a choice


def test_scaled_gumbel_topk_ends():
    logits = torch.randn(6, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logits.requires_grad_(True)
    weights = torch.randn(6, 4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # noise 1: the shared gates.gumbel_topk, value and gradient
    ours = scaled_gumbel_topk(logits, 2, 0.7, 1.0, torch.Generator().manual_seed(3))
    ref = gates.gumbel_topk(logits, 2, 0.7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours, ref)
    (g1,) = torch.autograd.grad((ours * weights).sum(), logits)
    (g2,) = torch.autograd.grad((ref * weights).sum(), logits)
    torch.testing.assert_close(g1, g2)
    # noise 0: the plain top-2 of the logits (reference: argsort), gradient still flows
    hard = scaled_gumbel_topk(logits, 2, 0.7, 0.0, torch.Generator().manual_seed(3))
    top2 = logits.detach().argsort(-1, descending=True)[..., :2]
    assert torch.equal(hard.detach(), torch.zeros_like(hard).scatter(-1, top2, 1.0))
    (g0,) = torch.autograd.grad((hard * weights).sum(), logits)
    assert g0.abs().sum() > 0
    with pytest.raises(ValueError, match="noise"):
        scaled_gumbel_topk(logits, 2, 0.7, 1.5, torch.Generator())


def test_gumbel_first_pick_follows_softmax():
    # k = 1: the hard sample is a categorical draw from softmax(logits) (checks the Gumbel noise)
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5], dtype=torch.float64)
    draws = gates.gumbel_topk(
        logits.expand(40000, -1), 1, generator=torch.Generator().manual_seed(0)
    )
    freq = draws.mean(0)
    torch.testing.assert_close(freq, torch.softmax(logits, 0), atol=0.01, rtol=0)


def test_gate_graph_and_comm_rate_naive():
    g = torch.Generator().manual_seed(0)
    graph = CommGraph(4, 0.5, "learned").sample(6, seed=0)
    listen = (torch.rand(6, 4, generator=g) > 0.5).float()
    gated = gate_graph(graph, listen)
    rate = comm_rate(gated)
    for b in range(6):
        edges = 0
        for i in range(4):
            for j in range(4):
                expect = 1.0 if i == j else graph[b, i, j].item() * listen[b, i].item()
                assert gated[b, i, j].item() == expect
                edges += expect if i != j else 0
        assert rate[b].item() == pytest.approx(edges / 12)
    assert comm_rate(torch.ones(4, 4)).item() == 1.0 and comm_rate(torch.eye(4)).item() == 0.0


def test_temporal_gate_shape_and_grad():
    gate = TemporalGate(7)
    obs = torch.randn(3, 4, 7)
    p = gate(obs)
    assert p.shape == (3, 4) and torch.all((p > 0) & (p < 1))
    p.sum().backward()
    assert gate.linear.weight.grad.abs().sum() > 0
