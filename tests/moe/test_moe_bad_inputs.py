"""``SparseMoE`` refuses bad construction and bad input with an error naming the argument.

Hypothesis draws a valid layer (router, activation, sizes) and corrupts one constructor argument,
or draws a valid input and corrupts it (not a tensor, a wrong last dimension or rank, an integer,
boolean, complex or other-precision dtype, another device, a NaN or infinity at a random
position): 300 derandomised bad calls each. An empty batch is not an error: it gives an empty
output and zero (not NaN) auxiliary losses, checked against ``nn.Linear``'s behaviour on the
same batch.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatelab.moe.model import ROUTERS, SparseMoE

BAD = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
NOT_AN_INT = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=2))
NOT_A_NUMBER = st.one_of(st.none(), st.booleans(), st.text(max_size=2), st.just([0.5]))
NON_FINITE = st.sampled_from([float("nan"), float("inf"), float("-inf")])


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_refused(function, culprit: str) -> None:
    with pytest.raises((ValueError, TypeError), match=rf"(^|\W){re.escape(culprit)}\W"):
        function()


@st.composite
def layer_args(draw) -> dict:
    """A valid constructor call (small sizes)."""
    router = draw(st.sampled_from(ROUTERS))
    n_experts = draw(st.integers(2, 5))
    top_k = draw(st.integers(1, n_experts - 1 if router == "noisy" else n_experts))
    return {
        "d_model": draw(st.integers(1, 6)),
        "d_hidden": draw(st.integers(1, 6)),
        "n_experts": n_experts,
        "top_k": top_k,
        "router": router,
        "activation": draw(st.sampled_from(["swiglu", "gelu"])),
        "capacity_factor": draw(st.one_of(st.none(), st.floats(0.5, 2.0))),
        "n_shared_experts": draw(st.integers(0, 2)),
        "balance_coef": draw(st.floats(0, 0.1)),
        "z_coef": draw(st.floats(0, 0.01)),
    }


def bad_constructor_values(valid: dict) -> dict[str, st.SearchStrategy]:
    e = valid["n_experts"]
    positive = st.one_of(st.integers(-3, 0), NOT_AN_INT)
    return {
        "d_model": positive,
        "d_hidden": positive,
        "n_experts": positive,
        "top_k": st.one_of(st.integers(-3, 0), st.integers(e + 1, e + 4), NOT_AN_INT),
        "router": st.one_of(st.sampled_from(["top2", "", "Softmax"]), st.none(), st.integers()),
        "activation": st.one_of(st.sampled_from(["relu", "SwiGLU", ""]), st.none()),
        "capacity_factor": st.one_of(
            st.floats(max_value=0), NON_FINITE, st.text(max_size=2), st.booleans()
        ),
        "n_shared_experts": st.one_of(st.integers(-4, -1), NOT_AN_INT.filter(lambda v: v != 0)),
        "balance_coef": st.one_of(st.floats(max_value=-1e-9), NON_FINITE, NOT_A_NUMBER),
        "z_coef": st.one_of(st.floats(max_value=-1e-9), NON_FINITE, NOT_A_NUMBER),
        "backend": st.one_of(st.sampled_from(["cuda", "triton", ""]), st.none()),
        "dtype": st.sampled_from([torch.int64, torch.bool, torch.complex64, "float32", 32]),
    }


@st.composite
def constructor_cases(draw):
    valid = draw(layer_args())
    bad = bad_constructor_values(valid)
    name = draw(st.sampled_from(sorted(bad)))
    return valid | {name: draw(bad[name])}, name


@BAD
@given(constructor_cases())
def test_constructor(case):
    kwargs, culprit = case
    assert_refused(lambda: SparseMoE(**kwargs), culprit)


@st.composite
def input_cases(draw):
    args = draw(layer_args())
    moe = SparseMoE(**args, dtype=torch.float64)
    d = args["d_model"]
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    seed = draw(st.integers(0, 2**16))
    x = torch.randn((*lead, d), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    poisoned = x.clone()
    poisoned.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(NON_FINITE)
    bad = st.one_of(
        st.none(),
        st.just(x.tolist()),
        st.just(x.numpy()),
        st.just(torch.tensor(1.0, dtype=torch.float64)),
        st.sampled_from([(*lead, d + 1), (*lead, d + 2)]).map(
            lambda s: torch.zeros(s, dtype=torch.float64)
        ),
        st.sampled_from([torch.int64, torch.bool, torch.complex128, torch.float32]).map(x.to),
        st.just(x.to("meta")),
        st.just(poisoned),
    )
    return moe, draw(bad)


@BAD
@given(input_cases())
def test_forward(case):
    moe, x = case
    assert_refused(lambda: moe(x), "x")


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_empty_batch_is_empty_output_with_zero_losses(router, lead):
    """As ``nn.Linear`` does, an empty batch maps to an empty batch of the output width."""
    moe = SparseMoE(4, 6, 3, 2, router=router, dtype=torch.float64)
    x = torch.zeros((*lead, 4), dtype=torch.float64)
    out = moe(x)
    assert out.shape == torch.nn.Linear(4, 4, dtype=torch.float64)(x).shape
    stats = moe.last_stats
    for loss in (stats.aux_loss, stats.balance_loss, stats.z_loss):
        assert float(loss) == 0.0
    assert stats.tokens_per_expert.tolist() == [0, 0, 0]
