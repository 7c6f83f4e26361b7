"""Every public gate refuses bad input with a ValueError/TypeError that names the argument.

For each function, hypothesis draws a valid call, corrupts one argument (a wrong type or dtype,
a bad shape, a NaN or infinity at a random position, an out-of-range integer) and checks the error
names that argument: 300 bad calls per function, derandomised so every run tries the same ones.
"""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatelab import gates

BAD = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


pytestmark = pytest.mark.usefixtures("one_thread")


NOT_A_TENSOR = st.one_of(
    st.none(),
    st.integers(-3, 3),
    st.floats(allow_nan=True),
    st.text(max_size=3),
    st.lists(st.floats(-1, 1), max_size=3),
)
NOT_AN_INT = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=2), st.just(torch.ones(1))
)
NOT_A_NUMBER = st.one_of(st.none(), st.booleans(), st.text(max_size=2), st.just([0.5]))
NON_FINITE = st.sampled_from([float("nan"), float("inf"), float("-inf")])


@functools.cache  # strategies built once: hypothesis checks each new one
def shapes(min_dims: int = 1, max_dims: int = 3, min_side: int = 1) -> st.SearchStrategy:
    """Small shapes ``(..., E)`` with every side in ``[min_side, 4]``."""
    return st.lists(st.integers(min_side, 4), min_size=min_dims, max_size=max_dims).map(tuple)


@st.composite
def tensors(draw, shape: tuple[int, ...], low: float = -3.0, high: float = 3.0) -> torch.Tensor:
    """A float64 tensor of ``shape`` with values in ``[low, high]`` (seeded by hypothesis)."""
    seed = draw(st.integers(0, 2**16))
    uniform = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return low + (high - low) * uniform


@st.composite
def with_value(draw, tensor: torch.Tensor, values: st.SearchStrategy) -> torch.Tensor:
    """``tensor`` with one drawn entry replaced by a drawn value."""
    out = tensor.clone()
    out.view(-1)[draw(st.integers(0, out.numel() - 1))] = draw(values)
    return out


@functools.cache
def bad_float_tensor(
    shape: tuple[int, ...],
    *,
    ndim: int | None = None,
    finite: bool = True,
    floating: bool = True,
    optional: bool = False,
) -> st.SearchStrategy:
    """Bad values for a float tensor argument of (valid) ``shape``; ``None`` if not ``optional``."""
    valid = tensors(shape)
    wrong_dtypes = [torch.bool, torch.complex64] + ([torch.int64, torch.int32] if floating else [])
    bad_shapes = [(), (*shape[:-1], 0)]
    if ndim is not None:
        bad_shapes += [s for s in ((shape[-1],), (1, 2, shape[-1])) if len(s) != ndim]
    options = [
        NOT_A_TENSOR.filter(lambda v: v is not None) if optional else NOT_A_TENSOR,
        st.sampled_from(wrong_dtypes).map(lambda dtype: torch.zeros(shape).to(dtype)),
        st.sampled_from(bad_shapes).map(torch.zeros),
        valid.flatmap(lambda t: with_value(t, NON_FINITE if finite else st.just(float("nan")))),
    ]
    return st.one_of(options)


@functools.cache
def bad_k(n: int) -> st.SearchStrategy:
    """Bad values for a count in ``[1, n]``: out of range, or not an int at all."""
    return st.one_of(st.integers(-5, 0), st.integers(n + 1, n + 5), NOT_AN_INT)


@functools.cache
def bad_bias(shape: tuple[int, ...]) -> st.SearchStrategy:
    """Bad per-expert biases for logits of ``shape``: wrong width, not broadcastable, NaN/inf."""
    e = shape[-1]
    unbroadcastable = (shape[-2] + 1, e) if len(shape) > 1 else (2, e)
    return st.one_of(
        bad_float_tensor((e,), optional=True),
        st.sampled_from([(e + 1,), (1, e + 2), unbroadcastable]).map(torch.zeros),
    )


@functools.cache
def bad_number(low: float, *, low_open: bool, high: float | None = None) -> st.SearchStrategy:
    """Bad scalars: NaN, infinities, values below ``low`` (or at it if open) or above ``high``."""
    top = low if low_open else low - 1e-9  # -0.0 == 0.0: stay clear of the bound when it is valid
    options = [NOT_A_NUMBER, NON_FINITE, st.floats(max_value=top, allow_infinity=False)]
    if high is not None:
        options.append(st.floats(min_value=high + 1e-9, allow_infinity=False))
    return st.one_of(options)


@functools.cache
def bad_generator() -> st.SearchStrategy:
    return st.one_of(st.integers(0, 9), st.text(max_size=2), st.just(torch.zeros(1)))


@st.composite
def corrupt(draw, valid: dict, bad: dict) -> tuple[dict, str]:
    """``valid`` with one argument (drawn) replaced by one of its bad values; and its name."""
    name = draw(st.sampled_from(sorted(bad)))
    return valid | {name: draw(bad[name])}, name


