"""``GaussianMoERegressor`` refuses bad data and bad hyper-parameters, naming the argument.

Hypothesis corrupts one argument of a valid call — ``X`` or ``y`` (NaN, inf, wrong dimensions,
strings, complex numbers, lengths that disagree), ``sample_weight``, ``random_state`` or one
constructor parameter (out of range, wrong type, ``k > n_samples``) — and checks the ValueError or
TypeError names it, before any EM iteration runs: 300 bad calls per public method, derandomised.
The sklearn contract itself is ``test_gmoe_estimator.py::test_sklearn_contract``.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.exceptions import ConvergenceWarning

from gatelab.gmoe import GaussianMoERegressor

BAD = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
NON_FINITE = st.sampled_from([np.nan, np.inf, -np.inf])
NOT_AN_INT = st.one_of(st.floats(0.5, 3.5).filter(lambda v: v != int(v)), st.text(max_size=2))
BAD_PARAMS = {
    "n_experts": st.one_of(st.integers(-3, 0), NOT_AN_INT, st.booleans(), st.none()),
    "top_k": st.one_of(st.integers(-3, 0), st.integers(3, 6), NOT_AN_INT, st.booleans()),
    "n_init": st.one_of(st.integers(-3, 0), NOT_AN_INT, st.none()),
    "max_iter": st.one_of(st.integers(-3, 0), NOT_AN_INT, st.none()),
    "tol": st.one_of(st.floats(max_value=-1e-9), NON_FINITE, st.booleans(), st.text(max_size=2)),
    "reg_var": st.one_of(st.floats(max_value=-1e-9), NON_FINITE, st.text(max_size=2)),
    "init": st.one_of(st.none(), st.integers(), st.sampled_from(["random", "k-means", ""])),
    "random_state": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32), NOT_AN_INT),
    "device": st.sampled_from(["nonsense", "cuda:x", "", "gpu"]),
    "n_threads": st.one_of(st.integers(-3, 0), NOT_AN_INT, st.booleans()),
}


def assert_refused(function, kwargs: dict, culprit: str) -> None:
    """``function(**kwargs)`` raises ValueError or TypeError with ``culprit`` in its message."""
    with pytest.raises((ValueError, TypeError), match=rf"(^|\W){re.escape(culprit)}\W"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn's conversion warnings, not the point here
            function(**kwargs)


@st.composite
def data(draw, n_features: int = 1) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(6, 20))
    rng = np.random.default_rng(draw(st.integers(0, 99)))
    X = rng.uniform(-1, 1, (n, n_features))
    return X, X.sum(1) + 0.1 * rng.standard_normal(n)


@st.composite
def with_value(draw, array: np.ndarray, values: st.SearchStrategy) -> np.ndarray:
    """``array`` (as float) with one drawn entry replaced by a drawn value."""
    out = array.astype(float)
    out.flat[draw(st.integers(0, out.size - 1))] = draw(values)
    return out


def bad_X(X: np.ndarray) -> st.SearchStrategy:
    n, d = X.shape
    return st.one_of(
        with_value(X, NON_FINITE),
        st.sampled_from([X[:, 0], X[:, :, None], np.zeros((n, 0)), X.astype(complex)]),
        st.just(np.full((n, d), "a")),
        st.just(None),
        st.just([[1.0, 2.0]] * (n - 1) + [[1.0]]),  # ragged
    )


def bad_y(y: np.ndarray) -> st.SearchStrategy:
    n = len(y)
    return st.one_of(
        with_value(y, NON_FINITE),
        st.sampled_from([np.c_[y, y], y.astype(complex), np.full(n, "a"), None]),
    )


@st.composite
def fit_cases(draw):
    X, y = draw(data())
    params = {"n_experts": 2, "n_init": 1, "max_iter": 5}
    name = draw(st.sampled_from(["X", "y", "X and y", "n_experts > n_samples", *BAD_PARAMS]))
    if name == "X":
        return params, {"X": draw(bad_X(X)), "y": y}, "X"
    if name == "y":
        return params, {"X": X, "y": draw(bad_y(y))}, "y"
    if name == "X and y":
        cut = draw(st.integers(1, len(y) - 1))
        return (
            params,
            {"X": X, "y": y[:cut]} if draw(st.booleans()) else {"X": X[:cut], "y": y},
            name,
        )
    if name == "n_experts > n_samples":
        return (
            params | {"n_experts": len(X) + draw(st.integers(1, 5))},
            {"X": X, "y": y},
            "n_experts",
        )
    return params | {name: draw(BAD_PARAMS[name])}, {"X": X, "y": y}, name


@BAD
@given(fit_cases())
def test_fit(case):
    params, args, culprit = case
    assert_refused(GaussianMoERegressor(**params).fit, args, culprit)


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, (60, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return GaussianMoERegressor(n_experts=2, n_init=1, max_iter=20, random_state=0).fit(
            X, X.sum(1)
        )


@st.composite
def predict_cases(draw):
    """Bad ``X`` for a model fitted on 2 features: one more or fewer, NaN, 1-D, strings."""
    X, _ = draw(data(n_features=2))
    wrong_width = st.sampled_from([X[:, :1], np.c_[X, X]])
    return {"X": draw(st.one_of(bad_X(X), wrong_width))}, "X"


@BAD
@given(predict_cases())
def test_predict(fitted, case):
    assert_refused(fitted.predict, *case)


@st.composite
def scored_cases(draw, weights: bool):
    X, y = draw(data(n_features=2))
    n = len(y)
    choices = ["X", "y", "X and y"] + (["sample_weight"] * 2 if weights else [])
    name = draw(st.sampled_from(choices))
    args = {"X": X, "y": y}
    if name == "X":
        args["X"] = draw(st.one_of(bad_X(X), st.just(X[:, :1])))
    elif name == "y":
        args["y"] = draw(bad_y(y))
    elif name == "X and y":
        args["y"] = y[: draw(st.integers(1, n - 1))]
    else:
        args["sample_weight"] = draw(
            st.one_of(
                with_value(np.ones(n), st.one_of(NON_FINITE, st.floats(-9, -1e-9))),
                st.sampled_from([np.ones(n + 1), np.ones((n, 2)), np.zeros(n), np.full(n, "a")]),
            )
        )
    return args, name


@BAD
@given(scored_cases(weights=True))
def test_score(fitted, case):
    assert_refused(fitted.score, *case)


@BAD
@given(scored_cases(weights=False))
def test_bic(fitted, case):
    assert_refused(fitted.bic, *case)


@st.composite
def sample_cases(draw):
    X, _ = draw(data(n_features=2))
    if draw(st.booleans()):
        return {"X": draw(bad_X(X))}, "X"
    bad_seed = st.one_of(st.integers(max_value=-1), st.text(min_size=1, max_size=2), st.just(1.5))
    return {"X": X, "random_state": draw(bad_seed)}, "random_state"


@BAD
@given(sample_cases())
def test_sample(fitted, case):
    assert_refused(fitted.sample, *case)
