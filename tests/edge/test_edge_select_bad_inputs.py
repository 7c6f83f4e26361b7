"""The selectors and cost builders refuse bad input naming the argument (300 bad calls each).

``select_subset`` and ``brute_force_subset``:
One argument of a valid problem is corrupted: ``n_items`` (negative, a bool, a float, above
``max_items``), ``quality`` (not callable, NaN or not a number), ``constraints`` (not pairs, a
NaN/negative/non-numeric budget, a cost that is NaN or not a number) or ``max_items``.
``energy_cost`` and ``delay_cost``: the per-expert values (not a sequence, an entry that is not a
number, negative, NaN or infinite) or ``aggregate_s``.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatelab.edge.select import brute_force_subset, delay_cost, energy_cost, select_subset

BAD = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
NOT_A_NUMBER = st.one_of(st.none(), st.text(max_size=2), st.just([1.0]), st.booleans())


def size(subset):
    return float(len(subset))


@st.composite
def cases(draw):
    n = draw(st.integers(0, 5))
    valid = {
        "n_items": n,
        "quality": size,
        "constraints": [(size, draw(st.floats(0, 5)))],
        "max_items": draw(st.integers(n, 8)),
    }
    name = draw(st.sampled_from(["n_items", "quality", "constraints", "max_items"]))
    if name == "n_items":
        bad = st.one_of(
            st.integers(-5, -1),
            st.booleans(),
            st.floats(0.5, 3.5),
            st.text(max_size=2),
            st.integers(valid["max_items"] + 1, 30),
        )
    elif name == "quality":
        bad = st.one_of(
            st.none(),
            st.integers(),
            st.just("q"),
            NOT_A_NUMBER.map(lambda v: lambda subset: v),
            st.just(lambda subset: float("nan")),
        )
    elif name == "constraints":
        bad = st.one_of(
            st.none(),
            st.just("ab"),
            st.just(3),
            st.just([size]),
            st.just([(size,)]),
            st.just([(1.0, 2.0)]),
            st.one_of(NOT_A_NUMBER, st.just(float("nan")), st.floats(-9, -1e-9)).map(
                lambda b: [(size, b)]
            ),
            st.sampled_from([float("nan"), "x", None]).map(lambda c: [(lambda s: c, 1.0)]),
        )
    else:
        bad = st.one_of(st.integers(-5, -1), st.floats(0.5, 3.5), st.text(max_size=2))
    return valid | {name: draw(bad)}, name


@BAD
@given(cases())
def test_select_subset(case):
    kwargs, culprit = case
    with pytest.raises((ValueError, TypeError), match=rf"(^|\W){re.escape(culprit)}\W"):
        select_subset(**kwargs)


@BAD
@given(cases())
def test_brute_force_subset(case):
    kwargs, culprit = case
    with pytest.raises((ValueError, TypeError), match=rf"(^|\W){re.escape(culprit)}\W"):
        brute_force_subset(**kwargs)


BAD_ENTRY = st.one_of(
    NOT_A_NUMBER, st.floats(max_value=-1e-9), st.sampled_from([float("nan"), float("inf")])
)


@st.composite
def per_expert_values(draw, name: str):
    """A valid list of costs with one entry corrupted, or not a list at all; the culprit."""
    values = draw(st.lists(st.floats(0, 10), min_size=1, max_size=6))
    if draw(st.booleans()):
        return draw(st.one_of(st.none(), st.just("1.0"), st.integers(), st.floats())), name
    i = draw(st.integers(0, len(values) - 1))
    values[i] = draw(BAD_ENTRY)
    return values, f"{name}[{i}]"


@BAD
@given(per_expert_values("energy_j"))
def test_energy_cost(case):
    values, culprit = case
    with pytest.raises((ValueError, TypeError), match=re.escape(culprit)):
        energy_cost(values)


@st.composite
def delay_cases(draw):
    if draw(st.booleans()):
        values, culprit = draw(per_expert_values("delay_s"))
        return {"delay_s": values, "aggregate_s": 0.0}, culprit
    valid = draw(st.lists(st.floats(0, 10), min_size=1, max_size=6))
    return {"delay_s": valid, "aggregate_s": draw(BAD_ENTRY)}, "aggregate_s"


@BAD
@given(delay_cases())
def test_delay_cost(case):
    kwargs, culprit = case
    with pytest.raises((ValueError, TypeError), match=re.escape(culprit)):
        delay_cost(**kwargs)
