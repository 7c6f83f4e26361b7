import dataclasses
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from exits_toy import COST, KILL_CONFIG, synthetic_caches, toy_config, toy_model

import gatelab
from gatelab import gates
from gatelab.exits import TrainConfig, gate_targets, oracle_exit, train
from gatelab.exits.train import exit_losses, weighted_im_loss
from gatelab.runs import FAULT_ENV, FAULT_EXIT_CODE, read_json, read_metrics


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


def test_train_smoke_loss_falls_and_seed_is_reproducible(tmp_path):
    cost = torch.tensor([0.25, 0.5, 0.75, 1.0])
    tr, va = synthetic_caches(seed=0), synthetic_caches(n=300, seed=1)
    torch.manual_seed(0)
    model = toy_model()
    before = float(exit_losses(model, tr)[1][:-1].mean().detach())
    metrics = train(model, tr, va, cost, toy_config(lam=0.2), tmp_path)
    after = float(exit_losses(model, tr)[1][:-1].mean().detach())
    assert after < before and metrics["phases"] == 5
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5
    torch.manual_seed(0)
    again = toy_model()
    metrics2 = train(again, tr, va, cost, toy_config(lam=0.2))
    assert metrics2["eval/objective"] == metrics["eval/objective"]
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_train_resumes_from_checkpoint(tmp_path):
    cost = torch.tensor([0.25, 0.5, 0.75, 1.0])
    tr, va = synthetic_caches(seed=0), synthetic_caches(n=300, seed=1)
    torch.manual_seed(0)
    model = toy_model()
    train(model, tr, va, cost, toy_config(lam=0.2), tmp_path)
    torch.manual_seed(5)
    resumed = toy_model()
    out = train(resumed, tr, va, cost, toy_config(lam=0.2), tmp_path)  # checkpoint says: all done
    assert out["phases"] == 5
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


class Killed(Exception):
    pass


def test_a_kill_mid_training_loses_nothing_and_resume_is_exact(tmp_path):
    """Phases of 20 steps over 9-batch epochs: the resume must restore the batch order too."""
    cost = torch.tensor([0.25, 0.5, 0.75, 1.0])
    tr, va = synthetic_caches(seed=0), synthetic_caches(n=300, seed=1)
    torch.manual_seed(0)
    whole = toy_model()
    expected = train(whole, tr, va, cost, toy_config(lam=0.2), tmp_path / "whole")

    def kill_at_phase_3(done, total):
        if done == 3:
            raise Killed

    torch.manual_seed(0)
    with pytest.raises(Killed):
        train(toy_model(), tr, va, cost, toy_config(lam=0.2), tmp_path / "killed", kill_at_phase_3)
    torch.manual_seed(7)  # a different initialisation: everything must come from the checkpoint
    resumed = toy_model()
    got = train(resumed, tr, va, cost, toy_config(lam=0.2), tmp_path / "killed")
    assert got["eval/objective"] == expected["eval/objective"] and got["phases"] == 5
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert read_metrics(tmp_path / "killed") == read_metrics(tmp_path / "whole")  # no duplicates


def test_larger_lambda_exits_earlier():
    cost = torch.tensor([0.25, 0.5, 0.75, 1.0])
    tr, va = synthetic_caches(seed=0), synthetic_caches(n=300, seed=1)
    mean_exit = []
    for lam in (0.0, 3.0):
        torch.manual_seed(0)
        model = toy_model()
        train(model, tr, va, cost, dataclasses.replace(toy_config(), lam=lam))
        logits, _ = exit_losses(model, va)
        mean_exit.append(gates.first_exit(model.gate_values(logits)).double().mean().item())
    assert mean_exit[1] < mean_exit[0]


def test_train_config_errors():
    with pytest.raises(ValueError, match="lam"):
        TrainConfig(lam=-1)


def test_another_configuration_is_refused_naming_fresh(tmp_path):
    cost = torch.tensor(COST)
    tr, va = synthetic_caches(seed=0), synthetic_caches(n=300, seed=1)
    short = dataclasses.replace(toy_config(lam=0.2), n_rounds=1, warmup_epochs=1)
    train(toy_model(), tr, va, cost, short, tmp_path)
    other = dataclasses.replace(short, lam=0.5)
    with pytest.raises(ValueError, match=r"differs in: train\.lam.*--fresh"):
        train(toy_model(), tr, va, cost, other, tmp_path)
    assert read_json(tmp_path / "config.json")["train"]["lam"] == 0.2  # nothing overwritten
    assert train(toy_model(), tr, va, cost, other, tmp_path, fresh=True)["phases"] == 3
    assert read_json(tmp_path / "config.json")["train"]["lam"] == 0.5
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


# --------------------------------------------------------------------------- kill anywhere

KILLED_RUN = """
import sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[2])
from exits_toy import COST, KILL_CONFIG, synthetic_caches, toy_model
from gatelab.exits import train
torch.set_num_threads(1)
torch.manual_seed(0)
tr, va = synthetic_caches(seed=0), synthetic_caches(n=300, seed=1)
train(toy_model(), tr, va, torch.tensor(COST), KILL_CONFIG, Path(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted run (5 phases, one checkpoint after each) and its final model."""
    run = tmp_path_factory.mktemp("jei") / "whole"
    torch.manual_seed(0)
    model = toy_model()
    tr, va = synthetic_caches(seed=0), synthetic_caches(n=300, seed=1)
    train(model, tr, va, torch.tensor(COST), KILL_CONFIG, run)
    return model, run


@pytest.mark.parametrize(
    ("fault", "resumes_from"),
    [
        ("checkpoint-write:3", 2),  # half of phase 3's checkpoint written
        ("checkpoint-rotate:2", 2),  # phase 2's moved to .prev, phase 3's not yet in its place
        pytest.param("exits-train-step:25", 1, marks=pytest.mark.slow),  # mid gate phase
        pytest.param("checkpoint-rotate:4", 4, marks=pytest.mark.slow),  # the last checkpoint
    ],
)
def test_a_kill_anywhere_resumes_to_the_uninterrupted_run(
    fault, resumes_from, uninterrupted, tmp_path
):
    """Killed (``os._exit``) at a fault point, rerun: the same weights and metrics, bit for bit."""
    whole_model, whole = uninterrupted
    run = tmp_path / "killed"
    env = os.environ | {FAULT_ENV: fault, "PYTHONPATH": str(Path(gatelab.__file__).parents[1])}
    argv = [sys.executable, "-c", KILLED_RUN, str(run), str(Path(__file__).parent)]
    killed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == FAULT_EXIT_CODE, killed.stderr
    torch.manual_seed(7)  # another initialisation: everything must come from the checkpoint
    resumed, phases = toy_model(), []
    tr, va = synthetic_caches(seed=0), synthetic_caches(n=300, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = lambda done, _: phases.append(done)  # noqa: E731
        train(resumed, tr, va, torch.tensor(COST), KILL_CONFIG, run, record)
    fell_back = [w for w in caught if "previous checkpoint" in str(w.message)]
    assert bool(fell_back) == ("rotate" in fault)  # a missing checkpoint falls back, warned
    assert phases == list(range(resumes_from + 1, 6))  # resumed, not started over
    for key, value in whole_model.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert read_metrics(run) == read_metrics(whole)  # no phase logged twice
    assert not list(run.glob("*.tmp"))
