"""The temporal gate: straight-through estimator, schedule, settings, the variants' configs."""

import pytest
import torch
from comm_config import config

from gatelab.comm.config import Estimator, GateConfig, TrainConfig
from gatelab.comm.gating import gate_schedule, gate_temperature
from gatelab.comm.graph import TemporalGate
from gatelab.comm.ppo import Batch, collect, ppo_losses
from gatelab.comm.train import build, train

TINY = config(
    agents=3, grid=4, episode_limit=10, n_envs=16, updates=2, d_model=16, ppo_epochs=2,
    alpha_warmup_updates=1, checkpoint_every=1, temporal_gate=True, comm_cost=0.1,
)  # fmt: skip


def test_straight_through_gate_gets_the_cost_gradient():
    env, model = build(config(TINY, graph="full"))
    ro = collect(model, env, 1, 2, torch.Generator().manual_seed(0))
    rows = ro.alive.flatten()
    envs = torch.arange(ro.alive.numel())[rows] % ro.alive.shape[1]
    flat = {k: getattr(ro, k).flatten(0, 1)[rows] for k in ("obs", "actions", "logp", "acting")}
    zeros = torch.zeros(flat["acting"].shape)
    batch = Batch(**flat, adv=zeros, targets=zeros, listen=ro.listen.flatten(0, 1)[rows],
                  env_index=envs)  # fmt: skip
    parts = ppo_losses(model, batch, ro.graph[envs], 0.2)
    # forward value: the stored gates' comm rate; gradient: straight-through into the gate
    stored = ppo_losses(model, batch, ro.graph[envs], 0.2, straight_through=False)
    torch.testing.assert_close(parts.comm, stored.comm)
    parts.comm.backward()
    assert model.gate.linear.bias.grad.item() > 0  # opening the gates raises the comm rate


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
        ({"estimator": "reinforce"}, "reinforce"),
        ({"estimator": "hybrid"}, "hybrid"),  # retired (docs/notes/comm.md)
        ({"comm_budget": 0.2, "anneal": True}, "anneal"),
        ({"comm_budget": 0.2, "comm_cost": 0.1}, "comm_cost"),
        ({"estimator": "st", "comm_budget": 0.2}, "causal"),
        ({"temp_min": 0.5}, "temp_min"),
        ({"warmup": 1.5}, "warmup"),
        ({"comm_cost": -1.0}, "comm_cost"),
    ],
)
def test_bad_gate_config(changes, match):
    with pytest.raises(ValueError, match=match):
        GateConfig(**changes)


def test_estimator_defaults_to_causal_with_a_budget():
    assert GateConfig().kind is Estimator.st
    assert GateConfig(comm_budget=0.2).kind is Estimator.causal
    budgeted = GateConfig.budgeted(0.22)
    assert (budgeted.kind, budgeted.warmup, budgeted.temp_min, budgeted.budget_lr) == (
        Estimator.causal, 0.3, 0.1, 0.2,
    )  # fmt: skip


def test_st_trains_and_logs_the_threshold_rate():
    history = train(TINY).history
    assert len(history) == 2
    for h in history:
        assert 0.0 <= h["train/comm_rate_threshold"] <= 1.0
        assert h["train/comm_cost"] == 0.1 and h["train/gate_temp"] == 1.0
        assert all(torch.isfinite(torch.tensor(v)) for v in h.values())


def test_gate_schedule_and_temperature_closed_form():
    cfg = config(TINY, updates=20, comm_cost=0.4, gate_warmup=0.5)
    got = [gate_schedule(cfg, u) for u in (0, 9, 10, 19)]
    assert got == [(False, 0.0), (False, 0.0), (True, 0.4), (True, 0.4)]  # open until update 10
    causal = config(cfg, comm_cost=0.0, comm_budget=0.2, gate_temp_min=0.1)
    temps = [gate_temperature(causal, u) for u in (0, 10, 19)]
    assert temps == pytest.approx([1.0, 1.0, 0.1])  # 1 through the warm-up, then down to 0.1


def test_warmup_keeps_gates_open_and_untrained():
    cfg = config(TINY, updates=3, gate_warmup=0.67, checkpoint_every=10)
    _, fresh = build(cfg)
    h = train(cfg).history
    assert [r["train/comm_cost"] for r in h[:2]] == [0.0, 0.0]
    assert all(r["train/comm_rate"] == pytest.approx(0.5) for r in h[:2])  # k = 1 of 2, all open
    assert h[2]["train/comm_rate"] < 0.5  # then sampled gates close some rows
    # a run that is all warm-up leaves the gate at its initial weights
    two = train(config(cfg, updates=2, gate_warmup=1.0)).model
    for p, q in zip(two.gate.parameters(), fresh.gate.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    env, model = build(cfg)
    ro = collect(model, env, 0, 0, torch.Generator().manual_seed(0), gates=False)
    assert ro.listen is None


def test_budget_changes_only_the_gated_variant():
    from gatelab.comm.compare import VARIANTS, variant_config

    base = config(updates=200)
    for variant in VARIANTS:
        plain = variant_config(base, variant, 3, 0.1)
        budgeted = variant_config(base, variant, 3, 0.1, comm_budget=0.24)
        if variant != "commformer_tg":
            assert budgeted == plain  # the baselines' runs stay valid
            assert not plain.model.temporal_gate and plain.gate == GateConfig()
            continue
        assert budgeted.gate == GateConfig.budgeted(0.24) and budgeted.model.temporal_gate
        assert plain.gate == GateConfig(comm_cost=0.1) and plain.gate.kind is Estimator.st
    with pytest.raises(ValueError, match="Variant"):
        variant_config(base, "chess", 3, 0.1)


def test_config_round_trips_as_json():
    cfg = config(TINY, memory=True, comm_cost=0.0, comm_budget=0.2, graph="random")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({**cfg.to_dict(), "gate_estimator": "hybrid"})
