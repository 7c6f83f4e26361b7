import pytest
import torch

from gatelab.cost import count_flops
from gatelab.exits import (
    EntropyPolicy,
    GatePolicy,
    MaxProbPolicy,
    PatiencePolicy,
    ViTConfig,
    exit_flops,
    run_early_exit,
    simulate_exits,
)
from gatelab.exits.train import clone_exits
from gatelab.exits.vit import Block


def _spread_gates(model):
    # make the gates fire for some samples and not others
    for gate in model.gates:
        with torch.no_grad():
            gate.linear.weight.copy_(torch.tensor([[20.0, 0.0, 0.0, 0.0]]))
            gate.linear.bias.fill_(-20.0 * 0.75)  # fires when max prob > 0.75


def _context_gates(model):
    twin = clone_exits(model, gate_context=True).double()
    for gate in twin.gates:
        with torch.no_grad():
            gate.linear.weight.copy_(torch.tensor([[20.0, 0.0, 0.0, 0.0, 3.0, 0.0]]))
            gate.linear.bias.fill_(-20.0 * 0.8)  # agreement with the previous exit helps
    model.gates = twin.gates
    model.gate_context = True
    return model


@pytest.mark.parametrize(
    "make_policy",
    [
        lambda m: GatePolicy(m.gates),
        lambda m: GatePolicy(_context_gates(m).gates),
        lambda m: MaxProbPolicy(0.75),
        lambda m: EntropyPolicy(0.75),
        lambda m: PatiencePolicy(1),
        lambda m: PatiencePolicy(2),
    ],
    ids=["jei", "jei-context", "maxprob", "entropy", "patience1", "patience2"],
)
def test_batched_early_exit_equals_full_compute_plus_posthoc(tiny_exit_model, make_policy):
    model = tiny_exit_model.eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for im in model.ims:
            im.linear.weight.mul_(4)  # spread confidences
    _spread_gates(model)
    policy = make_policy(model)
    x = torch.randn(64, 1, 8, 8, dtype=torch.float64)
    real = run_early_exit(model, x, policy)
    post = simulate_exits(model.all_exit_logits(x), policy)
    assert torch.equal(real.exit_index, post.exit_index)
    torch.testing.assert_close(real.logits.double(), post.logits)
    assert len(real.exit_index.unique()) > 1, "test needs samples leaving at different exits"


def test_exited_samples_really_leave_the_batch(tiny_exit_model):
    model = tiny_exit_model.eval()
    seen = []
    hook = model.blocks[-1].register_forward_hook(lambda m, i, o: seen.append(len(i[0])))
    out = run_early_exit(model, torch.randn(10, 1, 8, 8, dtype=torch.float64), MaxProbPolicy(0.0))
    hook.remove()
    assert seen == [] and (out.exit_index == 0).all()  # all leave at exit 0: last block never runs
    run_early_exit(model, torch.randn(10, 1, 8, 8, dtype=torch.float64), MaxProbPolicy(1.1))
    assert (out.exit_index == 0).all()


def test_block_flops_match_hand_count():
    cfg = ViTConfig(d_model=48, n_heads=4, mlp_ratio=2.0)
    t, d, h = cfg.n_tokens, cfg.d_model, cfg.d_hidden
    hand = 2 * t * d * 3 * d + 2 * t * t * d + 2 * t * t * d + 2 * t * d * d + 2 * t * d * h * 2
    block = Block(cfg)
    assert count_flops(block, torch.randn(1, t, d)) == hand
    assert count_flops(block, torch.randn(3, t, d)) == 3 * hand


def test_exit_flops_cumulative(tiny_exit_model):
    model = tiny_exit_model
    flops = exit_flops(model, torch.randn(1, 1, 8, 8, dtype=torch.float64))
    assert (flops.per_exit.diff() > 0).all()
    full = count_flops(model.backbone_forward, torch.randn(1, 1, 8, 8, dtype=torch.float64))
    assert flops.backbone == full
    # leaving at the last exit costs the backbone plus every IM and gate before it
    assert flops.per_exit[-1] > flops.backbone


@pytest.mark.parametrize("tau", [0.2, 0.5, 0.9])
def test_gate_threshold_picks_first_gate_at_or_above_tau_naive_loop(tiny_exit_model, tau):
    model = tiny_exit_model.eval()
    torch.manual_seed(4)
    with torch.no_grad():
        for gate in model.gates:
            gate.linear.weight.normal_(0.0, 3.0)
            gate.linear.bias.normal_(0.0, 1.0)
        exit_logits = torch.randn(model.n_exits, 40, 5, dtype=torch.float64) * 3
        values = model.gate_values(exit_logits)  # (N, L-1)
    got = simulate_exits(exit_logits, GatePolicy(model.gates, tau)).exit_index
    for n in range(40):
        first = next((ell for ell in range(model.n_exits - 1) if values[n, ell] >= tau), None)
        assert got[n].item() == (model.n_exits - 1 if first is None else first)
    # a lower threshold never leaves later
    later = simulate_exits(exit_logits, GatePolicy(model.gates, min(1.0, tau + 0.2))).exit_index
    assert (got <= later).all()
