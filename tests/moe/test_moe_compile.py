"""torch.compile of SparseMoE (inductor on CPU): one graph for dropless routers, eager's numbers."""

import pytest
import torch
import torch._dynamo
import torch._functorch.config
import torch._inductor.config

from gatelab.moe import SparseMoE

D, H, E = 16, 8, 4  # H = 8 float32 = 32-byte rows: the float32 grouped_mm path is taken


def _outputs_and_grads(module, x, g):
    y = module(x)
    stats = module.last_stats if hasattr(module, "last_stats") else module._orig_mod.last_stats
    loss = (y * g).sum() + stats.aux_loss
    params = [p for p in module.parameters()]
    return [y, stats.aux_loss, *torch.autograd.grad(loss, [x, *params])]


@pytest.mark.parametrize(
    ("router", "dtype"), [("softmax", torch.float32), ("sigmoid", torch.float64)]
)
def test_compiled_layer_is_one_graph_with_eager_outputs_and_gradients(router, dtype, monkeypatch):
    import gatelab.moe.experts as experts

    if dtype == torch.float64:  # float64 takes the loop kernel: make it run 7-row chunks
        monkeypatch.setattr(experts, "_CPU_CHUNK_BYTES", 7 * D * 8)
        # the on-disk caches key on the graph, not on this constant: compile afresh
        monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
        monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    torch._dynamo.reset()
    torch.manual_seed(0)
    moe = SparseMoE(D, H, E, top_k=2, router=router, dtype=dtype)
    compiled = torch.compile(moe, fullgraph=True)  # fullgraph: any graph break is an error
    x = torch.randn(3, 10, D, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 10, D, dtype=dtype)
    eager = _outputs_and_grads(moe, x, g)
    fast = _outputs_and_grads(compiled, x, g)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {}
    for a, b in zip(fast, eager, strict=True):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(
        compiled._orig_mod.last_stats.tokens_per_expert.sum(), torch.tensor(60)
    )


@pytest.mark.parametrize(
    ("kwargs", "breaks"),
    [
        (dict(router="softmax"), 0),
        (dict(router="sigmoid"), 0),
        (dict(router="noisy"), 0),
        # host syncs: the capacity's dropped count and the boolean mask of kept rows
        (dict(router="softmax", capacity_factor=1.0), None),
        (dict(router="expert_choice"), None),  # the fraction of tokens no expert took
    ],
)
def test_graph_breaks_are_counted(kwargs, breaks):
    torch._dynamo.reset()
    torch.manual_seed(0)
    moe = SparseMoE(D, H, E, top_k=2, **kwargs)
    explanation = torch._dynamo.explain(moe)(torch.randn(20, D))
    if breaks is None:
        assert explanation.graph_break_count >= 1
    else:
        assert explanation.graph_break_count == breaks
