import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gatelab.moe import ExpertParallelMoE, SparseMoE

D, H, E, N = 8, 6, 4, 24  # N tokens in the whole batch, split evenly over the ranks
CONFIGS = [  # router, shared experts, capacity factor (drops happen with cf < 1 here)
    ("softmax", 1, None),
    ("sigmoid", 0, None),
    ("softmax", 0, 0.6),
    ("sigmoid", 1, 0.8),
    ("expert_choice", 0, None),
    ("expert_choice", 0, 0.4),  # 4 experts x 5 tokens < 24 tokens: some are left out
]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        groups = {w: dist.new_group(list(range(w))) for w in (1, 2, 4)}  # every rank joins all
        for w, group in groups.items():
            if rank < w:
                for config in CONFIGS:
                    _check(group, w, *config)
    finally:
        dist.destroy_process_group()


def _check(group, world, router, n_shared, capacity_factor):
    rank = dist.get_rank(group)
    torch.manual_seed(0)
    full = SparseMoE(
        D, H, E, top_k=2, router=router, n_shared_experts=n_shared,
        capacity_factor=capacity_factor, dtype=torch.float64,
    ).eval()  # fmt: skip
    ep = ExpertParallelMoE.from_dense(full, group=group)
    torch.manual_seed(1)
    x_all = torch.randn(N, D, dtype=torch.float64)
    g_all = torch.randn(N, D, dtype=torch.float64)
    x_all[:5] *= 3  # uneven load: ranks send different amounts, some experts overflow
    mine = slice(rank * N // world, (rank + 1) * N // world)
    x = x_all[mine].clone().requires_grad_()
    y = ep(x)
    (y * g_all[mine]).sum().backward()
    xf = x_all.clone().requires_grad_()
    yf = full(xf)
    (yf * g_all).sum().backward()
    if capacity_factor is not None:
        assert full.last_stats.dropped_fraction > 0, "the test needs drops"
    torch.testing.assert_close(y, yf[mine], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(x.grad, xf.grad[mine], atol=1e-12, rtol=1e-10)
    lo = rank * (E // world)
    for name, p in ep.named_parameters():
        grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        if name.startswith("w_"):  # local experts: gradient over all ranks' tokens
            expected = full.get_parameter(name).grad[lo : lo + E // world]
        else:  # replicated parameters: per-rank partial sums add up to the full gradient
            dist.all_reduce(grad, group=group)
            expected = full.get_parameter(name).grad
        torch.testing.assert_close(grad, expected, atol=1e-12, rtol=1e-10)


def test_one_two_and_four_ranks_equal_the_single_process_layer_with_drops():
    mp.spawn(_worker, args=(4, _free_port()), nprocs=4, join=True)


def test_requires_an_initialised_process_group():
    with pytest.raises(ValueError, match="init_process_group"):
        ExpertParallelMoE(D, H, E, top_k=2)
