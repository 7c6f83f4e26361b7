import math

import numpy as np
import pytest

from gatelab.edge import select as sel


def _instance(rng, n, e_range=None, d_range=None):
    """A random monotone instance: weighted coverage quality, additive energy, max delay."""
    cover = rng.random((n, 8)) < 0.3
    value = rng.random(8)
    bonus = rng.random(n) * 0.01
    energy = rng.random(n)
    delay = rng.random(n)
    e_budget = rng.uniform(*(e_range or (0.0, 0.5 * n + 0.1)))
    d_budget = rng.uniform(*(d_range or (0.0, 1.2)))
    aggregate = rng.uniform(0, 0.1)

    def quality(subset):
        items = sorted(subset)
        if not items:
            return 0.0
        return float(value[cover[items].any(0)].sum() + bonus[items].sum())

    cons = [(sel.energy_cost(energy), e_budget), (sel.delay_cost(delay, aggregate), d_budget)]
    # vectorised brute force over all 2^n masks: an independent reference
    masks = (np.arange(2**n)[:, None] >> np.arange(n)) & 1  # (2^n, n)
    masks = masks.astype(bool)
    e = masks @ energy
    d = np.where(
        masks.any(1), np.where(masks, delay, -np.inf).max(1, initial=-np.inf) + aggregate, 0.0
    )
    feasible = (e <= e_budget) & (d <= d_budget)
    q = (masks.astype(float) @ cover.astype(float) > 0) @ value + masks @ bonus
    best = q[feasible].max()
    return quality, cons, best, int(feasible.sum())


def test_selector_matches_brute_force_on_hundreds_of_instances():
    rng = np.random.default_rng(0)
    n_instances = 0
    for n in [0, 1, 2, 3, 5, 8, 10, 12] * 30 + [14, 16] * 6:
        quality, cons, best, _ = _instance(rng, n)
        result = sel.select_subset(n, quality, cons)
        assert result.quality == pytest.approx(best, abs=1e-12)
        assert all(f(result.subset) <= b for f, b in cons)
        assert quality(result.subset) == pytest.approx(result.quality)
        n_instances += 1
    assert n_instances >= 250


def test_selector_evaluates_far_fewer_subsets_than_feasible():
    rng = np.random.default_rng(1)
    evaluations = feasible = 0
    for _ in range(20):
        quality, cons, best, n_feasible = _instance(rng, 16, (1.0, 4.0), (0.4, 1.2))
        result = sel.select_subset(16, quality, cons)
        assert result.quality == pytest.approx(best, abs=1e-12)
        evaluations += result.evaluations
        feasible += n_feasible
    ratio = evaluations / feasible
    print(f"selector: {evaluations} quality calls for {feasible} feasible subsets ({ratio:.3f})")
    assert ratio < 0.2


def test_brute_force_helper_agrees():
    rng = np.random.default_rng(2)
    for _ in range(30):
        quality, cons, best, n_feasible = _instance(rng, 6)
        naive = sel.brute_force_subset(6, quality, cons)
        assert naive.quality == pytest.approx(best)
        assert naive.evaluations == n_feasible


def test_empty_set_when_nothing_fits_and_errors():
    def quality(s):
        return float(len(s))

    energy = sel.energy_cost([1.0, 2.0, 3.0])
    result = sel.select_subset(3, quality, [(energy, 0.5)])
    assert result.subset == frozenset() and result.quality == 0.0
    result = sel.select_subset(3, quality, [(energy, 0.0)])
    assert result.subset == frozenset()
    assert sel.select_subset(3, quality, [(energy, math.inf)]).subset == frozenset({0, 1, 2})
    with pytest.raises(ValueError, match="budget must be >= 0"):
        sel.select_subset(3, quality, [(energy, -1.0)])
    with pytest.raises(ValueError, match="n_items"):
        sel.select_subset(-1, quality, [])
    with pytest.raises(TypeError, match="pair"):
        sel.select_subset(3, quality, [(1.0, 2.0)])


def test_cost_helpers_closed_form():
    energy = sel.energy_cost([1.0, 2.5, 4.0])
    delay = sel.delay_cost([0.3, 0.1, 0.2], aggregate_s=0.05)
    assert energy(frozenset({0, 2})) == 5.0
    assert energy(frozenset()) == 0.0
    assert delay(frozenset({1, 2})) == pytest.approx(0.25)
    assert delay(frozenset()) == 0.0


def test_monotone_hull_is_monotone_and_records_argmax():
    values = {frozenset(): 0.0, frozenset({0}): 0.5, frozenset({1}): 0.2, frozenset({0, 1}): 0.3}
    hull, argmax = sel.monotone_hull(lambda s: values[s])
    assert hull(frozenset({0, 1})) == 0.5
    assert argmax[frozenset({0, 1})] == frozenset({0})
    assert hull(frozenset({1})) == 0.2


def test_nan_quality_or_cost_and_oversized_problems_are_refused():
    import math

    import pytest

    from gatelab.edge.select import select_subset

    with pytest.raises(ValueError, match=r"quality\(\[.*\]\) is NaN"):
        select_subset(3, lambda s: math.nan if 1 in s else len(s), [(len, 2)])
    with pytest.raises(ValueError, match=r"constraints\[1\]: cost of .* is NaN"):
        select_subset(3, len, [(len, 2), (lambda s: math.nan if s else 0.0, 1.0)])
    with pytest.raises(ValueError, match="n_items=24 exceeds max_items=20"):
        select_subset(24, len, [(len, 2)])
    with pytest.warns(UserWarning, match="up to 2\\^18 subsets"):
        assert select_subset(18, len, [(len, 2)], max_items=18).quality == 2


def test_subset_to_run_follows_its_rule():
    """hull_argmax runs the best-estimated T inside the selected set; selected_set runs the set."""
    base = {frozenset({0}): -0.5, frozenset({1}): -0.9, frozenset({0, 1}): -0.7}
    hull, argmax = sel.monotone_hull(lambda s: base.get(s, -math.inf))
    assert hull(frozenset({0, 1})) == -0.5  # the pair's estimate dips below expert 0 alone
    assert sel.subset_to_run("hull_argmax", frozenset({0, 1}), argmax) == frozenset({0})
    assert sel.subset_to_run("selected_set", frozenset({0, 1}), argmax) == frozenset({0, 1})
    assert sel.subset_to_run("hull_argmax", frozenset({1}), {}) == frozenset({1})  # not hulled
    with pytest.raises(ValueError, match="run rule must be one of"):
        sel.subset_to_run("largest", frozenset({0}), argmax)
