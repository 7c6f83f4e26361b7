"""The temporal gate's hybrid estimator: joint log-probs, ratio = 1, score-function gradient."""

from dataclasses import replace

import pytest
import torch

from gatelab.comm.gating import gate_schedule, gate_temperature
from gatelab.comm.graph import (
    CommGraph,
    TemporalGate,
    agent_comm_rate,
    bernoulli_entropy,
    bernoulli_logp,
    comm_rate,
    gate_graph,
)
from gatelab.comm.ppo import (
    Batch,
    collect,
    comm_penalty,
    listen_gates,
    ppo_losses,
    recompute_gate_logp,
    recompute_logp,
)
from gatelab.comm.train import TrainConfig, build, train

TINY = TrainConfig(
    agents=3, grid=4, episode_limit=10, n_envs=16, updates=2, d_model=16, ppo_epochs=2,
    alpha_warmup_updates=1, checkpoint_every=1, temporal_gate=True, comm_cost=0.1,
    gate_estimator="hybrid",
)  # fmt: skip


def _flat_batch(ro, adv):
    rows = ro.alive.flatten()
    envs = torch.arange(ro.alive.numel())[rows] % ro.alive.shape[1]
    keys = ("obs", "actions", "logp", "acting", "listen", "gate_logp")
    flat = {k: getattr(ro, k).flatten(0, 1)[rows] for k in keys}
    return Batch(**flat, adv=adv(flat["acting"]), targets=torch.zeros(flat["acting"].shape),
                 env_index=envs), envs  # fmt: skip


@pytest.mark.parametrize(("hidden", "temp"), [(0, 1.0), (8, 1.0), (0, 0.3)])
def test_joint_ratio_is_one_before_the_first_update(hidden, temp):
    cfg = replace(TINY, gate_hidden=hidden)
    env, model = build(cfg)
    gen = torch.Generator().manual_seed(0)
    ro = collect(model, env, env_seed=3, graph_seed=11, generator=gen, gate_temp=temp)
    model.train()
    joint = recompute_logp(model, ro, relax=True) + recompute_gate_logp(model, ro, temp)
    ratio = (joint - ro.logp - ro.gate_logp).exp()[ro.alive]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)
    assert 0 < ro.listen.mean() < 1  # sampled gates: both decisions occur
    # the stored gate log-probs are those of the stored decisions (independent: torch.distributions)
    p = torch.sigmoid(model.gate.logits(ro.obs).detach() / temp)
    ref = torch.distributions.Bernoulli(probs=p).log_prob(ro.listen)
    torch.testing.assert_close(ro.gate_logp, ref, atol=1e-5, rtol=0)
    # the update's loss sees ratio 1 too: no KL, nothing clipped
    batch, envs = _flat_batch(ro, lambda acting: torch.randn(acting.shape))
    parts = ppo_losses(model, batch, ro.graph[envs], 0.2, hybrid_gate=True, gate_temp=temp)
    assert abs(parts.approx_kl.item()) < 1e-6 and parts.clipfrac.item() == 0.0
    # a decision flipped after the fact changes the joint ratio (the gate term is really in it)
    flipped = batch._replace(listen=1 - batch.listen)
    assert ppo_losses(model, flipped, ro.graph[envs], 0.2, True, temp).clipfrac > 0
    if temp != 1.0:  # the temperature is really used: at T = 1 the same rollout's ratios move
        assert ppo_losses(model, batch, ro.graph[envs], 0.2, True, 1.0).approx_kl > 1e-4


