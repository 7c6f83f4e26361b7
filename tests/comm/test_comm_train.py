import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from gatelab.comm.checkpoint import load_model
from gatelab.comm.ppo import ValueNorm, collect, gae, recompute_logp
from gatelab.comm.train import TrainConfig, build, train

TINY = TrainConfig(
    agents=3, grid=4, episode_limit=6, n_envs=6, updates=2, d_model=16, ppo_epochs=2,
    alpha_warmup_updates=1, checkpoint_every=1,
)  # fmt: skip


@pytest.mark.parametrize("gate", [False, True])
def test_every_ratio_is_one_before_the_first_update(gate):
    cfg = replace(TINY, temporal_gate=gate, comm_cost=0.1, n_envs=16, episode_limit=10)
    env, model = build(cfg)
    ro = collect(model, env, env_seed=3, graph_seed=11, generator=torch.Generator().manual_seed(0))
    model.train()
    logp = recompute_logp(model, ro, relax=True)  # the update's path, alpha attached
    ratio = (logp - ro.logp).exp()[ro.alive]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)
    assert ro.graph.sum(-1).min() < 3  # the graph is really sparse (k = 1 of 2)
    if gate:  # sampled gates: some agents did not listen at some steps
        assert ro.listen is not None and 0 < ro.listen.mean() < 1
    # with a graph drawn afresh (the public code's bug) the ratios are not all one
    fresh = model.graph.sample(ro.graph.shape[0], seed=12345)
    if not torch.equal(fresh, ro.graph):
        ro2 = ro._replace(graph=fresh)
        assert not torch.allclose(
            recompute_logp(model, ro2, relax=False)[ro.alive], ro.logp[ro.alive]
        )


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
    c = train(replace(TINY, seed=1)).history
    assert strip(a) != strip(c)
    assert a[0]["graph/alpha_drift"] == 0.0  # warm-up: alpha frozen in update 1
    assert a[1]["graph/alpha_drift"] > 0.0  # and it ends
    for h in a:
        assert all(np.isfinite(v) for v in h.values())


def test_resume_continues_exactly(tmp_path):
    cfg = replace(TINY, updates=3, temporal_gate=True, comm_cost=0.1)
    straight = train(cfg, tmp_path / "a").history
    train(replace(cfg, updates=1), tmp_path / "b")
    resumed = train(cfg, tmp_path / "b", resume=True).history
    assert strip(resumed) == strip(straight)
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["train"]["updates"] == 3 and config["model"]["temporal_gate"]
    lines = (tmp_path / "b" / "scalars.csv").read_text().splitlines()
    assert len(lines) == 4  # header + 3 updates, no duplicates
    model, _ = load_model(tmp_path / "b" / "model.safetensors")
    trained = train(cfg, tmp_path / "b", resume=True).model  # nothing left to do: same weights
    for (name, p), q in zip(model.state_dict().items(), trained.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
    assert (tmp_path / "b" / "graph.png").exists() and (tmp_path / "b" / "comm_rate.png").exists()


def test_smoke_loss_finite_and_improving():
    cfg = replace(TINY, grid=3, episode_limit=8, n_envs=32, updates=12, lr=3e-3)
    history = train(cfg).history
    first = np.mean([h["train/return"] for h in history[:3]])
    last = np.mean([h["train/return"] for h in history[-3:]])
    assert last > first
    assert all(np.isfinite(h["loss/value"]) for h in history)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [("sparsity", 1.2, "sparsity"), ("agents", 1, "agents"), ("env", "chess", "unknown env")],
)
def test_bad_config(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})
