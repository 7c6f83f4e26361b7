import numpy as np
import pytest

from gatelab.gmoe import GaussianMoE
from gatelab.gmoe.select import merge_experts, select_n_experts


def test_bic_recovers_k_star():
    true = GaussianMoE(
        [-8.0, 0.0], [[25.0], [0.0]], [[-20.0], [20.0]], [15.0, -5.0], [0.09, 0.16], 2
    )
    rng = np.random.default_rng(0)
    X = rng.uniform(0, 1, size=(800, 1))
    y = true.sample(X, rng)
    result = select_n_experts(X, y, [1, 2, 3], n_init=2, random_state=0)
    assert result.n_experts == 2
    assert result.bic[2] < result.bic[1] and result.bic[2] < result.bic[3]
    assert result.estimator.params_.n_experts == 2


def test_merge_experts_by_hand():
    # atoms 0 and 1 are copies of one expert with gate masses 1 and 3; atom 2 is the anchor
    m = GaussianMoE(
        [0.0, np.log(3.0), 0.0],
        [[1.0], [2.0], [0.0]],
        [[1.0], [1.2], [-1.0]],
        [0.0, 0.4, 1.0],
        [1.0, 1.4, 2.0],
        3,
    )
    merged = merge_experts(m, tol=0.5)
    assert merged.n_experts == 2 and merged.top_k == 2
    np.testing.assert_allclose(merged.beta0, [np.log(4.0), 0.0])
    np.testing.assert_allclose(merged.beta1[:, 0], [0.25 * 1 + 0.75 * 2, 0.0])
    np.testing.assert_allclose(merged.a[:, 0], [0.25 * 1 + 0.75 * 1.2, -1.0])
    np.testing.assert_allclose(merged.b, [0.3, 1.0])
    np.testing.assert_allclose(merged.var, [0.25 + 0.75 * 1.4, 2.0])
    assert merge_experts(m, tol=0.01).n_experts == 3  # nothing that close
    assert merge_experts(m, tol=0.5, compare=("beta1", "a", "b", "var")).n_experts == 3


def test_merge_errors():
    m = GaussianMoE([0.0, 0.0], [[0.0], [0.0]], [[0.0], [0.0]], [0.0, 0.0], [1.0, 1.0], 2)
    with pytest.raises(ValueError, match="tol must be"):
        merge_experts(m, tol=-1)
    with pytest.raises(ValueError, match="compare must name"):
        merge_experts(m, tol=1, compare=("w",))
    with pytest.raises(ValueError, match="candidates"):
        select_n_experts(np.zeros((5, 1)), np.zeros(5), [0])
