import math

import pytest
import torch

from gatelab.exits import (
    conformal_quantile,
    conformal_thresholds,
    expected_calibration_error,
    prediction_sets,
)
from gatelab.exits.eval import set_metrics


def test_ece_against_naive_loop():
    torch.manual_seed(0)
    probs = torch.randn(500, 4, dtype=torch.float64).mul(2).softmax(-1)
    labels = torch.randint(0, 4, (500,))
    ece = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        rows = [i for i in range(500) if lo < probs[i].max() <= hi]
        if rows:
            conf = sum(probs[i].max().item() for i in rows) / len(rows)
            acc = sum(int(probs[i].argmax() == labels[i]) for i in rows) / len(rows)
            ece += len(rows) / 500 * abs(acc - conf)
    assert expected_calibration_error(probs, labels) == pytest.approx(ece, abs=1e-12)


def test_ece_zero_for_perfectly_calibrated_bins():
    probs = torch.tensor([[0.5, 0.5]] * 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1])  # argmax is class 0: right half the time
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0)


def test_conformal_quantile_finite_sample_rank():
    scores = torch.arange(1, 20, dtype=torch.float64) / 20  # n = 19
    # ceil(20 * 0.9) = 18 -> the 18th smallest
    assert conformal_quantile(scores, 0.1) == pytest.approx(18 / 20)
    assert math.isinf(conformal_quantile(scores[:5], 0.1))  # ceil(6*0.9)=6 > 5
    with pytest.raises(ValueError, match="alpha"):
        conformal_quantile(scores, 1.0)


def test_per_exit_thresholds_with_pooled_fallback():
    scores = torch.rand(300, dtype=torch.float64)
    exit_index = torch.cat([torch.zeros(280), torch.ones(15), torch.full((5,), 2)]).long()
    q = conformal_thresholds(scores, exit_index, 3, 0.1, min_count=50)
    assert q[0] == conformal_quantile(scores[:280], 0.1)
    assert q[1] == q[2] == conformal_quantile(scores, 0.1)


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1])
def test_conformal_coverage_on_synthetic_known_probabilities(alpha):
    """Labels drawn from the model's own probabilities: coverage must be close to 1 - alpha."""
    g = torch.Generator().manual_seed(int(alpha * 1000))
    n_cal, n_test, c, n_exits = 4000, 20000, 6, 3
    covered = []
    for _ in range(5):
        logits = torch.randn(n_cal + n_test, c, generator=g, dtype=torch.float64) * 2
        probs = logits.softmax(-1)
        labels = torch.multinomial(probs, 1, generator=g).squeeze(-1)
        exits = (probs.max(-1).values * n_exits).long().clamp(max=n_exits - 1)  # confidence-based
        sc = 1 - probs[:n_cal][torch.arange(n_cal), labels[:n_cal]]
        q = conformal_thresholds(sc, exits[:n_cal], n_exits, alpha)
        sets = prediction_sets(probs[n_cal:], exits[n_cal:], q)
        covered.append(set_metrics(sets, labels[n_cal:]).coverage)
    mean = sum(covered) / len(covered)
    assert abs(mean - (1 - alpha)) < 0.01, (mean, covered)
