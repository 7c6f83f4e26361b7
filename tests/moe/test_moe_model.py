import math

import pytest
import torch
from moe_reference import reference_forward

from gatelab import gates
from gatelab.moe import SparseMoE, dispatch_topk

D, H, E = 8, 6, 5

CASES = {
    "softmax-k2": dict(top_k=2),
    "softmax-k1": dict(top_k=1),
    "softmax-kE": dict(top_k=E),
    "softmax-bias": dict(top_k=2, router_bias=True),
    "softmax-drop": dict(top_k=2, capacity_factor=0.6),
    "softmax-k1-drop": dict(top_k=1, capacity_factor=1.0),
    "softmax-roomy": dict(top_k=3, capacity_factor=4.0),
    "gelu-shared-drop": dict(top_k=2, activation="gelu", n_shared_experts=2, capacity_factor=0.8),
    "swiglu-shared": dict(top_k=2, n_shared_experts=1),
    "noisy": dict(top_k=2, router="noisy"),
    "noisy-drop": dict(top_k=3, router="noisy", capacity_factor=0.7),
    "sigmoid": dict(top_k=3, router="sigmoid"),
    "sigmoid-drop": dict(top_k=2, router="sigmoid", capacity_factor=0.5),
    "expert-choice": dict(top_k=2, router="expert_choice"),
    "expert-choice-cf": dict(top_k=1, router="expert_choice", capacity_factor=2.5),
    "loop-drop": dict(top_k=2, capacity_factor=0.9, backend="loop"),
    "loop": dict(top_k=2, n_shared_experts=1, backend="loop"),
}


def _make(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    moe = SparseMoE(D, H, E, dtype=dtype, **kw)
    with torch.no_grad():  # non-zero bias / noise weights so they matter
        for p in (moe.router.bias, moe.router.noise_weight):
            if p is not None:
                p.normal_(0, 0.5)
    return moe


def _grads(module, x, y, stats, g):
    loss = (y * g).sum() + 0.3 * stats[0] + 0.2 * stats[1]
    params = [p for p in module.parameters()] + [x]
    return torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("training", [True, False])
def test_fast_path_matches_reference_loop(case, training):
    moe = _make(**CASES[case]).train(training)
    x = torch.randn(3, 9, D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 9, D, dtype=torch.float64)
    torch.manual_seed(11)  # the noisy router draws from the global RNG: same draws for both
    y = moe(x)
    st = moe.last_stats
    torch.manual_seed(11)
    y_ref, bal, z, tokens, dropped = reference_forward(moe, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st.balance_loss, bal, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(st.z_loss, z)
    assert torch.equal(st.tokens_per_expert.cpu(), tokens)
    assert st.dropped_fraction == pytest.approx(dropped)
    fast = _grads(moe, x, y, (st.balance_loss, st.z_loss), g)
    ref = _grads(moe, x, y_ref, (bal, z), g)
    for a, b in zip(fast, ref, strict=True):
        if a is None or b is None:
            assert a is None or float(a.abs().max()) == 0
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_dense_gates_are_the_gates_module_weights(router):
    moe = _make(top_k=2, router=router, router_bias=router == "softmax")
    x = torch.randn(20, D, dtype=torch.float64)
    logits = x @ moe.router.weight.T
    plan, dense, _ = moe.route(x, logits)
    if router == "softmax":
        w, i = gates.topk_softmax(logits, 2, moe.router.bias)
    else:
        w, i = gates.sigmoid_topk(logits, 2)
    expected = dispatch_topk(i, E)
    assert torch.equal(plan.token_index, expected.token_index)
    torch.testing.assert_close(dense.gather(-1, i), w, rtol=1e-12, atol=1e-15)
    assert int((dense != 0).sum()) == 20 * 2


def test_grouped_mm_float32_matches_reference():
    torch.manual_seed(0)  # grouped_mm needs rows that are multiples of 16 bytes: H = 8 float32
    moe = SparseMoE(D, 8, E, top_k=2, capacity_factor=0.8, backend="grouped_mm")
    x = torch.randn(4, 16, D, requires_grad=True)
    y = moe(x)
    y_ref = reference_forward(moe, x)[0]
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    y.sum().backward()  # an expanded (stride-0) gradient must work
    gx = x.grad.clone()
    x.grad = None
    y_ref.sum().backward()
    torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=1e-4)


def test_gradcheck_finite_differences():
    moe = _make(top_k=2, capacity_factor=0.8, n_shared_experts=1)
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    w = moe.w_down
    assert torch.autograd.gradcheck(lambda x, w: _with(moe, w, x), (x, w), fast_mode=True)


def _with(moe, w_down, x):
    saved = moe.w_down
    del moe.w_down
    moe.w_down = w_down
    try:
        return moe(x)
    finally:
        moe.w_down = saved


def test_capacity_is_respected_and_drop_order_is_choice_major():
    indices = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 2]])  # (N=4, K=2)
    plan = dispatch_topk(indices, 3, capacity=2)
    # expert 0: first choices of tokens 0, 1, 3 -> keeps 0, 1; expert 1: first choice of 2, then
    # second choices of 0, 1 -> keeps 2, 0
    assert plan.counts.tolist() == [2, 2, 1]
    assert plan.token_index.tolist() == [0, 1, 2, 0, 3]
    assert plan.n_dropped == 3


@pytest.mark.parametrize("router", ["softmax", "sigmoid", "expert_choice"])
def test_shapes_including_batch_one(router):
    moe = _make(top_k=2, router=router, dtype=torch.float32)
    for shape in [(1, D), (1, 1, D), (2, 3, 4, D)]:
        y = moe(torch.randn(shape))
        assert y.shape == shape and torch.isfinite(y).all()
    st = moe.last_stats
    assert 0 <= st.dropped_fraction <= 1
    expected = E * math.ceil(24 * 2 / E) if router == "expert_choice" else 24 * 2
    assert int(st.tokens_per_expert.sum()) == expected