def test_gate_temperature_schedule_and_sampling():
    cfg = replace(TINY, updates=11, gate_warmup=0.0, gate_temp_min=0.2)
    assert [gate_temperature(cfg, u) for u in (0, 5, 10)] == pytest.approx([1.0, 0.6, 0.2])
    assert gate_temperature(replace(cfg, gate_temp_min=1.0), 7) == 1.0
    with pytest.raises(ValueError, match="hybrid"):
        replace(cfg, gate_estimator="st")
    _, model = build(cfg)
    obs = torch.randn(4000, 3, model.cfg.obs_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.gate.linear.bias.fill_(0.3)  # p = sigmoid(0.3 + small) ~ 0.57; at T = 0.2 ~ 0.82
        want = torch.sigmoid(model.gate.logits(obs) / 0.2).mean()
    z = listen_gates(model, obs, True, torch.Generator().manual_seed(1), temp=0.2)
    assert z.mean().item() == pytest.approx(want.item(), abs=0.01)


def test_gate_gets_the_score_function_gradient_closed_form():
    # no graph at all: listening changes nothing, so the straight-through path is exactly zero and
    # the gate's gradient is the score-function term alone, over every agent (frozen ones too):
    #   d policy / d b = -mean_i adv_i (z_i - p_i),  d policy / d w = -mean_i adv_i (z_i - p_i) o_i
    cfg = replace(TINY, graph="none", n_envs=24, episode_limit=12)
    env, model = build(cfg)
    ro = collect(model, env, env_seed=1, graph_seed=2, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5)
    batch, envs = _flat_batch(ro, lambda acting: torch.randn(acting.shape, generator=g))
    assert not batch.acting.all()  # some predators sat on the prey: their gate term stays
    model.train()
    parts = ppo_losses(model, batch, ro.graph[envs], 0.2, hybrid_gate=True)
    model.zero_grad()
    parts.policy.backward()
    obs, z, adv = batch.obs.double(), batch.listen.double(), batch.adv.double()
    w, b = model.gate.linear.weight.detach().double(), model.gate.linear.bias.detach().double()
    p = torch.sigmoid(obs @ w[0] + b)
    score = adv * (z - p)  # (M, A)
    n = score.numel()
    expect_b = -score.sum() / n
    expect_w = -(score[..., None] * obs).sum((0, 1)) / n
    torch.testing.assert_close(model.gate.linear.bias.grad.double()[0], expect_b, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        model.gate.linear.weight.grad.double()[0], expect_w, atol=1e-6, rtol=1e-4
    )


def test_straight_through_path_is_kept():
    # with a graph, the gate also gets d(action log-prob)/d(listen): the hybrid gradient differs
    # from the pure score-function one computed as in the closed-form test
    env, model = build(replace(TINY, graph="full"))
    ro = collect(model, env, env_seed=1, graph_seed=2, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5)
    batch, envs = _flat_batch(ro, lambda acting: torch.randn(acting.shape, generator=g))
    model.train()
    ppo_losses(model, batch, ro.graph[envs], 0.2, hybrid_gate=True).policy.backward()
    p = model.gate(batch.obs).detach()
    score_only = -(batch.adv * (batch.listen - p)).mean()
    assert abs(model.gate.linear.bias.grad[0].item() - score_only.item()) > 1e-6


def test_comm_penalty_naive_loop():
    g = torch.Generator().manual_seed(0)
    t, b, a = 5, 3, 4
    graph = CommGraph(a, 0.5, "learned").sample(b, seed=1)
    listen = (torch.rand(t, b, a, generator=g) > 0.4).float()
    alive = torch.ones(t, b, dtype=torch.bool)
    alive[3:, 1] = False
    pen = comm_penalty(graph, listen, alive, 0.3)
    for s in range(t):
        for e in range(b):
            for i in range(a):
                edges = sum(graph[e, i, j].item() for j in range(a) if j != i) * listen[s, e, i]
                expect = 0.3 * edges / (a - 1) if alive[s, e] else 0.0
                assert pen[s, e, i].item() == pytest.approx(float(expect))
    # the agents' mean is the communication rate: c prices one unit of comm rate
    rates = agent_comm_rate(graph[None], listen).mean(-1)
    torch.testing.assert_close(rates, comm_rate(gate_graph(graph[None], listen)))


def test_bernoulli_helpers_match_torch_distributions():
    logits = torch.linspace(-30, 30, 13, dtype=torch.float64)
    dist = torch.distributions.Bernoulli(logits=logits)
    for z in (0.0, 1.0):
        zz = torch.full_like(logits, z)
        torch.testing.assert_close(bernoulli_logp(logits, zz), dist.log_prob(zz))
    torch.testing.assert_close(bernoulli_entropy(logits), dist.entropy())


def test_mlp_gate_shape_grad_and_open_start():
    gate = TemporalGate(7, init_bias=1.0, hidden=16)
    obs = torch.randn(3, 4, 7, generator=torch.Generator().manual_seed(0))
    p = gate(obs)
    assert p.shape == (3, 4)
    assert torch.all((p - torch.sigmoid(torch.tensor(1.0))).abs() < 0.2)  # near the open bias
    p.sum().backward()
    assert gate.body[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="hidden"):
        TemporalGate(7, hidden=-1)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"gate_estimator": "reinforce"}, "gate_estimator"),
        ({"gate_estimator": "hybrid", "gate_anneal": True}, "gate_anneal"),
        ({"gate_hidden": -2}, "gate_hidden"),
    ],
)
def test_bad_gate_config(changes, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**changes)


def test_hybrid_trains_and_logs_the_threshold_rate():
    history = train(TINY).history
    assert len(history) == 2
    for h in history:
        assert 0.0 <= h["train/comm_rate_threshold"] <= 1.0
        assert all(torch.isfinite(torch.tensor(v)) for v in h.values())


