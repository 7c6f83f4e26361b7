import numpy as np
import pytest
import torch
from scipy.stats import norm

from gatelab import gates
from gatelab.gmoe import GaussianMoE
from gatelab.gmoe.model import active_mask, log_gate


def make_model(top_k=2, seed=0, k=4, d=2):
    rng = np.random.default_rng(seed)
    return GaussianMoE(
        beta0=rng.normal(size=k),
        beta1=rng.normal(size=(k, d)) * 2,
        a=rng.normal(size=(k, d)),
        b=rng.normal(size=k),
        var=rng.uniform(0.1, 1.0, size=k),
        top_k=top_k,
    )


def naive_density(model, x, y):
    """Loop over experts with explicit top-K selection by beta1^T x (ties to lower index)."""
    logits = model.beta1 @ x
    order = sorted(range(model.n_experts), key=lambda i: (-logits[i], i))[: model.top_k]
    scores = np.array([logits[i] + model.beta0[i] for i in order])
    w = np.exp(scores - scores.max())
    w /= w.sum()
    return sum(
        wi * norm.pdf(y, model.a[i] @ x + model.b[i], np.sqrt(model.var[i]))
        for wi, i in zip(w, order, strict=True)
    )


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_log_density_matches_naive_loop(top_k):
    model = make_model(top_k)
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(30, 2)), rng.normal(size=30)
    expected = np.log([naive_density(model, x, yi) for x, yi in zip(X, y, strict=True)])
    np.testing.assert_allclose(model.log_density(X, y), expected, rtol=1e-12)


def test_mean_and_regions_match_naive():
    model = make_model(2)
    X = np.random.default_rng(2).normal(size=(20, 2))
    for x, m, region in zip(X, model.mean(X), model.regions(X), strict=True):
        logits = model.beta1 @ x
        sel = sorted(sorted(range(4), key=lambda i: (-logits[i], i))[:2])
        assert list(region) == sel
        s = np.exp(logits[sel] + model.beta0[sel])
        assert m == pytest.approx((s / s.sum()) @ (model.a[sel] @ x + model.b[sel]), rel=1e-12)
    assert model.mean(X[:1]).shape == (1,)  # B = 1


def test_gate_is_the_shared_topk_softmax_and_mask_matches_select_topk():
    torch.manual_seed(0)
    X = torch.randn(50, 3, dtype=torch.float64)
    X[:5] = 0.0  # all logits tie: the lower indices must win, as in gates.select_topk
    beta1 = torch.randn(2, 5, 3, dtype=torch.float64)
    beta0 = torch.randn(2, 5, dtype=torch.float64)
    logw, mask = log_gate(X, beta0, beta1, 3)
    for r in range(2):
        weights, idx = gates.topk_softmax(X @ beta1[r].T, 3, beta0[r])
        dense = torch.zeros(50, 5, dtype=torch.float64).scatter(-1, idx, weights)
        torch.testing.assert_close(logw[r].exp().T, dense)
        ref = torch.zeros(50, 5, dtype=torch.bool).scatter(
            -1, gates.select_topk(X @ beta1[r].T, 3), True
        )
        assert torch.equal(active_mask(X, beta1, 3)[r].T, ref)


def test_normalisation_and_k1_intercepts():
    m = make_model(2)
    assert np.all(m.beta1[-1] == 0) and m.beta0[-1] == 0
    shifted = GaussianMoE(m.beta0 + 3.0, m.beta1 + 1.5, m.a, m.b, m.var, 2)
    X, y = np.random.default_rng(3).normal(size=(10, 2)), np.zeros(10)
    np.testing.assert_allclose(shifted.log_density(X, y), m.log_density(X, y), rtol=1e-12)
    one = make_model(1)
    assert np.all(one.beta0 == 0)  # beta0 does not enter a top-1 density
    assert one.n_parameters() == 3 * 2 + 4 * 4 and m.n_parameters() == 3 * 3 + 4 * 4


def test_sample_moments_and_seed():
    m = GaussianMoE([0.0], [[0.0]], [[2.0]], [1.0], [0.25], 1)
    X = np.full((20000, 1), 0.5)
    y = m.sample(X, random_state=0)
    assert y.mean() == pytest.approx(2.0, abs=0.01) and y.var() == pytest.approx(0.25, rel=0.03)
    np.testing.assert_array_equal(m.sample(X[:5], 7), m.sample(X[:5], 7))


def test_sample_mixture_weights():
    m = make_model(2, k=3, d=1)
    X = np.ones((40000, 1))
    weights, idx = m.gate(X[:1])
    y = m.sample(X, random_state=1)
    means = m.a[:, 0] + m.b
    # the sample mean is the gate-weighted mean of the selected experts
    expected = float((weights[0].numpy() * means[idx[0].numpy()]).sum())
    assert y.mean() == pytest.approx(expected, abs=0.03)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"var": [1.0, -1.0]}, "variances must be > 0"),
        ({"var": [1.0, 1.0, 1.0]}, "var must have shape"),
        ({"a": [[1.0, 2.0], [1.0, 2.0]]}, "a must have shape"),
        ({"top_k": 3}, "top_k must be in"),
        ({"b": [np.nan, 0.0]}, "NaN"),
    ],
)
def test_bad_parameters(kwargs, match):
    base = dict(
        beta0=[0.0, 0.0],
        beta1=[[1.0], [0.0]],
        a=[[1.0], [0.0]],
        b=[0.0, 0.0],
        var=[1.0, 1.0],
        top_k=2,
    )
    with pytest.raises(ValueError, match=match):
        GaussianMoE(**(base | kwargs))


def test_bad_inputs():
    m = make_model(2)
    with pytest.raises(ValueError, match="expected X of shape"):
        m.mean(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="y must have shape"):
        m.log_density(np.zeros((3, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        m.mean(np.array([[np.nan, 0.0]]))
