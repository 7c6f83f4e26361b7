"""Every public function of ``gatelab.cost`` refuses bad input naming the argument.

As for the gates: hypothesis corrupts one argument of a valid call (a NaN, an infinity, a negative
cost, a wrong shape or type) and checks the ValueError/TypeError names it; 300 bad calls per
function, derandomised.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatelab.cost import Cost, area_under_tradeoff, count_flops, pareto_front, plot_tradeoff

BAD = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
FIELDS = ("flops", "seconds", "joules", "messages")
FINITE = st.floats(0, 1e6)
NOT_A_NUMBER = st.one_of(
    st.booleans(), st.text(max_size=2), st.just([1.0]), st.just(1j), st.just(np.array([1.0, 2.0]))
)
NON_FINITE = st.sampled_from([float("nan"), float("inf"), float("-inf")])
BAD_COST = st.one_of(NOT_A_NUMBER, NON_FINITE, st.floats(max_value=-1e-9, allow_infinity=False))


def assert_refused(function, kwargs: dict, culprit: str) -> None:
    """``function(**kwargs)`` raises ValueError or TypeError with ``culprit`` in its message."""
    with pytest.raises((ValueError, TypeError), match=rf"(^|\W){re.escape(culprit)}\W"):
        function(**kwargs)


@BAD
@given(st.sampled_from(FIELDS), BAD_COST, st.fixed_dictionaries({f: FINITE for f in FIELDS}))
def test_cost_fields(field, bad, others):
    assert_refused(Cost, others | {field: bad}, f"Cost.{field}")


@BAD
@given(BAD_COST)
def test_cost_times_a_bad_factor(bad):
    assert_refused(lambda factor: Cost(flops=1.0) * factor, {"factor": bad}, "factor")


@BAD
@given(st.one_of(st.none(), FINITE, st.text(max_size=2), st.just({"flops": 1.0})))
def test_cost_within_a_bad_budget(bad):
    assert_refused(lambda budget: Cost(flops=1.0).within(budget), {"budget": bad}, "budget")


@functools.cache
def bad_points(name: str = "points") -> st.SearchStrategy:
    """Bad (cost, quality) collections: NaN/inf entries, wrong shapes, strings, ragged lists."""
    good = st.lists(st.tuples(FINITE, FINITE), min_size=1, max_size=6)
    with_non_finite = st.tuples(good, st.integers(0, 5), st.integers(0, 1), NON_FINITE).map(
        lambda t: [
            tuple(t[3] if (i, j) == (t[1] % len(t[0]), t[2]) else v for j, v in enumerate(p))
            for i, p in enumerate(t[0])
        ]
    )
    return st.one_of(
        with_non_finite,
        st.just([]),
        st.lists(FINITE, min_size=1, max_size=4),  # 1-D
        st.lists(st.tuples(FINITE, FINITE, FINITE), min_size=1, max_size=3),  # (n, 3)
        st.just([[1.0, 2.0], [3.0]]),  # ragged
        st.just([["a", "b"]]),
        st.text(max_size=3),
        st.none(),
        st.just({"a": 1.0}),
        st.just(np.zeros((2, 2, 2))),
    )


@BAD
@given(bad_points())
def test_pareto_front(bad):
    assert_refused(pareto_front, {"points": bad}, "points")


@BAD
@given(
    st.one_of(
        bad_points().map(lambda p: ({"points": p}, "points")),
        st.one_of(
            st.tuples(FINITE, NON_FINITE),
            st.tuples(NON_FINITE, FINITE),
            st.tuples(st.floats(1, 2), st.floats(0, 0.9)),  # low > high
            st.just((0.0,)),
            st.just((0.0, 1.0, 2.0)),
            st.just("ab"),
            st.just(3.0),
            st.tuples(st.booleans(), FINITE),
        ).map(lambda r: ({"points": [(0.0, 0.5), (1.0, 0.9)], "cost_range": r}, "cost_range")),
    )
)
def test_area_under_tradeoff(case):
    assert_refused(area_under_tradeoff, *case)


@BAD
@given(st.one_of(st.none(), st.integers(), st.text(max_size=3), st.just([len])))
def test_count_flops(bad):
    assert_refused(count_flops, {"fn": bad}, "fn")


@BAD
@given(
    st.one_of(
        st.one_of(st.none(), st.just([]), st.text(max_size=2), st.just({})).map(
            lambda c: ({"curves": c, "path": "x.png"}, "curves")
        ),
        bad_points().map(lambda p: ({"curves": {"m": p}, "path": "x.png"}, "curves['m']")),
        st.one_of(st.none(), st.integers(), st.just(["x.png"])).map(
            lambda path: ({"curves": {"m": [(0.0, 1.0)]}, "path": path}, "path")
        ),
    )
)
def test_plot_tradeoff(case):
    assert_refused(plot_tradeoff, *case)


def test_valid_boundaries_still_pass():
    """Zero costs, a zero factor, integer and numpy numbers, a zero-width range are fine."""
    assert Cost(flops=0, seconds=np.float64(1.5)) * 0 == Cost(flops=0, seconds=0.0)
    assert area_under_tradeoff([(1, 0.5)], cost_range=(1, 1)) == 0.5
    assert pareto_front(np.array([[0.0, 0.0]])).tolist() == [0]
