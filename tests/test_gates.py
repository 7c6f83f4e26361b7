"""The shared gates against naive loops, closed forms, Monte Carlo and finite differences."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch.testing import assert_close

from gatelab import gates


@pytest.fixture(autouse=True)
def _float64():
    """Maths checks in float64; restored afterwards so other test modules are unaffected."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


finite = st.floats(-20, 20, allow_nan=False, width=64)


def naive_topk_softmax(logits, k, bias):
    """One row at a time, in plain Python: the paper's Eq. (1) read literally."""
    weights, indices = [], []
    for row, b in zip(logits.tolist(), bias.tolist(), strict=True):
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]
        z = [math.exp(row[i] + b[i]) for i in order]
        weights.append([v / sum(z) for v in z])
        indices.append(order)
    return torch.tensor(weights), torch.tensor(indices)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_topk_softmax_matches_naive_loop(k):
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(7, 5, generator=g)
    bias = torch.randn(5, generator=g)
    weights, indices = gates.topk_softmax(logits, k, bias)
    ref_w, ref_i = naive_topk_softmax(logits, k, bias.expand(7, 5))
    assert_close(weights, ref_w)
    assert torch.equal(indices, ref_i)


def test_bias_enters_after_selection():
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    bias = torch.tensor([0.0, 0.0, 5.0])  # would win if added before selection
    weights, indices = gates.topk_softmax(logits, 2, bias)
    assert indices.tolist() == [[0, 1]]
    assert_close(weights, torch.softmax(torch.tensor([[1.0, 0.9]]), -1))


def test_ties_go_to_lower_index():
    _, indices = gates.topk_softmax(torch.zeros(2, 6), 3)
    assert indices.tolist() == [[0, 1, 2]] * 2


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.int64, (4, 6), elements=st.integers(-50, 50)), st.integers(1, 6), st.integers(-9, 9)
)
def test_topk_properties(values, k, shift):
    # integer-valued logits keep the shift exact in floating point (ties included)
    logits = torch.from_numpy(values).double()
    dense = gates.topk_softmax_dense(logits, k)
    assert_close(dense.sum(-1), torch.ones(4))
    assert ((dense > 0).sum(-1) == k).all()
    _, idx = gates.topk_softmax(logits, k)
    _, idx_shift = gates.topk_softmax(logits + shift, k)
    assert torch.equal(idx, idx_shift)


@settings(max_examples=30, deadline=None)
@given(arrays(np.float64, (3, 5), elements=finite), arrays(np.float64, (5,), elements=finite))
def test_k_equals_n_is_softmax(values, bias_values):
    logits, bias = torch.from_numpy(values), torch.from_numpy(bias_values)
    assert_close(gates.topk_softmax_dense(logits, 5, bias), torch.softmax(logits + bias, -1))


def test_topk_softmax_gradcheck():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, generator=g, requires_grad=True)
    bias = torch.randn(6, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, b: gates.topk_softmax(x, 3, b).weights, (logits, bias)
    )


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: gates.topk_softmax(torch.zeros(2, 4), 0), "k must be in"),
        (lambda: gates.topk_softmax(torch.zeros(2, 4), 5), "k must be in"),
        (lambda: gates.topk_softmax(torch.zeros(2, 4), 2, torch.zeros(3)), "bias"),
        (lambda: gates.gumbel_topk(torch.zeros(4), 2, tau=0.0), "tau"),
        (lambda: gates.expert_choice(torch.zeros(4, 3), 5), "capacity"),
        (lambda: gates.sigmoid_topk(torch.zeros(2, 4), 2, torch.zeros(5)), "selection_bias"),
        (lambda: gates.noisy_topk(torch.zeros(2, 4), torch.ones(2, 3), 1), "noise_std"),
        (lambda: gates.first_exit(torch.zeros(2, 3), threshold=1.5), "threshold"),
    ],
)
def test_invalid_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_k_must_be_an_int():
    with pytest.raises(TypeError, match="k must be an int"):
        gates.topk_softmax(torch.zeros(2, 4), 2.0)


def test_noisy_topk_load_matches_monte_carlo():
    """load_i = sum_x P(i in top-k under fresh noise); check against simulated selections."""
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(6, 5, generator=g)
    std = torch.nn.functional.softplus(torch.randn(6, 5, generator=g))
    load = gates.noisy_topk(clean, std, 2, generator=g).load
    # Shazeer's estimate holds the other experts' noise fixed; averaging it over that noise gives
    # the exact inclusion probability, which simulation estimates.
    draws = 4000
    out = gates.noisy_topk(clean.repeat(draws, 1), std.repeat(draws, 1), 2, generator=g)
    estimate = out.load / draws
    frequency = torch.bincount(out.indices.reshape(-1), minlength=5) / draws
    assert_close(estimate, frequency, atol=0.08, rtol=0.0)
    assert load.shape == (5,)


def test_noisy_topk_eval_is_clean_topk_and_load_has_gradient():
    g = torch.Generator().manual_seed(2)
    clean = torch.randn(4, 6, generator=g, requires_grad=True)
    std = torch.ones(4, 6)
    out = gates.noisy_topk(clean, std, 2, training=False)
    ref = gates.topk_softmax(clean, 2)
    assert torch.equal(out.indices, ref.indices)
    assert out.load.sum() == 8
    train = gates.noisy_topk(clean, std, 2, generator=g)
    train.load.sum().backward()
    assert clean.grad is not None and clean.grad.abs().sum() > 0


