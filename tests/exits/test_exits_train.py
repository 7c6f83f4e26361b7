import dataclasses

import pytest
import torch
import torch.nn.functional as F

from gatelab import gates
from gatelab.exits import FeatureCache, TrainConfig, gate_targets, oracle_exit, train
from gatelab.exits.train import exit_losses, weighted_im_loss
from gatelab.runs import read_metrics


def test_oracle_exit_against_naive_loop():
    torch.manual_seed(0)
    ce = torch.rand(4, 50, dtype=torch.float64) * 2
    cost = torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    for lam in (0.0, 0.3, 2.0):
        got = oracle_exit(ce, cost, lam)
        for n in range(50):
            vals = [ce[ell, n].item() + lam * cost[ell].item() for ell in range(4)]
            assert got[n].item() == vals.index(min(vals))


def test_oracle_ties_go_to_the_earlier_exit():
    ce = torch.zeros(3, 1, dtype=torch.float64)
    assert oracle_exit(ce, torch.zeros(3, dtype=torch.float64), 1.0).item() == 0


def test_gate_targets_are_the_hazard_targets():
    oracle = torch.tensor([0, 2, 3])
    targets = gate_targets(oracle, 4)
    assert targets.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    # gates equal to the targets put all exit probability on the oracle exit
    probs = gates.exit_probabilities(targets)
    assert probs.argmax(-1).tolist() == oracle.tolist()
    torch.testing.assert_close(probs.max(-1).values, torch.ones(3))


def test_detached_weighting_changes_the_gradient(tiny_exit_model):
    model = tiny_exit_model
    torch.manual_seed(1)
    for gate in model.gates:
        with torch.no_grad():
            gate.linear.weight.normal_(0, 2)
    x = torch.randn(12, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (12,))
    logits = model.all_exit_logits(x)
    ce = F.cross_entropy(logits.flatten(0, 1), y.repeat(4), reduction="none").view(4, 12)
    probs = gates.exit_probabilities(model.gate_values(logits))
    weighted_im_loss(probs, ce).backward()
    got = [p.grad.clone() for p in model.ims.parameters()]
    gate_grads = [p.grad for p in model.gates.parameters()]
    assert all(g is None or (g == 0).all() for g in gate_grads), "weights must be detached"
    # reference: sum over samples and exits of P_ln * grad CE_ln, one sample at a time
    model.zero_grad()
    ref = [torch.zeros_like(p) for p in model.ims.parameters()]
    p_const = probs.detach()
    for n in range(12):
        for ell in range(3):
            model.zero_grad()
            single = F.cross_entropy(model.all_exit_logits(x[n : n + 1])[ell], y[n : n + 1])
            single.backward()
            for r, p in zip(ref, model.ims.parameters(), strict=True):
                r += p_const[n, ell] * p.grad / 12
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r)
    # and it differs from the unweighted gradient (the public code's weights cancelled)
    model.zero_grad()
    ce[:-1].sum(0).mean().backward() if False else None
    model.zero_grad()
    logits = model.all_exit_logits(x)
    ce = F.cross_entropy(logits.flatten(0, 1), y.repeat(4), reduction="none").view(4, 12)
    (ce[:-1].sum(0).mean() / 3).backward()
    unweighted = [p.grad for p in model.ims.parameters()]
    assert max((g - u).abs().max().item() for g, u in zip(got, unweighted, strict=True)) > 1e-3


