"""Cost records, Pareto fronts and trade-off areas against hand-computed cases."""

import pytest
import torch

from gatelab import cost
from gatelab.cost import Cost


def test_cost_adds_fieldwise_with_absent_fields():
    total = Cost(flops=2.0, seconds=0.5) + Cost(seconds=0.25, joules=3.0)
    assert total == Cost(flops=2.0, seconds=0.75, joules=3.0, messages=None)
    assert sum([Cost(messages=1), Cost(messages=2), Cost(messages=3)]) == Cost(messages=6)
    assert Cost(joules=2.0) * 3 == Cost(joules=6.0)
    assert 2 * Cost(flops=1.5) == Cost(flops=3.0)


def test_cost_within_budget():
    spent = Cost(seconds=1.0, joules=5.0)
    assert spent.within(Cost(seconds=1.0))
    assert not spent.within(Cost(joules=4.9))
    assert not spent.within(Cost(flops=10))  # untracked field cannot be shown within budget


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_cost_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="Cost.seconds"):
        Cost(seconds=bad)


def test_pareto_front_hand_case():
    points = [(1.0, 0.5), (2.0, 0.4), (2.0, 0.7), (3.0, 0.7), (0.5, 0.1), (4.0, 0.9)]
    assert cost.pareto_front(points).tolist() == [4, 0, 2, 5]


@pytest.mark.parametrize(
    ("points", "cost_range", "expected"),
    [
        ([(0.5, 0.8)], None, 0.8),
        ([(0.0, 0.5), (1.0, 1.0)], None, 0.75),
        # (0.5, 0.6) lies under the chord from (0, .5) to (1, 1): mixing beats it
        ([(0.0, 0.5), (0.5, 0.6), (1.0, 1.0)], None, 0.75),
        # the curve is held flat after its peak: spending more never has to hurt
        ([(0.0, 0.5), (0.5, 1.0), (1.0, 0.8)], None, 0.5 * 0.75 + 0.5 * 1.0),
        # nothing runs below the cheapest point
        ([(0.5, 1.0), (1.0, 1.0)], (0.0, 1.0), 0.5),
        ([(0.0, 0.2), (0.5, 0.6)], (0.0, 1.0), 0.5 * 0.4 + 0.5 * 0.6),
    ],
)
def test_area_under_tradeoff_hand_cases(points, cost_range, expected):
    assert cost.area_under_tradeoff(points, cost_range) == pytest.approx(expected)


def test_area_under_tradeoff_rejects_bad_points():
    with pytest.raises(ValueError, match="points"):
        cost.area_under_tradeoff([(0.0, float("nan"))])
    with pytest.raises(ValueError, match="points"):
        cost.area_under_tradeoff([1.0, 2.0])
    with pytest.raises(ValueError, match="cost_range"):
        cost.area_under_tradeoff([(0.0, 1.0)], (1.0, 0.0))


def test_count_flops_of_a_linear_layer():
    layer = torch.nn.Linear(16, 32, bias=False)
    x = torch.randn(4, 10, 16)
    assert cost.count_flops(layer, x) == 2 * 4 * 10 * 16 * 32


def test_count_flops_includes_attention():
    q = torch.randn(2, 3, 7, 8)  # (B, heads, T, head_dim)
    flops = cost.count_flops(torch.nn.functional.scaled_dot_product_attention, q, q, q)
    assert flops == 2 * (2 * 2 * 3 * 7 * 7 * 8)  # QK^T and AV


def test_plot_tradeoff_writes_png(tmp_path):
    path = cost.plot_tradeoff(
        {"a": [(0.1, 0.5), (0.5, 0.8)], "b": [(0.2, 0.6)]},
        tmp_path / "sub" / "t.png",
        hull=True,
        logx=True,
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flop_counter_mode_counts_attention_backward():
    q = torch.randn(2, 3, 7, 8, requires_grad=True)
    with cost.flop_counter_mode() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    matmul = 2 * 2 * 3 * 7 * 7 * 8  # one (B, heads, T, T) x head_dim product
    # forward: QK^T, AV; flash backward: recompute QK^T, then dV, dP, dQ, dK
    assert counter.get_total_flops() == (2 + 5) * matmul
