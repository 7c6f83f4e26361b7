"""Expert parallelism: experts sharded over a ``torch.distributed`` group, all-to-all exchange.

Each rank holds the full router and ``E / W`` experts (rank ``r`` owns global experts
``[r E/W, (r+1) E/W)``), routes its own tokens, sends every routed row to the rank that owns its
expert with ``all_to_all_single`` (variable splits), runs its local experts as one grouped
computation, sends the rows back with a second all-to-all and combines them locally — the
Tutel / DeepSpeed-MoE scheme (arXiv:2206.03382 §3; arXiv:2201.05596 §5). Works with gloo (CPU)
and NCCL (GPU). Gradients flow through both exchanges (the backward of an all-to-all is the
all-to-all with the splits swapped). Router and shared-expert gradients are per-rank partial
sums: reduce them across ranks as for any replicated parameter (e.g. DDP).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import gatelab.moe.dispatch as dsp
from gatelab.moe.experts import routed_experts
from gatelab.moe.model import SparseMoE, shared_forward


class _AllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all_single`` over rows with explicit split sizes."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):  # noqa: D102
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


class ExpertParallelMoE(SparseMoE):
    r"""A :class:`SparseMoE` whose experts are sharded over the ranks of a process group.

    Same outputs and gradients as one :class:`SparseMoE` applied to the concatenation of all
    ranks' tokens (rank 0's first), for every router and with or without a capacity: the drop
    rule is the single-process one (each expert keeps the first ``C = ceil(cf N K / E)``
    assignments in choice-major order, ``N`` the tokens of *all* ranks), so it does not depend on
    the number of ranks or on which rank holds which expert. Each rank learns how many of the
    other ranks' assignments are ahead of its own in every expert's queue from one all-gather
    of ``(K, E)`` counts; expert choice all-gathers the (detached) router logits so that every
    expert picks its top-``C`` tokens among all of them. The balance loss is computed on each
    rank's own tokens.

    Args:
        *args, **kwargs: as :class:`SparseMoE`; ``n_experts`` must be divisible by the group size.
        group: process group (default: the world). ``torch.distributed`` must be initialised.

    Shape:
        x ``(..., D)`` -> ``(..., D)``, each rank with its own tokens.

    Attributes:
        w_gate, w_up ``(E/W, D, H)``, w_down ``(E/W, H, D)``: this rank's experts. The constructor
        draws the full ``(E, ...)`` weights and keeps its slice, so ranks seeded alike hold
        exactly the shards of one ``SparseMoE`` built with that seed.
    """

    def __init__(self, *args, group=None, **kwargs) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("ExpertParallelMoE: call torch.distributed.init_process_group first")
        super().__init__(*args, **kwargs)
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if self.n_experts % self.world:
            raise ValueError(
                f"ExpertParallelMoE: n_experts={self.n_experts} must be divisible by the "
                f"group size {self.world}"
            )
        self.n_local = self.n_experts // self.world
        lo = self.rank * self.n_local
        for name in ("w_gate", "w_up", "w_down"):
            full = getattr(self, name)
            if full is not None:
                setattr(self, name, nn.Parameter(full.detach()[lo : lo + self.n_local].clone()))

    @classmethod
    def from_dense(cls, moe: SparseMoE, group=None) -> ExpertParallelMoE:
        """Shard an existing :class:`SparseMoE` (same weights, this rank's experts)."""
        ep = cls(
            moe.d_model, moe.d_hidden, moe.n_experts, moe.top_k, router=moe.router_kind,
            activation=moe.activation, n_shared_experts=moe.n_shared_experts,
            capacity_factor=moe.capacity_factor, router_bias=moe.router.bias is not None,
            balance_coef=moe.balance_coef,
            z_coef=moe.z_coef, backend=moe.backend, device=moe.w_up.device,
            dtype=moe.w_up.dtype, group=group,
        )  # fmt: skip
        lo = ep.rank * ep.n_local
        with torch.no_grad():
            for name, p in moe.named_parameters():
                target = ep.get_parameter(name)
                target.copy_(p[lo : lo + ep.n_local] if name.startswith("w_") else p)
        return ep

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"ExpertParallelMoE: expected input (..., D={self.d_model}), got {tuple(x.shape)}"
            )
        flat = x.reshape(-1, self.d_model)  # (N, D)
        logits = self.router(flat)  # (N, E)
        plan, gate_weights, balance = self.route(flat, logits)  # rows grouped by expert = by rank
        # exchange the row counts: recv_counts[s * E/W + e] = rows rank s sends to local expert e
        recv_counts = torch.empty_like(plan.counts)
        dist.all_to_all_single(recv_counts, plan.counts, group=self.group)
        send_splits = plan.counts.view(self.world, self.n_local).sum(1).tolist()
        recv_splits = recv_counts.view(self.world, self.n_local).sum(1).tolist()
        received = _AllToAll.apply(flat[plan.token_index], recv_splits, send_splits, self.group)
        # received rows are ordered (source rank, local expert): regroup by local expert
        local = torch.arange(self.n_local, device=flat.device).repeat(self.world)  # (W E/W,)
        expert_of_row = torch.repeat_interleave(local, recv_counts)  # (R,)
        local_expert, order = torch.sort(expert_of_row, stable=True)  # (R,)
        counts = recv_counts.view(self.world, self.n_local).sum(0)  # (E/W,)
        rows = routed_experts(
            received,
            None,
            order,
            local_expert,
            counts,
            self.w_gate,
            self.w_up,
            self.w_down,
            self.activation,
            self.backend,
        )  # (R, D) each row's output, back in (source rank, local expert) order
        returned = _AllToAll.apply(rows, send_splits, recv_splits, self.group)  # (M, D)
        weighted = returned * plan.row_weights(gate_weights).to(returned.dtype).unsqueeze(-1)
        out = torch.zeros_like(flat).index_add_(0, plan.token_index, weighted)  # (N, D)
        if self.n_shared_experts:
            out = out + shared_forward(self, flat)
        self.last_stats = self._stats(plan, balance, logits, flat.shape[0])
        return out.reshape(x.shape)

    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same trailing shape, any leading size), in rank order."""
        size = torch.tensor([tensor.shape[0]], device=tensor.device)
        sizes = [torch.empty_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size, group=self.group)
        longest = int(max(sizes))
        padded = tensor.new_zeros(longest, *tensor.shape[1:])
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return [part[: int(n)] for part, n in zip(parts, sizes, strict=True)]

    def _expert_choice(self, logits: torch.Tensor) -> torch.Tensor:
        """Each expert's top-C among all ranks' tokens; this rank's rows of the mask."""
        everyone = self._all_gather(logits.detach())  # W x (N_r, E)
        first = sum(part.shape[0] for part in everyone[: self.rank])
        return super()._expert_choice(torch.cat(everyone))[first : first + logits.shape[0]]

    def _dispatch(self, indices: torch.Tensor) -> dsp.Dispatch:
        """The single-process drop rule over all ranks' tokens, for this rank's assignments."""
        n, k = indices.shape
        e = self.n_experts
        if self.capacity_factor is None:
            return dsp.dispatch_topk(indices, e)
        queues = self._all_gather(torch.tensor([n], device=indices.device))
        capacity = self.capacity(int(sum(queues)))
        choice = torch.arange(k, device=indices.device).unsqueeze(0)  # (1, K)
        mine = dsp.expert_counts(choice * e + indices, k * e).view(k, e)  # (K, E) queue lengths
        counts = torch.stack(self._all_gather(mine.unsqueeze(0))).squeeze(1)  # (W, K, E)
        other = counts.sum(0) - mine  # (K, E) other ranks' assignments per (choice, expert)
        ahead = other.cumsum(0) - other + counts[: self.rank].sum(0)  # (K, E)
        return dsp.dispatch_topk(indices, e, capacity, ahead=ahead)

    def extra_repr(self) -> str:  # noqa: D102
        return f"{super().extra_repr()}, world={self.world}, rank={self.rank}"
