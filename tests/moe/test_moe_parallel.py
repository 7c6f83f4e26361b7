import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gatelab.moe import ExpertParallelMoE, SparseMoE

D, H, E, N = 8, 6, 4, 10  # N tokens per rank


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, configs):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        for router, n_shared in configs:
            _check(rank, world, router, n_shared)
    finally:
        dist.destroy_process_group()


def _check(rank, world, router, n_shared):
    torch.manual_seed(0)
    full = SparseMoE(D, H, E, top_k=2, router=router, n_shared_experts=n_shared)
    full = full.double().eval()
    ep = ExpertParallelMoE.from_dense(full)
    torch.manual_seed(1)
    x_all = torch.randn(world * N, D, dtype=torch.float64)
    g_all = torch.randn(world * N, D, dtype=torch.float64)
    x_all[:3] *= 3  # same on every rank: uneven load, ranks send different amounts
    mine = slice(rank * N, (rank + 1) * N)
    x = x_all[mine].clone().requires_grad_()
    y = ep(x)
    (y * g_all[mine]).sum().backward()
    xf = x_all.clone().requires_grad_()
    yf = full(xf)
    (yf * g_all).sum().backward()
    torch.testing.assert_close(y, yf[mine], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(x.grad, xf.grad[mine], atol=1e-10, rtol=1e-10)
    lo = rank * (E // world)
    for name, p in ep.named_parameters():
        grad = p.grad.clone()
        if name.startswith("w_"):  # local experts: gradient over all ranks' tokens
            expected = full.get_parameter(name).grad[lo : lo + E // world]
        else:  # replicated parameters: per-rank partial sums add up to the full gradient
            dist.all_reduce(grad)
            expected = full.get_parameter(name).grad
        torch.testing.assert_close(grad, expected, atol=1e-10, rtol=1e-10)


def test_two_process_expert_parallel_equals_single_process():
    configs = [("softmax", 1), ("sigmoid", 0)]  # one spawn for both: process start is the cost
    mp.spawn(_worker, args=(2, _free_port(), configs), nprocs=2, join=True)


def test_requires_an_initialised_process_group():
    with pytest.raises(ValueError, match="init_process_group"):
        ExpertParallelMoE(D, H, E, top_k=2)