def test_gate_schedule_closed_form():
    cfg = replace(TINY, updates=20, comm_cost=0.4, gate_warmup=0.5, cost_ramp=0.2)
    got = [gate_schedule(cfg, u) for u in (0, 9, 10, 11, 13, 14, 19)]
    # open until update 10, then the cost rises by 0.4 / 4 per update, then stays
    want = [(False, 0.0), (False, 0.0), (True, 0.1), (True, 0.2), (True, 0.4), (True, 0.4),
            (True, 0.4)]  # fmt: skip
    for (on, cost), (on_ref, cost_ref) in zip(got, want, strict=True):
        assert on == on_ref and cost == pytest.approx(cost_ref)
    assert gate_schedule(replace(cfg, gate_warmup=0.0, cost_ramp=0.0), 0) == (True, 0.4)
    with pytest.raises(ValueError, match="gate_warmup"):
        replace(cfg, gate_warmup=1.5)


def test_warmup_keeps_gates_open_and_untrained():
    cfg = replace(TINY, updates=3, gate_warmup=0.67, checkpoint_every=10)
    _, fresh = build(cfg)
    result = train(cfg)
    h = result.history
    assert [r["train/comm_cost"] for r in h[:2]] == [0.0, 0.0]
    assert all(r["train/comm_rate"] == pytest.approx(0.5) for r in h[:2])  # k = 1 of 2, all open
    assert h[2]["train/comm_rate"] < 0.5  # then sampled gates close some rows
    # a run that is all warm-up leaves the gate at its initial weights
    two = train(replace(cfg, updates=2, gate_warmup=1.0)).model
    for p, q in zip(two.gate.parameters(), fresh.gate.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    env, model = build(cfg)
    ro = collect(model, env, 0, 0, torch.Generator().manual_seed(0), gates=False)
    assert ro.listen is None and ro.gate_logp is None


def test_budget_cost_is_dual_ascent_and_resumes_exactly(tmp_path, assert_resumes_exactly):
    cfg = replace(TINY, updates=5, gate_warmup=0.4, comm_cost=0.05, comm_budget=0.2,
                  budget_lr=0.5, checkpoint_every=1)  # fmt: skip
    h = train(cfg, tmp_path / "a").history
    assert [r["train/comm_cost"] for r in h[:2]] == [0.0, 0.0]  # warm-up
    assert h[2]["train/comm_cost"] == pytest.approx(0.05)  # the initial multiplier
    for prev, row in zip(h[2:], h[3:], strict=False):  # lambda <- max(0, lambda + eta (r - b))
        want = max(0.0, prev["train/comm_cost"] + 0.5 * (prev["train/comm_rate_threshold"] - 0.2))
        assert row["train/comm_cost"] == pytest.approx(want)

    assert_resumes_exactly(cfg, tmp_path / "b", 3, h)
    with pytest.raises(ValueError, match="cost_ramp"):
        replace(cfg, cost_ramp=0.2)


def test_hybrid_critic_reads_the_ungated_graph():
    # the baseline may not depend on the listen decisions: stored values = the encoder's value
    # head on the *ungated* graph, and they differ from the gated graph's values
    env, model = build(replace(TINY, graph="full"))
    ro = collect(model, env, 1, 2, torch.Generator().manual_seed(0), open_critic=True)
    t, b = ro.obs.shape[:2]
    graph = ro.graph[None].expand(t, -1, -1, -1).flatten(0, 1)
    with torch.no_grad():
        open_values = model.encode(ro.obs.flatten(0, 1), graph)[1].unflatten(0, (t, b))
        gated = model.encode(ro.obs.flatten(0, 1), gate_graph(graph, ro.listen.flatten(0, 1)))[1]
    torch.testing.assert_close(ro.values, open_values)
    assert not torch.allclose(ro.values, gated.unflatten(0, (t, b)))


def test_budget_changes_only_the_gated_variant():
    from gatelab.comm.compare import BUDGETED_GATES, VARIANTS, variant_config

    base = TrainConfig(updates=200)
    for variant in VARIANTS:
        plain = variant_config(base, variant, 3, 0.1)
        budgeted = variant_config(base, variant, 3, 0.1, comm_budget=0.24)
        if variant != "commformer_tg":
            assert budgeted == plain  # the baselines' runs stay valid
            continue
        assert budgeted == replace(plain, **BUDGETED_GATES["causal"], comm_budget=0.24)
        assert budgeted.gate_estimator == "causal"  # the default budgeted estimator
        hybrid = variant_config(base, variant, 3, 0.1, 0.24, "hybrid")
        assert hybrid == replace(plain, **BUDGETED_GATES["hybrid"], comm_budget=0.24)
        assert plain.gate_estimator == "st" and plain.comm_cost == 0.1
    with pytest.raises(ValueError, match="budgeted gates"):
        variant_config(base, "commformer_tg", 3, 0.1, 0.24, "st")
