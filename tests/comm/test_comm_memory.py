"""The one-step action memory: what it stores, that ratios stay exact, and that runs round-trip."""

import torch
from comm_config import config

from gatelab.comm.eval import evaluate
from gatelab.comm.ppo import collect, recompute_logp, with_memory
from gatelab.comm.train import build, load_model, train

TINY = config(
    agents=3, grid=4, episode_limit=8, n_envs=8, updates=2, d_model=16, ppo_epochs=2,
    alpha_warmup_updates=1, checkpoint_every=1, memory=True,
)  # fmt: skip


def test_with_memory_appends_the_previous_action_one_hot():
    obs = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0))
    first = with_memory(obs, None, 5)
    assert first.shape == (2, 3, 9) and torch.equal(first[..., :4], obs)
    assert not first[..., 4:].any()  # nothing done yet
    previous = torch.tensor([[0, 4, 2], [3, 3, 1]])
    later = with_memory(obs, previous, 5)
    for b in range(2):
        for a in range(3):
            expected = [1.0 if k == previous[b, a] else 0.0 for k in range(5)]
            assert later[b, a, 4:].tolist() == expected


def test_rollout_stores_the_actions_taken_and_ratios_stay_one():
    env, model = build(TINY)
    assert model.cfg.obs_dim == env.obs_dim + env.n_actions
    ro = collect(model, env, env_seed=2, graph_seed=5, generator=torch.Generator().manual_seed(0),
                 memory=True)  # fmt: skip
    memory = ro.obs[..., env.obs_dim :]  # (T, B, A, n_actions)
    assert not memory[0].any()
    steps = ro.obs.shape[0]
    assert steps > 1
    for t in range(1, steps):  # step t remembers the action of step t - 1
        assert torch.equal(memory[t].argmax(-1), ro.actions[t - 1])
        assert torch.equal(
            memory[t].sum(-1), torch.ones_like(ro.actions[t - 1], dtype=memory.dtype)
        )
    model.train()
    ratio = (recompute_logp(model, ro, relax=True) - ro.logp).exp()[ro.alive]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)


def test_memory_run_saves_loads_and_evaluates(tmp_path):
    result = train(config(TINY, temporal_gate=True, comm_cost=0.1), tmp_path / "run")
    model, train_cfg = load_model(tmp_path / "run" / "model.safetensors")
    assert train_cfg.env.memory is True
    metrics = evaluate(model, train_cfg.env, episodes=4, seed=1)
    assert 0.0 <= metrics["success_rate"] <= 1.0 and 0.0 <= metrics["comm_rate"] <= 1.0
    assert result.model.cfg.obs_dim == model.cfg.obs_dim


def test_gated_memory_also_remembers_whether_the_agent_listened():
    cfg = config(TINY, temporal_gate=True, comm_cost=0.1)
    env, model = build(cfg)
    assert model.cfg.obs_dim == env.obs_dim + env.n_actions + 1
    with torch.no_grad():  # p = 1/2 for every state: both decisions occur
        model.gate.linear.weight.zero_()
        model.gate.linear.bias.zero_()
    ro = collect(model, env, env_seed=2, graph_seed=5, generator=torch.Generator().manual_seed(0),
                 memory=True)  # fmt: skip
    heard = ro.obs[..., -1]  # (T, B, A)
    assert not heard[0].any()  # nothing heard before the first step
    assert torch.equal(heard[1:], ro.listen[:-1])
    assert 0 < ro.listen.mean() < 1
    model.train()
    ratio = (recompute_logp(model, ro, relax=True) - ro.logp).exp()[ro.alive]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)
    # gates open (warm-up): every agent heard at every step after the first
    open_ro = collect(model, env, 2, 5, torch.Generator().manual_seed(0), gates=False, memory=True)
    assert not open_ro.obs[0, ..., -1].any() and open_ro.obs[1:, ..., -1].all()