def _synthetic_caches(n=600, d=6, c=4, n_exits=4, seed=0):
    """Features whose class signal grows with depth, so later exits are more accurate."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    means = torch.randn(c, d, generator=torch.Generator().manual_seed(100))  # shared by all splits
    feats = [
        means[labels] * (0.5 + 0.5 * ell) + torch.randn(n, d, generator=g)
        for ell in range(n_exits - 1)
    ]
    head = F.one_hot(labels, c).float() * 4 + torch.randn(n, c, generator=g)
    return FeatureCache(feats, head, labels)


def _model(d=6, c=4, n_exits=4):
    from torch import nn

    from gatelab.exits import EarlyExitModel

    blocks = [nn.Identity() for _ in range(n_exits)]
    return EarlyExitModel(blocks, nn.Identity(), lambda s: s, d, c)


def _cfg(**kw):
    return TrainConfig(
        warmup_epochs=10, n_rounds=2, phase_steps=20, batch_size=64, lr_im=1e-2, **kw
    )


def test_train_smoke_loss_falls_and_seed_is_reproducible(tmp_path):
    cost = torch.tensor([0.25, 0.5, 0.75, 1.0])
    tr, va = _synthetic_caches(seed=0), _synthetic_caches(n=300, seed=1)
    torch.manual_seed(0)
    model = _model()
    before = float(exit_losses(model, tr)[1][:-1].mean().detach())
    metrics = train(model, tr, va, cost, _cfg(lam=0.2), tmp_path)
    after = float(exit_losses(model, tr)[1][:-1].mean().detach())
    assert after < before and metrics["phases"] == 5
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5
    torch.manual_seed(0)
    again = _model()
    metrics2 = train(again, tr, va, cost, _cfg(lam=0.2))
    assert metrics2["eval/objective"] == metrics["eval/objective"]
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_train_resumes_from_checkpoint(tmp_path):
    cost = torch.tensor([0.25, 0.5, 0.75, 1.0])
    tr, va = _synthetic_caches(seed=0), _synthetic_caches(n=300, seed=1)
    torch.manual_seed(0)
    model = _model()
    train(model, tr, va, cost, _cfg(lam=0.2), tmp_path)
    torch.manual_seed(5)
    resumed = _model()
    out = train(resumed, tr, va, cost, _cfg(lam=0.2), tmp_path)  # checkpoint says: all done
    assert out["phases"] == 5
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


class Killed(Exception):
    pass


def test_a_kill_mid_training_loses_nothing_and_resume_is_exact(tmp_path):
    """Phases of 20 steps over 9-batch epochs: the resume must restore the batch order too."""
    cost = torch.tensor([0.25, 0.5, 0.75, 1.0])
    tr, va = _synthetic_caches(seed=0), _synthetic_caches(n=300, seed=1)
    torch.manual_seed(0)
    whole = _model()
    expected = train(whole, tr, va, cost, _cfg(lam=0.2), tmp_path / "whole")

    def kill_at_phase_3(done, total):
        if done == 3:
            raise Killed

    torch.manual_seed(0)
    with pytest.raises(Killed):
        train(_model(), tr, va, cost, _cfg(lam=0.2), tmp_path / "killed", kill_at_phase_3)
    torch.manual_seed(7)  # a different initialisation: everything must come from the checkpoint
    resumed = _model()
    got = train(resumed, tr, va, cost, _cfg(lam=0.2), tmp_path / "killed")
    assert got["eval/objective"] == expected["eval/objective"] and got["phases"] == 5
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert read_metrics(tmp_path / "killed") == read_metrics(tmp_path / "whole")  # no duplicates


def test_larger_lambda_exits_earlier():
    cost = torch.tensor([0.25, 0.5, 0.75, 1.0])
    tr, va = _synthetic_caches(seed=0), _synthetic_caches(n=300, seed=1)
    mean_exit = []
    for lam in (0.0, 3.0):
        torch.manual_seed(0)
        model = _model()
        train(model, tr, va, cost, dataclasses.replace(_cfg(), lam=lam))
        logits, _ = exit_losses(model, va)
        mean_exit.append(gates.first_exit(model.gate_values(logits)).double().mean().item())
    assert mean_exit[1] < mean_exit[0]


def test_train_config_errors():
    with pytest.raises(ValueError, match="lam"):
        TrainConfig(lam=-1)
