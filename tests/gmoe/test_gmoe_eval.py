import numpy as np
import pytest
from scipy.stats import norm

from gatelab.gmoe import GaussianMoE
from gatelab.gmoe.eval import hellinger, total_variation, voronoi_cells, voronoi_loss


def single(mean, var):
    """One expert with a constant mean: p(y | x) = N(mean, var) for every x."""
    return GaussianMoE([0.0], [[0.0]], [[0.0]], [mean], [var], 1)


X = np.linspace(-1, 1, 7)[:, None]


@pytest.mark.parametrize(
    "m1, v1, m2, v2", [(0, 1, 0.5, 1), (0, 1, 0, 4), (1, 0.01, -2, 2.5), (0, 1, 0, 1)]
)
def test_hellinger_closed_form(m1, v1, m2, v2):
    bc = np.sqrt(2 * np.sqrt(v1 * v2) / (v1 + v2)) * np.exp(-((m1 - m2) ** 2) / (4 * (v1 + v2)))
    assert hellinger(single(m1, v1), single(m2, v2), X) == pytest.approx(np.sqrt(1 - bc), abs=1e-9)


@pytest.mark.parametrize("m1, v1, m2, v2", [(0, 1, 0.5, 1), (0, 1, 0, 4), (1, 0.25, -1, 2.0)])
def test_total_variation_closed_form(m1, v1, m2, v2):
    # TV = sum over the pieces between the crossing points of |F1 - F2| increments / 2
    s1, s2 = np.sqrt(v1), np.sqrt(v2)
    a = 1 / v2 - 1 / v1
    b = 2 * (m1 / v1 - m2 / v2)
    c = m2**2 / v2 - m1**2 / v1 + 2 * np.log(s2 / s1)
    roots = np.sort(np.roots([a, b, c]).real) if abs(a) > 1e-12 else np.array([-c / b])
    edges = np.concatenate([[-np.inf], roots, [np.inf]])
    diff = norm.cdf(edges, m1, s1) - norm.cdf(edges, m2, s2)
    expected = 0.5 * np.abs(np.diff(diff)).sum()
    assert total_variation(single(m1, v1), single(m2, v2), X) == pytest.approx(expected, abs=1e-8)


def test_distances_of_a_moe_to_itself_and_symmetry():
    rng = np.random.default_rng(0)
    p = GaussianMoE(
        rng.normal(size=3),
        rng.normal(size=(3, 2)),
        rng.normal(size=(3, 2)),
        rng.normal(size=3),
        [0.1, 0.5, 1.0],
        2,
    )
    q = GaussianMoE(p.beta0 + 0.3, p.beta1, p.a, p.b + 0.2, p.var, 2)
    Xs = rng.normal(size=(40, 2))
    assert hellinger(p, p, Xs) == pytest.approx(0, abs=1e-7)
    assert total_variation(p, q, Xs) == pytest.approx(total_variation(q, p, Xs), rel=1e-12)
    h, tv = hellinger(p, q, Xs), total_variation(p, q, Xs)
    assert h**2 <= tv + 1e-12  # h^2 <= TV <= sqrt(2) h
    assert tv <= np.sqrt(2) * h + 1e-12


def atoms(beta0, beta1, a, b, var, top_k=1):
    return GaussianMoE(beta0, beta1, a, b, var, top_k)


def test_voronoi_loss_by_hand():
    true = atoms([0.0, 0.0], [[1.0], [0.0]], [[1.0], [-1.0]], [0.0, 1.0], [1.0, 2.0], 2)
    fit = atoms([0.1, 0.0], [[1.2], [0.0]], [[0.9], [-1.0]], [0.05, 1.0], [1.1, 2.0], 2)
    assert [c.tolist() for c in voronoi_cells(fit, true)] == [[0], [1]]
    d1 = np.exp(0.1) * (0.2 + 0.1 + 0.05 + 0.1) + abs(np.exp(0.1) - 1)
    assert voronoi_loss(fit, true) == pytest.approx(d1, rel=1e-12)
    # over-specified: true atom 0 split in two, exponents rbar(2) = 4 for beta1/b and 2 for a/var
    over = atoms(
        [np.log(0.5), np.log(0.5), 0.0],
        [[1.1], [0.8], [0.0]],
        [[1.0], [1.2], [-1.0]],
        [0.1, 0.0, 1.0],
        [1.0, 0.9, 2.0],
        3,
    )
    # the gate is anchored at the last atom, which sits exactly on true atom 1
    d2 = 0.5 * (0.1**4 + 0 + 0.1**4 + 0) + 0.5 * (0.2**4 + 0.2**2 + 0 + 0.1**2) + 0.0
    assert voronoi_loss(over, true, kind="over") == pytest.approx(d2, rel=1e-9)
    assert voronoi_loss(over, true, kind="over", rbar={2: 2}) == pytest.approx(
        0.5 * (0.1**2 + 0.1**2) + 0.5 * (0.2**2 + 0.2 + 0.1), rel=1e-9
    )


def test_voronoi_errors():
    true = atoms([0.0], [[0.0]], [[0.0]], [0.0], [1.0])
    three = atoms([0.0] * 3, [[0.0]] * 3, [[0.0]] * 3, [0.0] * 3, [1.0] * 3)
    with pytest.raises(ValueError, match="kind must be"):
        voronoi_loss(true, true, kind="bad")
    with pytest.raises(ValueError, match="no exponent for m=3"):
        voronoi_loss(three, true, kind="over", rbar={2: 4})
    other = GaussianMoE([0.0], [[0.0, 0.0]], [[0.0, 0.0]], [0.0], [1.0], 1)
    with pytest.raises(ValueError, match="features"):
        voronoi_cells(other, true)
    with pytest.raises(ValueError, match="X must have shape"):
        hellinger(true, true, np.zeros((3, 2)))


def test_voronoi_loss_is_zero_for_a_relabelled_truth():
    true = GaussianMoE(
        [0.5, -0.5, 0.0],
        [[1.0, 2.0], [-1.0, 0.5], [0.0, 0.0]],
        [[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]],
        [0.0, 1.0, 2.0],
        [0.1, 0.2, 0.3],
        2,
    )
    order = [2, 0, 1]  # the constructor re-anchors the gate on the new last atom
    relabelled = GaussianMoE(
        true.beta0[order], true.beta1[order], true.a[order], true.b[order], true.var[order], 2
    )
    assert relabelled.beta1[-1].tolist() == [0.0, 0.0] and relabelled.beta1[0].tolist() != [
        0.0,
        0.0,
    ]
    assert voronoi_loss(relabelled, true) == pytest.approx(0.0, abs=1e-12)
    assert [c.tolist() for c in voronoi_cells(relabelled, true)] == [[1], [2], [0]]
