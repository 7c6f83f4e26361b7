import json

import numpy as np
import pytest
import torch
from comm_config import config

from gatelab.comm.ppo import (
    Batch,
    ValueNorm,
    collect,
    gae,
    listen_gates,
    ppo_losses,
    recompute_logp,
)
from gatelab.comm.train import build, graph_noise, load_model, train
from gatelab.runs import read_metrics

TINY = config(
    agents=3, grid=4, episode_limit=6, n_envs=6, updates=2, d_model=16, ppo_epochs=2,
    alpha_warmup_updates=1, checkpoint_every=1,
)  # fmt: skip


@pytest.mark.parametrize(("gate", "noise"), [(False, 1.0), (True, 1.0), (True, 0.5), (False, 0.0)])
def test_every_ratio_is_one_before_the_first_update(gate, noise):
    cfg = config(TINY, temporal_gate=gate, comm_cost=0.1, n_envs=16, episode_limit=10)
    env, model = build(cfg)
    gen = torch.Generator().manual_seed(0)
    ro = collect(
        model, env, env_seed=3, graph_seed=11, generator=gen, graph_noise=noise, gate_noise=noise
    )
    model.train()
    logp = recompute_logp(model, ro, relax=True)  # the update's path, alpha attached
    ratio = (logp - ro.logp).exp()[ro.alive]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)
    assert ro.graph.sum(-1).min() < 3  # the graph is really sparse (k = 1 of 2)
    if gate:  # sampled gates: some agents did not listen at some steps
        assert ro.listen is not None and 0 < ro.listen.mean() < 1
    if noise == 0.0:  # no noise: the rollout's graph is the execution graph in every episode
        assert torch.equal(ro.graph, model.graph.execution().expand_as(ro.graph))
        return
    # with a graph drawn afresh (the public code's bug) the ratios are not all one
    fresh = model.graph.sample(ro.graph.shape[0], seed=12345)
    if not torch.equal(fresh, ro.graph):
        ro2 = ro._replace(graph=fresh)
        assert not torch.allclose(
            recompute_logp(model, ro2, relax=False)[ro.alive], ro.logp[ro.alive]
        )


def test_gate_noise_ends():
    cfg = config(TINY, temporal_gate=True)
    _, model = build(cfg)
    obs = torch.randn(64, 3, model.cfg.obs_dim, generator=torch.Generator().manual_seed(0)) * 10
    p = model.gate(obs).detach()
    u = torch.rand(p.shape, generator=torch.Generator().manual_seed(1))
    sampled = listen_gates(model, obs, True, torch.Generator().manual_seed(1), noise=1.0)
    assert torch.equal(sampled, (u < p).float())  # Bernoulli(p) with the same uniforms
    threshold = listen_gates(model, obs, True, torch.Generator().manual_seed(1), noise=0.0)
    assert torch.equal(threshold, (p > 0.5).float())
    assert torch.equal(threshold, listen_gates(model, obs, False, None))  # = evaluation gates


def test_graph_noise_schedule():
    cfg = config(TINY, updates=10, graph_anneal=0.5)
    assert [graph_noise(cfg, u) for u in (0, 1, 5, 9)] == [1.0, 0.8, 0.0, 0.0]
    assert graph_noise(config(cfg, graph_anneal=0.0), 0) == 0.0
    with pytest.raises(ValueError, match="graph_anneal"):
        config(cfg, graph_anneal=-1.0)


