"""The causal gate estimator (I2C-style): KL effect vs a naive loop, quantile labels, training."""

import numpy as np
import pytest
import torch
from comm_config import config

from gatelab.comm.gating import causal_effect, causal_labels, listen_share
from gatelab.comm.ppo import Batch, collect, ppo_losses
from gatelab.comm.train import build, train

TINY = config(
    agents=3, grid=4, episode_limit=8, n_envs=4, updates=2, d_model=16, ppo_epochs=2,
    alpha_warmup_updates=1, checkpoint_every=1, temporal_gate=True, gate_estimator="causal",
    comm_budget=0.25,
)  # fmt: skip


def _rollout(cfg=TINY, seed=0, sharpen=1.0):
    torch.manual_seed(seed)
    env, model = build(cfg)
    with torch.no_grad():  # sharpen > 1 undoes the near-uniform init: effects become visible
        model.policy_head[-1].weight.mul_(sharpen)
    gen = torch.Generator().manual_seed(seed)
    return model, collect(model, env, env_seed=5, graph_seed=7, generator=gen)


def test_causal_effect_matches_a_naive_per_sample_loop():
    model, ro = _rollout(sharpen=300.0)
    effect = causal_effect(model, ro)
    t, b, a = ro.actions.shape
    with torch.no_grad():
        for step in range(min(t, 4)):
            for env in range(b):
                for i in range(a):
                    probs = []
                    for z in (1.0, 0.0):
                        listen = ro.listen[step, env].clone()
                        listen[i] = z
                        out = model(ro.obs[step, env][None], ro.graph[env][None],
                                    listen[None], ro.actions[step, env][None])  # fmt: skip
                        probs.append(out.logits[0, i].double().softmax(-1).numpy())
                    p, q = probs
                    kl = float(np.sum(p * np.log(p / q)))
                    live = bool(ro.alive[step, env]) and bool(ro.acting[step, env, i])
                    assert effect[step, env, i].item() == pytest.approx(
                        kl if live else 0.0, abs=1e-5
                    )
    assert (effect > 1e-6).any()  # the messages really move some policies


def test_no_messages_no_effect():
    model, ro = _rollout(config(TINY, graph="none"))
    assert causal_effect(model, ro).abs().max().item() < 1e-6


def test_labels_take_the_budgeted_share_of_the_largest_effects():
    gen = torch.Generator().manual_seed(0)
    effect = torch.rand(50, 4, generator=gen, dtype=torch.float64)
    live = torch.rand(50, 4, generator=gen) < 0.8
    labels = causal_labels(effect, live, 0.3)
    values = np.sort(effect[live].numpy())[::-1]
    n = int(live.sum())
    cut = np.quantile(values, 0.7)  # numpy's linear interpolation, as torch.quantile
    assert labels[live].sum().item() == int((values > cut).sum())
    assert abs(labels[live].mean().item() - 0.3) <= 1 / n + 1e-9
    # every labelled entry beats every unlabelled live one
    assert effect[live & (labels == 1)].min() > effect[live & (labels == 0)].max()
    # ties at the threshold (agents whose action is ignored: effect 0) are not labelled
    zeros = torch.zeros(10, dtype=torch.float64)
    assert causal_labels(zeros, torch.ones(10, dtype=torch.bool), 0.5).sum() == 0
    assert causal_labels(effect, live, 1.0)[live].mean() > 0.95
    with pytest.raises(ValueError, match="share"):
        causal_labels(effect, live, 0.0)


def test_listen_share_is_budget_over_ungated_rate():
    _, ro = _rollout()
    ungated = (ro.graph.sum((-2, -1)) - 3).mean().item() / 6  # A(A-1) = 6 possible edges
    assert listen_share(TINY, ro) == pytest.approx(min(1.0, 0.25 / ungated))
    assert listen_share(config(TINY, comm_budget=1.0), ro) == 1.0


def test_ppo_loss_gives_the_causal_gate_no_gradient():
    model, ro = _rollout()
    rows = ro.alive.flatten()
    envs = torch.arange(ro.alive.numel())[rows] % ro.alive.shape[1]
    flat = {k: getattr(ro, k).flatten(0, 1)[rows] for k in ("obs", "actions", "logp", "acting")}
    batch = Batch(**flat, adv=torch.randn(flat["acting"].shape), targets=torch.zeros(
        flat["acting"].shape), listen=ro.listen.flatten(0, 1)[rows], env_index=envs)  # fmt: skip
    for straight_through, expect_grad in ((True, True), (False, False)):
        model.zero_grad()
        parts = ppo_losses(model, batch, ro.graph[envs], 0.2, straight_through=straight_through)
        (parts.policy + parts.value).backward()
        grad = model.gate.linear.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == expect_grad


def test_causal_training_trains_the_gate_and_logs_its_targets():
    cfg = config(TINY, updates=3, gate_warmup=0.0, gate_temp_min=0.5)
    torch.manual_seed(0)
    _, model0 = build(cfg)
    result = train(cfg)
    row = result.history[-1]
    assert row["train/share"] == pytest.approx(listen_share(cfg, _rollout(cfg)[1]), rel=0.5)
    assert row["train/causal_effect"] > 0
    moved = (result.model.gate.linear.weight - model0.gate.linear.weight).abs().max()
    assert moved > 1e-4


@pytest.mark.parametrize(
    ("changes", "match"),
    [({"comm_budget": 0.0}, "comm_budget"), ({"gate_estimator": "nope"}, "valid Estimator")],
)
def test_bad_causal_config(changes, match):
    with pytest.raises(ValueError, match=match):
        config(TINY, **changes)


def test_label_share_follows_the_budget_and_resumes_exactly(tmp_path, assert_resumes_exactly):
    cfg = config(TINY, updates=5, gate_warmup=0.4, budget_lr=0.5, n_envs=4)
    h = train(cfg, tmp_path / "a").history
    assert [r["train/share"] for r in h[:2]] == [1.0, 1.0]  # warm-up: gates open, no labels
    first = h[2]["train/share"]
    assert 0 < first <= 1  # budget / ungated rate (test_listen_share_is_budget_over_ungated_rate)
    for prev, row in zip(h[2:], h[3:], strict=False):  # s <- clip(s - eta (r - b), 0.01, 1)
        excess = prev["train/comm_rate_threshold"] - cfg.gate.comm_budget
        want = min(1.0, max(0.01, prev["train/share"] - 0.5 * excess))
        assert row["train/share"] == pytest.approx(want)

    assert_resumes_exactly(cfg, tmp_path / "b", 3, h)