def assert_refused(function, kwargs: dict, culprit: str) -> None:
    """``function(**kwargs)`` raises ValueError or TypeError with ``culprit`` in its message."""
    named = rf"(^|\W){re.escape(culprit)}\W"
    with pytest.raises((ValueError, TypeError), match=named):
        function(**kwargs)


# --------------------------------------------------------------------------- the cases


@st.composite
def topk_cases(draw):
    shape = draw(shapes())
    e = shape[-1]
    bias = draw(st.one_of(st.none(), tensors((e,))))
    valid = {"logits": draw(tensors(shape)), "k": draw(st.integers(1, e)), "bias": bias}
    bad = {"logits": bad_float_tensor(shape), "k": bad_k(e), "bias": bad_bias(shape)}
    return draw(corrupt(valid, bad))


@BAD
@given(topk_cases())
def test_topk_softmax(case):
    assert_refused(gates.topk_softmax, *case)


@BAD
@given(topk_cases())
def test_topk_softmax_dense(case):
    assert_refused(gates.topk_softmax_dense, *case)


@BAD
@given(topk_cases())
def test_sigmoid_topk(case):
    kwargs, culprit = case
    kwargs["selection_bias"] = kwargs.pop("bias")
    assert_refused(gates.sigmoid_topk, kwargs, "selection_bias" if culprit == "bias" else culprit)


@st.composite
def select_cases(draw):
    shape = draw(shapes())
    valid = {"scores": draw(tensors(shape)), "k": draw(st.integers(1, shape[-1]))}
    bad = {"scores": bad_float_tensor(shape, finite=False, floating=False), "k": bad_k(shape[-1])}
    return draw(corrupt(valid, bad))


@BAD
@given(select_cases())
def test_select_topk(case):
    assert_refused(gates.select_topk, *case)


@st.composite
def noisy_cases(draw):
    shape = draw(shapes(2, 2, min_side=2))
    n_experts = shape[-1]
    training = draw(st.booleans())
    valid = {
        "clean_logits": draw(tensors(shape)),
        "noise_std": draw(tensors(shape, 0.1, 2.0)),
        "k": draw(st.integers(1, n_experts - 1)),
        "training": training,
        "generator": draw(st.one_of(st.none(), st.just(torch.Generator().manual_seed(0)))),
    }
    bad = {
        "clean_logits": bad_float_tensor(shape, ndim=2),
        "noise_std": st.one_of(
            bad_float_tensor(shape, ndim=2),
            tensors(shape, 0.1, 2.0).flatmap(lambda t: with_value(t, st.floats(-2, 0))),
            st.just(torch.ones(shape[0], n_experts + 1)),
        ),
        "k": st.one_of(bad_k(n_experts), st.just(n_experts) if training else bad_k(n_experts)),
        "training": st.one_of(st.none(), st.integers(0, 1), st.text(max_size=2)),
        "generator": bad_generator(),
    }
    return draw(corrupt(valid, bad))


@BAD
@given(noisy_cases())
def test_noisy_topk(case):
    assert_refused(gates.noisy_topk, *case)


@st.composite
def expert_choice_cases(draw):
    shape = draw(shapes(2, 2))
    valid = {"logits": draw(tensors(shape)), "capacity": draw(st.integers(1, shape[0]))}
    bad_logits = st.one_of(bad_float_tensor(shape, ndim=2), st.just(torch.zeros(0, shape[1])))
    bad = {"logits": bad_logits, "capacity": bad_k(shape[0])}
    return draw(corrupt(valid, bad))


@BAD
@given(expert_choice_cases())
def test_expert_choice(case):
    assert_refused(gates.expert_choice, *case)


@st.composite
def gumbel_cases(draw):
    shape = draw(shapes())
    valid = {
        "logits": draw(tensors(shape)),
        "k": draw(st.integers(1, shape[-1])),
        "tau": draw(st.floats(0.1, 3)),
        "hard": draw(st.booleans()),
        "generator": None,
        "noise": draw(st.floats(0, 1)),
    }
    bad = {
        "logits": bad_float_tensor(shape),
        "k": bad_k(shape[-1]),
        "tau": bad_number(0, low_open=True),
        "hard": st.one_of(st.none(), st.integers(0, 1), st.text(max_size=2)),
        "generator": bad_generator(),
        "noise": bad_number(0, low_open=False),
    }
    return draw(corrupt(valid, bad))


@BAD
@given(gumbel_cases())
def test_gumbel_topk(case):
    assert_refused(gates.gumbel_topk, *case)


@functools.cache
def bad_hazards(shape: tuple[int, ...]) -> st.SearchStrategy:
    outside = st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1 + 1e-9))
    return st.one_of(
        bad_float_tensor(shape, finite=False),
        tensors(shape, 0, 1).flatmap(lambda t: with_value(t, outside)),
    )


@st.composite
def exit_cases(draw):
    shape = draw(shapes())
    return draw(corrupt({"gates": draw(tensors(shape, 0, 1))}, {"gates": bad_hazards(shape)}))


@BAD
@given(exit_cases())
def test_exit_probabilities(case):
    assert_refused(gates.exit_probabilities, *case)


