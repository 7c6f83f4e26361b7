import warnings

import numpy as np
import pytest
import torch

from gatelab.gmoe import GaussianMoE, GaussianMoERegressor
from gatelab.gmoe.em import design, expert_step, newton_direction, run_em
from gatelab.gmoe.model import Params


def dense_data(n=600, seed=0):
    """The authors' group's dense-gating simulation setting, k* = 2, X on [0, 1]."""
    true = GaussianMoE(
        [-8.0, 0.0], [[25.0], [0.0]], [[-20.0], [20.0]], [15.0, -5.0], [0.09, 0.16], 2
    )
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 1, size=(n, 1))
    return true, X, true.sample(X, rng)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_em_never_decreases_likelihood(seed):
    _, X, y = dense_data(seed=seed)
    est = GaussianMoERegressor(n_experts=3, n_init=2, max_iter=150, tol=0, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tol=0 is met only at an exact fixed point
        est.fit(X, y)
    steps = np.diff(est.history_)
    assert len(steps) >= 20
    assert steps.min() >= -1e-12 * np.abs(est.history_).max()


def test_topk_em_never_decreases_likelihood():
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, size=(800, 2))
    true = GaussianMoE(
        [0.5, -0.5, 0],
        [[0, 3], [-3, -1], [0, 0]],
        [[1, -1], [-2, 0.5], [0, 2]],
        [0.5, -0.5, 1],
        [0.1, 0.2, 0.3],
        2,
    )
    y = true.sample(X, rng)
    est = GaussianMoERegressor(n_experts=4, top_k=2, n_init=2, max_iter=60, tol=0, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X, y)
    assert len(est.history_) > 5
    assert np.diff(est.history_).min() >= -1e-12 * np.abs(est.history_).max()


def test_expert_step_is_weighted_least_squares():
    rng = np.random.default_rng(0)
    X = torch.as_tensor(rng.normal(size=(200, 2)))
    y = torch.as_tensor(rng.normal(size=200))
    resp = torch.as_tensor(rng.dirichlet(np.ones(3), size=200).T[None])  # (1, E, N)
    p0 = Params(
        torch.zeros(1, 3),
        torch.zeros(1, 3, 2),
        torch.zeros(1, 3, 2),
        torch.zeros(1, 3),
        torch.ones(1, 3),
    )
    Z, zz = design(X)
    p = expert_step(Z, zz, y, resp, p0, var_floor=1e-8)
    for i in range(3):
        w = resp[0, i].numpy()
        Zn = np.column_stack([X.numpy(), np.ones(200)])
        coef = np.linalg.lstsq(Zn * np.sqrt(w)[:, None], y.numpy() * np.sqrt(w), rcond=None)[0]
        np.testing.assert_allclose(p.a[0, i].numpy(), coef[:2], rtol=1e-8)
        np.testing.assert_allclose(p.b[0, i].item(), coef[2], rtol=1e-8)
        resid = y.numpy() - Zn @ coef
        np.testing.assert_allclose(p.var[0, i].item(), (w * resid**2).sum() / w.sum(), rtol=1e-8)


def test_variance_floor_prevents_collapse():
    X = torch.zeros(10, 1, dtype=torch.float64)
    y = torch.ones(10, dtype=torch.float64)  # a perfect fit would have variance 0
    resp = torch.ones(1, 1, 10, dtype=torch.float64)
    p0 = Params(
        torch.zeros(1, 1),
        torch.zeros(1, 1, 1),
        torch.zeros(1, 1, 1),
        torch.zeros(1, 1),
        torch.ones(1, 1),
    )
    Z, zz = design(X)
    assert expert_step(Z, zz, y, resp, p0, var_floor=0.01).var.item() == pytest.approx(0.01)


def test_newton_direction_matches_autograd_hessian():
    rng = np.random.default_rng(0)
    F = torch.as_tensor(rng.normal(size=(50, 3)))
    target = torch.as_tensor(rng.dirichlet(np.ones(4), size=50).T[None])  # (1, E, N)
    theta = torch.as_tensor(rng.normal(size=(3, 3)) * 0.3)

    def objective(t):
        logits = torch.cat([F @ t.T, torch.zeros(50, 1, dtype=F.dtype)], 1)  # last expert at 0
        return (target[0].T * torch.log_softmax(logits, 1)).sum()

    grad = torch.autograd.functional.jacobian(objective, theta).reshape(-1)
    hess = torch.autograd.functional.hessian(objective, theta).reshape(9, 9)
    expected = torch.linalg.solve(-hess, grad).reshape(3, 3)
    logits = torch.cat([F @ theta.T, torch.zeros(50, 1, dtype=F.dtype)], 1)
    prob = torch.softmax(logits, 1).T[None]
    _, ff = design(F, intercept=False)
    torch.testing.assert_close(
        newton_direction(F, ff, target, prob)[0], expected, rtol=1e-6, atol=1e-8
    )


def test_restarts_batched_equal_single_runs():
    true, X, y = dense_data(n=300)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    starts = [
        GaussianMoE([s, 0.0], [[20.0 + s], [0.0]], [[-19.0], [19.0]], [14.0, -4.0], [0.2, 0.2], 2)
        for s in (-1.0, 1.0)
    ]
    batch = Params(*(torch.cat(t) for t in zip(*(m.to_params() for m in starts), strict=True)))
    together = run_em(Xt, yt, batch, 2, max_iter=30, tol=1e-10, var_floor=1e-6)
    for r, m in enumerate(starts):
        alone = run_em(Xt, yt, m.to_params(), 2, max_iter=30, tol=1e-10, var_floor=1e-6)
        assert together.log_likelihood[r].item() == pytest.approx(
            alone.log_likelihood[0].item(), rel=1e-10
        )
        assert together.n_iter[r] == alone.n_iter[0]