def test_frozen_agents_leave_the_policy_loss():
    cfg = config(TINY, n_envs=8, episode_limit=10)
    env, model = build(cfg)
    ro = collect(model, env, env_seed=1, graph_seed=2, generator=torch.Generator().manual_seed(0))
    rows = ro.alive.flatten()
    envs = torch.arange(ro.alive.numel())[rows] % ro.alive.shape[1]  # episode of each sample
    flat = {k: getattr(ro, k).flatten(0, 1)[rows] for k in ("obs", "actions", "logp", "acting")}
    acting = flat["acting"]
    assert not acting.all() and acting.any()  # some predators sat on the prey
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(acting.shape, generator=g)

    def policy_and_entropy(adv):
        batch = Batch(**flat, adv=adv, targets=torch.zeros_like(adv), listen=None,
                      env_index=envs)  # fmt: skip
        return ppo_losses(model, batch, ro.graph[envs], 0.2)

    base = policy_and_entropy(adv)
    # reference: the mean of -A (ratio = 1) over acting agents only, by a plain loop
    expected = -sum(adv[i, j] for i, j in acting.nonzero().tolist()) / acting.sum()
    torch.testing.assert_close(base.policy, torch.as_tensor(float(expected)), atol=1e-5, rtol=0)
    moved = policy_and_entropy(torch.where(acting, adv, adv + 100.0))  # frozen agents' adv change
    torch.testing.assert_close(moved.policy, base.policy)


def test_gae_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    t, b, a = 7, 3, 2
    rewards = torch.randn(t, b, a, generator=g, dtype=torch.float64)
    values = torch.randn(t, b, a, generator=g, dtype=torch.float64)
    done = torch.zeros(t, b, dtype=torch.bool)
    done[2, 0] = done[4:, 1] = done[-1, 2] = True
    adv, ret = gae(rewards, values, done, 0.9, 0.8)
    for bi in range(b):
        for ai in range(a):
            for s in range(t):
                total, discount = 0.0, 1.0
                for u in range(s, t):
                    nv = 0.0 if (done[u, bi] or u + 1 == t) else values[u + 1, bi, ai].item()
                    delta = rewards[u, bi, ai].item() + 0.9 * nv - values[u, bi, ai].item()
                    total += discount * delta
                    if done[u, bi]:
                        break
                    discount *= 0.9 * 0.8
                assert adv[s, bi, ai].item() == pytest.approx(total)
    torch.testing.assert_close(ret, adv + values)


def test_value_norm_matches_numpy():
    norm = ValueNorm()
    rng = np.random.default_rng(0)
    chunks = [rng.normal(3, 2, size=n) for n in (5, 40, 17)]
    for c in chunks:
        norm.update(torch.as_tensor(c))
    data = np.concatenate(chunks)
    assert norm.mean.item() == pytest.approx(data.mean())
    assert norm.var.item() == pytest.approx(data.var())
    x = torch.as_tensor(data[:4])
    torch.testing.assert_close(norm.denormalize(norm.normalize(x)), x)


def strip(history):
    return [{k: v for k, v in h.items() if not k.startswith("perf/")} for h in history]


def test_seed_reproducible_and_warmup_ends():
    a = train(TINY).history
    b = train(TINY).history
    assert strip(a) == strip(b)
    c = train(config(TINY, seed=1)).history
    assert strip(a) != strip(c)
    assert a[0]["graph/alpha_drift"] == 0.0  # warm-up: alpha frozen in update 1
    assert a[1]["graph/alpha_drift"] > 0.0  # and it ends
    for h in a:
        assert all(np.isfinite(v) for v in h.values())