def test_top_k_equal_n_experts_is_dense_softmax():
    moe = _make(top_k=E)
    x = torch.randn(7, D, dtype=torch.float64)
    probs = torch.softmax(x @ moe.router.weight.T, -1)
    dense = sum(
        probs[:, e, None]
        * (torch.nn.functional.silu(x @ moe.w_gate[e]) * (x @ moe.w_up[e]))
        @ moe.w_down[e]
        for e in range(E)
    )
    torch.testing.assert_close(moe(x), dense)


def test_same_seed_same_output_and_stats():
    x = torch.randn(6, D)
    a, b = _make(seed=3, top_k=2, router="noisy"), _make(seed=3, top_k=2, router="noisy")
    torch.manual_seed(5)
    ya = a(x.double())
    torch.manual_seed(5)
    yb = b(x.double())
    assert torch.equal(ya, yb)
    assert torch.equal(a.last_stats.tokens_per_expert, b.last_stats.tokens_per_expert)
    assert not torch.equal(ya, _make(seed=4, top_k=2)(x.double()))


def test_balance_loss_is_one_when_uniform():
    moe = _make(top_k=1)
    with torch.no_grad():
        moe.router.weight.zero_()
    x = torch.randn(10, D, dtype=torch.float64)
    moe(x)  # all logits tie -> every token picks expert 0; P uniform -> loss = E * 1 * 1/E = 1
    assert moe.last_stats.balance_loss.item() == pytest.approx(1.0)
    assert moe.last_stats.tokens_per_expert.tolist() == [10, 0, 0, 0, 0]
    assert moe.last_stats.aux_loss.item() == pytest.approx(
        moe.balance_coef * 1.0 + moe.z_coef * math.log(E) ** 2
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(top_k=6), "top_k must be in"),
        (dict(top_k=0), "top_k must be in"),
        (dict(top_k=2, capacity_factor=0), "capacity_factor"),
        (dict(top_k=2, capacity_factor=-1.0), "capacity_factor"),
        (dict(top_k=2, router="hash"), "router must be"),
        (dict(top_k=2, activation="relu"), "activation"),
        (dict(top_k=E, router="noisy"), "noisy router"),
        (dict(top_k=2, router="sigmoid", router_bias=True), "router_bias"),
        (dict(top_k=2, backend="cuda"), "backend"),
    ],
)
def test_bad_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseMoE(D, H, E, **kwargs)


def test_wrong_input_width_raises():
    moe = _make(top_k=2)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., D=8\)"):
        moe(torch.randn(3, D + 1, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grouped_mm_rejects_unsupported_dtype_or_width_with_a_hint(dtype):
    moe = _make(top_k=2, backend="grouped_mm", dtype=dtype)  # float64, or H = 6 floats = 24 bytes
    with pytest.raises(ValueError, match="use 'loop'"):
        moe(torch.randn(3, D, dtype=dtype))


def test_repr_lists_hyper_parameters():
    text = repr(_make(top_k=2, capacity_factor=1.25))
    assert "n_experts=5" in text and "capacity_factor=1.25" in text


@pytest.mark.parametrize(
    "case", ["softmax-k2", "softmax-drop", "gelu-shared-drop", "expert-choice"]
)
def test_row_chunks_straddling_experts_match_the_reference(case, monkeypatch):
    import gatelab.moe.experts as experts

    # 5 rows per chunk (5 * H=6 * 8 bytes): experts straddle chunks, some chunks hold several
    monkeypatch.setattr(experts, "_CPU_CHUNK_BYTES", 5 * 8 * 8)
    moe = _make(**CASES[case])
    x = torch.randn(3, 9, D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 9, D, dtype=torch.float64)
    y = moe(x)
    st = moe.last_stats
    y_ref, bal, z, _, _ = reference_forward(moe, x)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    fast = _grads(moe, x, y, (st.balance_loss, st.z_loss), g)
    ref = _grads(moe, x, y_ref, (bal, z), g)
    for a, b in zip(fast, ref, strict=True):
        if a is not None and b is not None:
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("n_experts", [4, 8, 16, 24])
def test_expert_softmax_equals_the_softmax_along_the_last_dim(n_experts):
    from gatelab.moe.model import _expert_softmax

    logits = torch.randn(
        37, n_experts, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    logits.requires_grad_()
    y = _expert_softmax(logits)
    ref = torch.exp(logits - torch.logsumexp(logits, -1, keepdim=True))  # the closed form
    torch.testing.assert_close(y, ref, rtol=1e-13, atol=1e-15)
    upstream = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, logits, upstream)
    (grad_ref,) = torch.autograd.grad(ref, logits, upstream)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-14)


def test_backward_fills_no_zero_gradient_for_the_saved_activations():
    # the expert op returns its saved activations as outputs; autograd would otherwise hand its
    # backward a zero tensor for each (940 MB per step at 16384 tokens, top-4, H = 1024)
    moe = SparseMoE(4, 3, n_experts=3, top_k=2, dtype=torch.float64)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    saved_shapes = ([12, 4], [12, 3])  # (N K, D) gathered rows, (N K, H) hidden activations
    with torch.profiler.profile(record_shapes=True) as prof:
        moe(x).sum().backward()
    fills = [e.input_shapes[0] for e in prof.events() if e.name in ("aten::fill_", "aten::zero_")]
    assert fills and not [s for s in fills if list(s) in saved_shapes], fills