def test_sigmoid_topk_naive_and_bias_only_selects():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    weights, indices = gates.sigmoid_topk(logits, 2)
    s = torch.sigmoid(logits[0])
    assert indices.tolist() == [[0, 1]]
    assert_close(weights[0], s[:2] / s[:2].sum())
    weights_b, indices_b = gates.sigmoid_topk(logits, 2, torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert indices_b.tolist() == [[3, 0]]
    assert_close(weights_b[0], torch.stack([s[3], s[0]]) / (s[3] + s[0]))


def test_expert_choice_takes_top_tokens_per_expert():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(10, 3, generator=g)
    weights, tokens = gates.expert_choice(logits, 4)
    affinity = torch.softmax(logits, -1)
    for e in range(3):
        expected = sorted(range(10), key=lambda t: -affinity[t, e].item())[:4]
        assert tokens[e].tolist() == expected
        assert_close(weights[e], affinity[expected, e])


def test_gumbel_topk_is_k_hot_straight_through_and_seeded():
    logits = torch.randn(8, 6, generator=torch.Generator().manual_seed(4), requires_grad=True)
    sample = gates.gumbel_topk(logits, 3, tau=0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(sample.detach().sum(-1), torch.full((8,), 3.0))
    assert set(sample.detach().unique().tolist()) <= {0.0, 1.0}
    (sample * torch.arange(6.0)).sum().backward()
    assert logits.grad.abs().sum() > 0
    again = gates.gumbel_topk(logits, 3, tau=0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(sample, again)
    soft = gates.gumbel_topk(logits, 3, tau=0.5, hard=False, generator=torch.Generator())
    assert_close(soft.sum(-1), torch.full((8,), 3.0), atol=1e-4, rtol=0)


def test_gumbel_top1_samples_the_softmax():
    """Gumbel-max theorem: argmax(logits + G) ~ Categorical(softmax(logits))."""
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    draws = gates.gumbel_topk(
        logits.expand(20000, 4), 1, generator=torch.Generator().manual_seed(6)
    )
    assert_close(draws.mean(0), torch.softmax(logits, -1), atol=0.015, rtol=0)


def test_exit_probabilities_closed_form_and_gradcheck():
    g = torch.tensor([0.2, 0.5, 0.25])
    expected = torch.tensor([0.2, 0.8 * 0.5, 0.8 * 0.5 * 0.25, 0.8 * 0.5 * 0.75])
    assert_close(gates.exit_probabilities(g), expected)
    x = torch.rand(4, 5, generator=torch.Generator().manual_seed(7), requires_grad=True)
    assert torch.autograd.gradcheck(gates.exit_probabilities, (x,))


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, (3, 4), elements=st.floats(0, 1, width=64)))
def test_exit_probabilities_sum_to_one(values):
    probs = gates.exit_probabilities(torch.from_numpy(values))
    assert_close(probs.sum(-1), torch.ones(3))
    assert (probs >= 0).all()


def test_first_exit():
    g = torch.tensor([[0.1, 0.6, 0.9], [0.7, 0.0, 0.0], [0.1, 0.2, 0.3]])
    assert gates.first_exit(g).tolist() == [1, 0, 3]
    assert gates.first_exit(g, threshold=0.25).tolist() == [1, 0, 2]


def test_load_balancing_loss_values():
    uniform = torch.full((8, 4), 0.25)
    balanced = torch.arange(8).remainder(4).unsqueeze(1)
    assert_close(gates.load_balancing_loss(uniform, balanced, 4), torch.tensor(1.0))
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
    chosen = torch.tensor([[0], [0]])
    # f = (1, 0), P = (0.65, 0.35): loss = 2 * 0.65
    assert_close(gates.load_balancing_loss(probs, chosen, 2), torch.tensor(1.3))


def test_router_z_loss_value():
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    expected = (math.log(2) ** 2 + (1 + math.log(2)) ** 2) / 2
    assert_close(gates.router_z_loss(logits), torch.tensor(expected))


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not 0 <= v <= 1),
        st.just(float("nan")),
    ),
    st.integers(0, 3),
)
def test_exit_probabilities_refuses_values_outside_unit_interval(bad, position):
    values = torch.full((2, 4), 0.5)
    values[1, position] = bad
    with pytest.raises(ValueError, match="gates must lie in"):
        gates.exit_probabilities(values)


def test_exit_probabilities_refuses_bad_shapes_and_dtypes():
    with pytest.raises(ValueError, match="gates must have shape"):
        gates.exit_probabilities(torch.zeros(3, 0))
    with pytest.raises(ValueError, match="gates must have shape"):
        gates.exit_probabilities(torch.tensor(0.5))
    with pytest.raises(TypeError, match="gates must be a floating-point tensor"):
        gates.exit_probabilities(torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="gates must be a floating-point tensor"):
        gates.exit_probabilities([0.5, 0.5])