def test_rerun_resumes_or_refuses_never_overwrites(tmp_path):
    cfg = config(TINY, updates=3, temporal_gate=True, comm_cost=0.1)
    straight = train(cfg, tmp_path / "a").history
    train(config(cfg, updates=1), tmp_path / "b")
    weights = (tmp_path / "b" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"another configuration \(differs in: train.ppo.updates"):
        train(cfg, tmp_path / "b")  # 1 update planned, not 3: refused, naming --fresh
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == weights  # untouched
    train(config(cfg, checkpoint_every=2), tmp_path / "b", fresh=True)  # checkpoints at 2, 3
    again = train(cfg, tmp_path / "b")  # checkpoint_every may differ; nothing left to do
    assert again.history == train(cfg, tmp_path / "b").history
    assert strip(again.history) == strip(straight)
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["train"]["ppo"]["updates"] == 3 and saved["model"]["temporal_gate"]
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3]  # no duplicates
    assert sorted(p.name for p in (tmp_path / "b").glob("*.safetensors")) == [
        "model.prev.safetensors",  # the checkpoint before, kept for a torn last one
        "model.safetensors",
    ]
    model, loaded = load_model(tmp_path / "b" / "model.safetensors")
    assert loaded.with_(checkpoint_every=1) == cfg  # the checkpoint of the run made every 2
    for (name, p), q in zip(model.state_dict().items(), again.model.state_dict().values(),
                            strict=True):  # fmt: skip
        torch.testing.assert_close(p, q, msg=name)
    assert (tmp_path / "b" / "graph.png").exists() and (tmp_path / "b" / "comm_rate.png").exists()
    # a folder of something else is refused too
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="--fresh"):
        train(cfg, tmp_path / "c")


def test_killed_before_its_first_checkpoint_starts_over(tmp_path):
    cfg = config(TINY, updates=2, checkpoint_every=5)

    def die(done, _total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "r", progress=die)
    assert [r["step"] for r in read_metrics(tmp_path / "r")] == [1]  # logged, no checkpoint
    history = train(cfg, tmp_path / "r").history
    assert [r["step"] for r in read_metrics(tmp_path / "r")] == [1, 2]
    assert strip(history) == strip(train(cfg).history)


def test_checkpoint_moved_alone_still_loads(tmp_path):
    cfg = config(TINY, memory=True)
    result = train(cfg, tmp_path / "run")
    moved = tmp_path / "elsewhere.safetensors"
    (tmp_path / "run" / "model.safetensors").rename(moved)
    model, loaded = load_model(moved)
    assert loaded.with_(checkpoint_every=1) == cfg  # the checkpoint of the run made every 2
    for p, q in zip(model.state_dict().values(), result.model.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q)
    moved.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a safetensors"):
        load_model(moved)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.safetensors")


def test_smoke_loss_finite_and_improving():
    cfg = config(TINY, grid=3, episode_limit=8, n_envs=32, updates=12, lr=3e-3)
    history = train(cfg).history
    first = np.mean([h["train/return"] for h in history[:3]])
    last = np.mean([h["train/return"] for h in history[-3:]])
    assert last > first
    assert all(np.isfinite(h["loss/value"]) for h in history)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [("sparsity", 1.2, "sparsity"), ("agents", 1, "agents"),
     ("updates", 0, "updates"), ("graph_anneal", -1.0, "graph_anneal"),
     ("env", "no such env", "unknown env"), ("lr", float("nan"), "finite"), ("seed", -1, "seed"),
     ("target_kl", -0.1, "target_kl"), ("grid", 1, "grid"), ("gumbel_tau", 0.0, "gumbel_tau")],
)  # fmt: skip
def test_bad_config(field, value, match):
    with pytest.raises(ValueError, match=match):
        config(**{field: value})


def test_kl_guard_stops_the_update_where_the_kl_passes_the_target():
    # one minibatch per epoch and a large lr: some epoch's step overshoots, the next epoch
    # measures a KL past the target and the update ends there without stepping again
    cfg = config(TINY, updates=1, minibatches=1, ppo_epochs=4, lr=0.1, target_kl=0.03)
    stopped = train(cfg)
    row = stopped.history[0]
    assert row["ppo/kl_stop"] == 1.0 and row["ppo/approx_kl_max"] > 0.03
    epochs = row["ppo/epochs"]
    assert epochs in (1.0, 2.0, 3.0)
    # the same update cut to that many epochs without a guard: the very same weights
    cut = train(config(cfg, ppo_epochs=int(epochs), target_kl=0.0))
    assert cut.history[0]["ppo/kl_stop"] == 0.0
    for p, q in zip(stopped.model.parameters(), cut.model.parameters(), strict=True):
        assert torch.equal(p, q)
    unguarded = train(config(cfg, target_kl=0.0)).history[0]  # every epoch runs
    assert unguarded["ppo/epochs"] == 4.0 and unguarded["ppo/kl_stop"] == 0.0


