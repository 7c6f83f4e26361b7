import math

import pytest
import torch

from gatelab.comm.graph import gate_graph
from gatelab.comm.model import CommConfig, CommFormer, graph_attention

# not a constant shift: the observation LayerNorm would cancel that
BUMP = torch.tensor([3.0, -2.0, 0.5, 1.0, -4.0, 2.0], dtype=torch.float64)


def make(**kw):
    torch.manual_seed(0)
    cfg = CommConfig(obs_dim=6, n_actions=4, n_agents=5, d_model=16, n_heads=2, **kw)
    return CommFormer(cfg).double()


def naive_attention(q, k, v, ek, ev, graph, self_kv=None):
    b, a, h, d = q.shape
    out = torch.zeros_like(q)
    for bi in range(b):
        for i in range(a):
            for hh in range(h):
                logits, values = [], []
                for j in range(a):
                    kj, vj = k[bi, j, hh], v[bi, j, hh]
                    if self_kv is not None and i == j:
                        kj, vj = self_kv[0][hh], self_kv[1][hh]
                    logits.append(q[bi, i, hh] @ (kj + ek[i, j, hh]) / math.sqrt(d))
                    values.append(vj + ev[i, j, hh])
                logits = torch.stack(logits)
                w = graph[bi, i] * torch.exp(logits - logits.max())
                w = w / w.sum()
                out[bi, i, hh] = (w[:, None] * torch.stack(values)).sum(0)
    return out


@pytest.mark.parametrize("with_self", [False, True])
def test_graph_attention_matches_naive_loop(with_self):
    g = torch.Generator().manual_seed(0)
    b, a, h, d = 3, 4, 2, 5

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    q, k, v = rnd(b, a, h, d), rnd(b, a, h, d), rnd(b, a, h, d)
    ek, ev = rnd(a, a, h, d), rnd(a, a, h, d)
    graph = (torch.rand(b, a, a, generator=g) > 0.5).double()
    graph = torch.maximum(graph, torch.eye(a, dtype=torch.float64))
    self_kv = (rnd(h, d), rnd(h, d)) if with_self else None
    expected = naive_attention(q, k, v, ek, ev, graph, self_kv)
    torch.testing.assert_close(graph_attention(q, k, v, ek, ev, graph, self_kv), expected)
    rows = torch.tensor([2])
    got = graph_attention(q[:, rows], k, v, ek, ev, graph, self_kv, rows)
    torch.testing.assert_close(got, expected[:, rows])


def test_shapes_including_batch_one():
    model = make()
    for b in (1, 7):
        obs = torch.randn(b, 5, 6, dtype=torch.float64)
        graph = model.graph.sample(b, 0).double()
        out = model(obs, graph, None, torch.zeros(b, 5, dtype=torch.long))
        assert out.logits.shape == (b, 5, 4) and out.values.shape == (b, 5)
        actions, logp, values, _ = model.act(obs, graph, None, torch.Generator().manual_seed(0))
        assert actions.shape == logp.shape == values.shape == (b, 5)


def test_non_neighbour_cannot_change_output():
    model = make(graph="learned", sparsity=0.25)  # k = 1 sender per receiver
    graph = model.graph.execution()[None].double()  # (1, A, A)
    g = torch.Generator().manual_seed(1)
    obs = torch.randn(1, 5, 6, generator=g, dtype=torch.float64)
    actions = torch.randint(0, 4, (1, 5), generator=g)
    base = model(obs, graph, None, actions)
    receiver = 3
    strangers = [j for j in range(5) if graph[0, receiver, j] == 0]
    # 2-hop messages (encoder then decoder cross-attention) can pass through a neighbour; take a
    # sender that no neighbour of the receiver listens to either
    hops = graph[0] @ graph[0]
    far = [j for j in strangers if hops[receiver, j] == 0]
    assert far  # with this seed agents 1 and 4 are not even 2 hops from agent 3
    for j in far:
        changed = obs.clone()
        changed[0, j] += BUMP
        other = actions.clone()
        other[0, j] = (other[0, j] + 1) % 4
        out = model(changed, graph, None, other)
        torch.testing.assert_close(out.logits[0, receiver], base.logits[0, receiver])
        torch.testing.assert_close(out.values[0, receiver], base.values[0, receiver])
        assert not torch.allclose(out.logits[0, j], base.logits[0, j])  # the change is real
    # one layer only: a non-neighbour's observation never reaches the receiver's encoder state
    changed = obs.clone()
    changed[0, strangers[0]] += BUMP
    x0, _ = model.encode(obs, graph)
    x1, _ = model.encode(changed, graph)
    torch.testing.assert_close(x1[0, receiver], x0[0, receiver])
    # and a neighbour's observation does change it (the test can fail)
    neighbour = next(j for j in range(5) if j != receiver and graph[0, receiver, j] == 1)
    changed = obs.clone()
    changed[0, neighbour] += BUMP
    assert not torch.allclose(model.encode(changed, graph)[0][0, receiver], x0[0, receiver])


def test_closed_gate_isolates_the_receiver():
    model = make(graph="full", temporal_gate=True)
    graph = model.graph.execution()[None].double()
    listen = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    obs = torch.randn(1, 5, 6, dtype=torch.float64)
    actions = torch.tensor([[0, 1, 2, 3, 0]])
    base = model(obs, graph, listen, actions)
    changed, other = obs.clone(), actions.clone()
    changed[0, [0, 1, 3, 4]] += BUMP
    other[0, :2] = torch.tensor([3, 3])  # action messages of agents decoded before agent 2
    out = model(changed, graph, listen, other)
    torch.testing.assert_close(out.logits[0, 2], base.logits[0, 2])
    assert not torch.allclose(out.logits[0, 3], base.logits[0, 3])
    assert torch.equal(gate_graph(graph, listen)[0, 2], torch.eye(5, dtype=torch.float64)[2])


def test_decoder_is_autoregressive_and_act_matches_teacher_forcing():
    model = make(graph="full")
    obs = torch.randn(4, 5, 6, dtype=torch.float64)
    graph = model.graph.sample(4, 0).double()
    actions, logp, _, _ = model.act(obs, graph, None, torch.Generator().manual_seed(0))
    out = model(obs, graph, None, actions)
    forced = torch.log_softmax(out.logits, -1).gather(-1, actions[..., None]).squeeze(-1)
    torch.testing.assert_close(forced, logp)
    later = actions.clone()
    later[:, 3:] = (later[:, 3:] + 1) % 4  # agents 0..2 never see the actions of agents 3, 4
    torch.testing.assert_close(model(obs, graph, None, later).logits[:, :3], out.logits[:, :3])


def test_gradient_reaches_alpha_and_all_finite():
    model = make(graph="learned")
    stored = model.graph.sample(6, seed=3).double()
    graph = model.graph.relax(stored, seed=3)
    obs = torch.randn(6, 5, 6, dtype=torch.float64)
    out = model(obs, graph, None, torch.randint(0, 4, (6, 5)))
    (out.logits.square().sum() + out.values.sum()).backward()
    assert model.graph.alpha.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


def test_config_errors():
    with pytest.raises(ValueError, match="sparsity"):
        CommConfig(obs_dim=3, n_actions=2, n_agents=3, sparsity=2.0)
    with pytest.raises(ValueError, match="n_agents"):
        CommConfig(obs_dim=3, n_actions=2, n_agents=1)
    with pytest.raises(ValueError, match="graph"):
        CommConfig(obs_dim=3, n_actions=2, n_agents=3, graph="star")
