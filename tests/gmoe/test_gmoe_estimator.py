import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.estimator_checks import parametrize_with_checks

from gatelab.gmoe import GaussianMoE, GaussianMoERegressor
from gatelab.gmoe.eval import voronoi_loss


@parametrize_with_checks(
    [GaussianMoERegressor(n_experts=2, n_init=1, max_iter=30, tol=1e-4, random_state=0)]
)
def test_sklearn_contract(estimator, check):
    """Every check of sklearn's suite passes, but two.

    The estimator opts out of one (tag ``poor_score``: ``score`` is a log-likelihood, not R²), and
    sklearn skips one itself (``check_array_api_input`` runs only with ``SCIPY_ARRAY_API=1``; the
    estimator takes NumPy input).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


TRUE = GaussianMoE([-8.0, 0.0], [[25.0], [0.0]], [[-20.0], [20.0]], [15.0, -5.0], [0.09, 0.16], 2)


def simulate(n, seed):
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 1, size=(n, 1))
    return X, TRUE.sample(X, rng)


def test_recovers_parameters_and_d1_shrinks_with_n():
    losses = {}
    for n in (400, 6400):
        fits = []
        for seed in range(3):
            X, y = simulate(n, seed)
            est = GaussianMoERegressor(n_experts=2, n_init=3, random_state=seed).fit(X, y)
            assert est.converged_
            # the MLE is at least as likely as the truth on its own data
            assert est.log_likelihood_ >= TRUE.log_density(X, y).mean() - 1e-9
            fits.append(voronoi_loss(est.params_, TRUE, kind="exact"))
        losses[n] = np.mean(fits)
    assert losses[6400] < 0.5 * losses[400]
    assert losses[6400] < 0.5


def test_predict_score_sample_bic():
    X, y = simulate(500, 0)
    est = GaussianMoERegressor(n_experts=2, random_state=0).fit(X, y)
    np.testing.assert_allclose(est.predict(X[:1]), est.params_.mean(X[:1]))
    assert est.predict(X).shape == (500,)
    assert est.score(X, y) == pytest.approx(est.params_.log_density(X, y).mean(), rel=1e-12)
    assert est.score(X, y) == pytest.approx(est.log_likelihood_, rel=1e-9)
    bic = -2 * 500 * est.score(X, y) + (1 * 2 + 2 * 3) * np.log(500)
    assert est.bic(X, y) == pytest.approx(bic, rel=1e-12)
    assert est.sample(X, random_state=0).shape == (500,)
    assert isinstance(est.predict(X), np.ndarray)


def test_same_seed_same_fit():
    X, y = simulate(300, 1)
    a = GaussianMoERegressor(n_experts=3, top_k=2, random_state=5).fit(X, y)
    b = GaussianMoERegressor(n_experts=3, top_k=2, random_state=5).fit(X, y)
    np.testing.assert_array_equal(a.history_, b.history_)
    np.testing.assert_array_equal(a.params_.beta1, b.params_.beta1)


def test_init_from_params_and_k1():
    X, y = simulate(400, 2)
    est = GaussianMoERegressor(n_experts=2, init=TRUE, max_iter=500).fit(X, y)
    assert voronoi_loss(est.params_, TRUE) < 2.0
    one = GaussianMoERegressor(n_experts=2, top_k=1, random_state=0).fit(X, y)
    assert np.all(one.params_.beta0 == 0)  # unidentified with K = 1: fixed at zero
    assert np.all(np.diff(one.history_) >= -1e-12)


def test_convergence_warning():
    X, y = simulate(200, 0)
    with pytest.warns(ConvergenceWarning, match="increase max_iter"):
        GaussianMoERegressor(n_experts=2, max_iter=1, random_state=0).fit(X, y)


@pytest.mark.parametrize(
    "kwargs, X, y, match",
    [
        ({}, np.array([[np.nan], [1.0], [2.0]]), np.zeros(3), "NaN"),
        ({}, np.zeros((5, 1)), np.zeros(4), "inconsistent numbers of samples"),
        (
            {"n_experts": 2, "top_k": 3},
            np.random.default_rng(0).normal(size=(9, 1)),
            np.arange(9.0),
            "top_k must be in",
        ),
        ({"n_experts": 0}, np.zeros((5, 1)), np.zeros(5), "n_experts must be an int >= 1"),
        ({"n_experts": 6}, np.zeros((5, 1)), np.zeros(5), "n_samples=5 is too few"),
        ({"init": "random"}, np.zeros((5, 1)), np.zeros(5), "init must be 'kmeans'"),
        ({"tol": -1.0}, np.zeros((5, 1)), np.zeros(5), "tol must be"),
    ],
)
def test_bad_inputs(kwargs, X, y, match):
    with pytest.raises(ValueError, match=match):
        GaussianMoERegressor(**kwargs).fit(X, y)


def test_wrong_width_at_predict():
    X, y = simulate(100, 0)
    est = GaussianMoERegressor(n_experts=2, n_init=1, random_state=0).fit(X, y)
    with pytest.raises(ValueError, match="features"):
        est.predict(np.zeros((3, 2)))