def test_kl_guard_stops_a_diverged_policy():
    # lr 1.0: the first step sends the logits to inf, the KL is NaN (NaN > target is False)
    row = train(config(TINY, updates=1, minibatches=1, lr=1.0)).history[0]
    assert row["ppo/kl_stop"] == 1.0 and row["ppo/epochs"] == 1.0
    assert row["ppo/approx_kl_max"] != row["ppo/approx_kl_max"]  # NaN recorded as such


def test_kl_guard_leaves_a_calm_update_alone():
    row = train(config(TINY, updates=1)).history[0]  # default lr, default target
    assert row["ppo/kl_stop"] == 0.0 and row["ppo/epochs"] == TINY.ppo.ppo_epochs
    assert 0 < row["ppo/approx_kl_max"] < TINY.ppo.target_kl


def test_alpha_steps_with_theta_from_the_same_minibatch_gradient():
    """In an alpha epoch alpha takes one Adam step on d loss / d alpha at the pre-step theta."""
    import copy

    from gatelab.comm.train import _ppo_epochs, optimizers

    cfg = config(
        TINY, alpha_warmup_updates=0, ppo_epochs=1, minibatches=1, alpha_every=1, target_kl=0.0
    )
    env, model = build(cfg)
    ro = collect(model, env, env_seed=3, graph_seed=11, generator=torch.Generator().manual_seed(0))
    adv = torch.randn(ro.rewards.shape, generator=torch.Generator().manual_seed(1))
    flat = {"adv": adv, "targets": adv.flip(0), "labels": None}
    # the expected step, computed apart: the loss of all live samples on a copy of the model
    ref = copy.deepcopy(model).train()
    rows = torch.nonzero(ro.alive.flatten()).squeeze(-1)
    take = {k: getattr(ro, k).flatten(0, 1)[rows] for k in ("obs", "actions", "logp", "acting")}
    batch = Batch(**take, adv=adv.flatten(0, 1)[rows], targets=adv.flip(0).flatten(0, 1)[rows],
                  listen=None, env_index=rows % ro.graph.shape[0])  # fmt: skip
    graph = ref.graph.relax(ro.graph, ro.graph_seed, ro.graph_noise)[batch.env_index]
    parts = ppo_losses(ref, batch, graph, cfg.ppo.clip)
    loss = parts.policy + cfg.ppo.value_coef * parts.value - cfg.ppo.entropy_coef * parts.entropy
    (g,) = torch.autograd.grad(loss, [ref.graph.alpha])
    lr, eps = cfg.ppo.alpha_lr, 1e-8  # Adam's first step: -lr * g / (|g| + eps)
    expected = ref.graph.alpha.detach() - lr * g / (g.abs() + eps)
    model.train()
    opt_theta, opt_alpha = optimizers(model, cfg)
    theta0 = [p.detach().clone() for g_ in opt_theta.param_groups for p in g_["params"]]
    _ppo_epochs(cfg, model, ro, flat, (opt_theta, opt_alpha), True, 0.0, np.random.default_rng(0))
    torch.testing.assert_close(model.graph.alpha.detach(), expected, atol=1e-6, rtol=0)
    first_moment = opt_alpha.state[model.graph.alpha]["exp_avg"]  # (1 - beta1) g: g itself
    torch.testing.assert_close(first_moment, 0.1 * g, atol=1e-9, rtol=1e-6)
    moved = [p for p, p0 in zip(opt_theta.param_groups[0]["params"], theta0, strict=False)
             if not torch.equal(p.detach(), p0)]  # fmt: skip
    assert moved  # theta stepped in the same minibatch