@st.composite
def first_exit_cases(draw):
    shape = draw(shapes())
    valid = {"gates": draw(tensors(shape, 0, 1)), "threshold": draw(st.floats(0, 1))}
    bad = {"gates": bad_hazards(shape), "threshold": bad_number(0, low_open=False, high=1)}
    return draw(corrupt(valid, bad))


@BAD
@given(first_exit_cases())
def test_first_exit(case):
    assert_refused(gates.first_exit, *case)


@st.composite
def balance_cases(draw):
    n, e = draw(shapes(2, 2))
    k = draw(st.integers(1, e))
    seed = draw(st.integers(0, 99))
    indices = torch.randint(0, e, (n, k), generator=torch.Generator().manual_seed(seed))
    valid = {
        "router_probs": torch.softmax(draw(tensors((n, e))), -1),
        "expert_indices": indices,
        "n_experts": e,
    }
    bad = {
        "router_probs": st.one_of(
            bad_float_tensor((n, e), ndim=2),
            st.sampled_from([(0, e), (n, e + 1)]).map(torch.zeros),
            tensors((n, e), 0, 1).flatmap(lambda t: with_value(t, st.floats(-9, -1e-9))),
        ),
        "expert_indices": st.one_of(
            NOT_A_TENSOR,
            st.sampled_from([torch.float32, torch.bool]).map(lambda d: indices.to(d)),
            st.sampled_from([(n + 1, k), (n, 0), (n,), (n, k, 1)]).map(
                lambda s: torch.zeros(s, dtype=torch.long)
            ),
            st.one_of(st.integers(-5, -1), st.integers(e, e + 5)).map(
                lambda v: indices.clone().index_fill_(1, torch.tensor([0]), v)
            ),
        ),
        "n_experts": st.one_of(st.integers(-3, 0), NOT_AN_INT),
    }
    return draw(corrupt(valid, bad))


@BAD
@given(balance_cases())
def test_load_balancing_loss(case):
    assert_refused(gates.load_balancing_loss, *case)


@st.composite
def z_loss_cases(draw):
    shape = draw(shapes())
    bad = st.one_of(bad_float_tensor(shape), st.just(torch.zeros(0, shape[-1])))
    return draw(corrupt({"logits": draw(tensors(shape))}, {"logits": bad}))


@BAD
@given(z_loss_cases())
def test_router_z_loss(case):
    assert_refused(gates.router_z_loss, *case)


@pytest.mark.parametrize(
    "call",
    [
        lambda: gates.topk_softmax(torch.randn(5, 4), 2, torch.randn(4)),
        lambda: gates.topk_softmax_dense(torch.randn(2, 3, 4), 4),
        lambda: gates.select_topk(torch.tensor([[1, 3, 2]]), 2),  # integer scores sort too
        lambda: gates.select_topk(torch.tensor([[float("-inf"), 0.0, float("inf")]]), 1),
        lambda: gates.noisy_topk(torch.randn(3, 4), torch.ones(3, 4), 4, training=False),
        lambda: gates.sigmoid_topk(torch.randn(3, 4), 1, torch.zeros(3, 4)),
        lambda: gates.expert_choice(torch.randn(6, 3), 6),
        lambda: gates.gumbel_topk(torch.randn(4), 4, tau=0.5, noise=0.0),
        lambda: gates.first_exit(torch.tensor([[0.0, 1.0]]), 1.0),
        lambda: gates.load_balancing_loss(torch.full((2, 3), 1 / 3), torch.tensor([[0], [2]]), 3),
        lambda: gates.router_z_loss(torch.zeros(1, 1)),
        lambda: gates.topk_softmax(torch.zeros(0, 4), 2),  # an empty batch is no error
    ],
)
def test_valid_edge_cases_still_pass(call):
    """The checks refuse only what is wrong: boundary values go through."""
    out = call()
    values = (
        out if isinstance(out, torch.Tensor) else torch.cat([t.flatten().double() for t in out])
    )
    assert not torch.isnan(values.double()).any()


def test_validate_false_skips_only_the_value_checks():
    logits = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    indices = gates.select_topk(logits, 2)
    probs = logits.softmax(-1)
    # same results as the checked calls on valid input
    assert torch.equal(gates.select_topk(logits, 2, validate=False), indices)
    assert torch.equal(
        gates.load_balancing_loss(probs, indices, 4, validate=False),
        gates.load_balancing_loss(probs, indices, 4),
    )
    assert torch.equal(gates.router_z_loss(logits, validate=False), gates.router_z_loss(logits))
    # values are not checked...
    bad = logits.clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        gates.router_z_loss(bad)
    assert gates.router_z_loss(bad, validate=False).isnan()
    gates.select_topk(bad, 2, validate=False)
    gates.load_balancing_loss(-probs, indices, 4, validate=False)
    # ...but shapes and types still are
    with pytest.raises(ValueError, match="shape"):
        gates.load_balancing_loss(probs, indices[:3], 4, validate=False)
    with pytest.raises(ValueError, match="k must be in"):
        gates.select_topk(logits, 5, validate=False)
