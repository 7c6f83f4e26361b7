import math

import numpy as np
import pytest

from gatelab.edge.bootstrap import (
    paired_bootstrap,
    paired_bootstrap_budgets,
    resample_indices,
)


def _percentile(sorted_values, q):
    """Linear-interpolation percentile, written out (numpy's default 'linear' method)."""
    position = q * (len(sorted_values) - 1)
    lo = math.floor(position)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (position - lo) * (sorted_values[hi] - sorted_values[lo])


def _naive(a, b, indices):
    """One Python loop per resample over the same index draws."""
    means = []
    for row in indices:
        total = 0.0
        for i in row:
            total += a[i] - b[i]
        means.append(total / len(row))
    return sorted(means)


def test_matches_a_naive_loop_on_the_same_draws():
    rng = np.random.default_rng(1)
    a = (rng.random(37) < 0.6).astype(float)
    b = (rng.random(37) < 0.5).astype(float)
    result = paired_bootstrap(a, b, np.random.default_rng(7), resamples=500)
    means = _naive(list(a), list(b), resample_indices(37, 500, np.random.default_rng(7)))
    assert result.mean == pytest.approx(float(np.mean(a - b)), abs=1e-12)
    assert result.low == pytest.approx(_percentile(means, 0.025), abs=1e-12)
    assert result.high == pytest.approx(_percentile(means, 0.975), abs=1e-12)
    assert (result.n, result.resamples, result.confidence) == (37, 500, 0.95)


def test_budgets_share_the_draws_and_average_pairs_across_budgets():
    rng = np.random.default_rng(2)
    a = rng.random((3, 25))  # any per-question score, not only 0/1
    b = (rng.random((3, 25)) < 0.5).astype(float)
    per_budget, average = paired_bootstrap_budgets(a, b, np.random.default_rng(3), resamples=300)
    indices = resample_indices(25, 300, np.random.default_rng(3))
    for k in range(3):
        means = _naive(list(a[k]), list(b[k]), indices)
        assert per_budget[k].low == pytest.approx(_percentile(means, 0.025), abs=1e-12)
        assert per_budget[k].high == pytest.approx(_percentile(means, 0.975), abs=1e-12)
    averaged = []  # resample once, average the three budgets' means of that resample
    for row in indices:
        averaged.append(sum(sum(a[k][i] - b[k][i] for i in row) / 25 for k in range(3)) / 3)
    averaged.sort()
    assert average.mean == pytest.approx(float((a - b).mean()), abs=1e-12)
    assert average.low == pytest.approx(_percentile(averaged, 0.025), abs=1e-12)
    assert average.high == pytest.approx(_percentile(averaged, 0.975), abs=1e-12)


def test_large_n_agrees_with_the_normal_approximation():
    """Closed form: mean(d) +- 1.96 * sd(d) / sqrt(n) for n = 4000 paired 0/1 outcomes."""
    rng = np.random.default_rng(4)
    n = 4000
    a = (rng.random(n) < 0.62).astype(float)
    b = np.where(rng.random(n) < 0.8, a, 1 - a)  # correlated with a, as two methods are
    d = a - b
    half = 1.959964 * d.std() / math.sqrt(n)
    result = paired_bootstrap(a, b, np.random.default_rng(5), resamples=4000)
    assert result.mean == pytest.approx(d.mean())
    assert result.low == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert result.high == pytest.approx(d.mean() + half, abs=0.1 * half)
    # pairing matters: the unpaired interval (independent samples) is much wider here
    unpaired = 1.959964 * math.sqrt(a.var() / n + b.var() / n)
    assert result.high - result.low < 0.8 * 2 * unpaired


def test_identical_methods_give_a_zero_width_interval():
    a = np.array([1.0, 0.0, 1.0, 1.0])
    result = paired_bootstrap(a, a.copy(), np.random.default_rng(0), resamples=50)
    assert (result.mean, result.low, result.high) == (0.0, 0.0, 0.0)
    assert result.describe() == "+0.0 [+0.0, +0.0]"


@pytest.mark.parametrize(
    ("a", "b", "culprit"),
    [
        ([1.0, 0.0], [1.0], "a and b"),
        ([], [], "a:"),
        ([1.0, math.nan], [0.0, 1.0], "a:"),
        ([1.0, 0.0], [0.0, math.inf], "b:"),
        ([[1.0, 0.0]], [1.0, 0.0], "a:"),
    ],
)
def test_bad_inputs_name_the_argument(a, b, culprit):
    with pytest.raises(ValueError, match=culprit):
        paired_bootstrap(a, b, np.random.default_rng(0), resamples=10)


def test_bad_budget_inputs_and_options():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="a and b"):
        paired_bootstrap_budgets(np.zeros((2, 3)), np.zeros((3, 3)), rng)
    with pytest.raises(ValueError, match=r"a: expected shape \(budgets, n\)"):
        paired_bootstrap_budgets(np.zeros(3), np.zeros(3), rng)
    with pytest.raises(ValueError, match="a: empty"):
        paired_bootstrap_budgets(np.zeros((2, 0)) + 1, np.zeros((2, 0)), rng)
    with pytest.raises(ValueError, match="resamples"):
        paired_bootstrap([1.0], [0.0], rng, resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap([1.0], [0.0], rng, confidence=1.5)


def test_agrees_with_scipy_paired_percentile_bootstrap():
    """A peer: scipy.stats.bootstrap (paired, percentile) on the same data agrees within noise."""
    from scipy import stats

    rng = np.random.default_rng(5)
    a = (rng.random(300) < 0.62).astype(float)
    b = np.where(rng.random(300) < 0.2, 1.0 - a, a)  # correlated: pairing narrows the interval
    ours = paired_bootstrap(a, b, np.random.default_rng(0), resamples=20_000)
    theirs = stats.bootstrap(
        (a, b),
        lambda x, y, axis=-1: np.mean(x - y, axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=20_000,
        method="percentile",
        random_state=np.random.default_rng(1),
    ).confidence_interval
    # two independent sets of 20k resamples: percentiles differ by Monte-Carlo noise only
    assert ours.low == pytest.approx(theirs.low, abs=0.006)
    assert ours.high == pytest.approx(theirs.high, abs=0.006)
