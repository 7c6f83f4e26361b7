import numpy as np
import torch

from gatelab.exits.baselines import (
    baseline_policies,
    interpolate_front,
    margins,
    oracle_exits,
    select_on_validation,
)


def test_oracle_exits_against_naive_loop():
    torch.manual_seed(0)
    logits = torch.randn(4, 30, 3)
    labels = torch.randint(0, 3, (30,))
    cost = torch.tensor([0.2, 0.4, 0.7, 1.0])
    for lam in (0.0, 1.5):
        got = oracle_exits(logits, labels, cost, lam)
        for n in range(30):
            vals = [
                float(logits[ell, n].argmax() != labels[n]) + lam * cost[ell].item()
                for ell in range(4)
            ]
            assert got[n].item() == int(np.argmin(vals))


def test_interpolation_and_margins():
    a = np.array([[0.2, 0.5], [0.6, 0.9]])
    b = np.array([[0.4, 0.6], [0.8, 0.8]])
    grid = np.array([0.1, 0.4, 0.7])
    got = interpolate_front(a, grid)
    assert np.isnan(got[0]) and np.isclose(got[1], 0.7) and got[2] == 0.9
    m = margins({"ours": a, "other": b}, "ours", 0.4, 0.8, n=5)
    # at 0.4: 0.7 vs 0.6 -> +10 points; at 0.6: 0.9 vs 0.7 -> +20; at 0.8: 0.9 vs 0.8 -> +10
    assert np.isclose(m["max_margin_points"], 20.0) and np.isclose(m["min_margin_points"], 10.0)


def test_baseline_thresholds_from_validation_are_pareto():
    torch.manual_seed(1)
    logits = torch.randn(3, 200, 4) * torch.tensor([1.0, 2.0, 4.0])[:, None, None]
    labels = logits[-1].argmax(-1)
    cost = torch.tensor([0.3, 0.6, 1.0])
    candidates = baseline_policies(logits)
    assert set(candidates) == {"max-prob", "entropy", "patience"}
    kept = select_on_validation(candidates["max-prob"], logits, labels, cost)
    assert 1 <= len(kept) <= len(candidates["max-prob"])


def test_sweep_config_and_checkpoint_names():
    import pytest

    from gatelab.exits.operating_point import sweep_config
    from gatelab.exits.sweep import VARIANTS, checkpoint_name

    assert sweep_config(True).variants == ("jei-dnn",)
    assert sweep_config(False, tuple(VARIANTS)).variants == tuple(VARIANTS)
    names = {checkpoint_name(v, 0.2) for v in VARIANTS}
    assert len(names) == len(VARIANTS) and "jei_lam0.2.safetensors" in names
    with pytest.raises(ValueError, match="variant"):
        sweep_config(True, ("jei-dnn-typo",))
    from gatelab.exits.sweep import SweepConfig

    assert 0.5 in SweepConfig().gate_thresholds
    for bad in ((), (0.5, 1.0), (0.0,)):
        with pytest.raises(ValueError, match="gate_thresholds"):
            SweepConfig(gate_thresholds=bad)


def test_sweep_keeps_points_on_the_validation_front_whatever_their_test_scores():
    from gatelab.exits.sweep import selected_points

    rng = np.random.default_rng(3)
    val = rng.random((30, 2))
    points = [
        {"val_flops_fraction": c, "val_accuracy": a, "accuracy": rng.random()} for c, a in val
    ]
    kept = [points.index(p) for p in selected_points(points)]
    naive = [
        i
        for i, (c, a) in enumerate(val)
        if not any((c2 <= c and a2 > a) or (c2 < c and a2 >= a) for c2, a2 in val)
    ]
    assert sorted(kept) == naive and 0 < len(naive) < 30
    oracle = [{"accuracy": 0.9, "flops_fraction": 0.2}]
    assert selected_points(oracle) == oracle
