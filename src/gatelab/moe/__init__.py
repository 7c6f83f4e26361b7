"""Sparse mixture-of-experts layers: fast grouped dispatch, Mixtral interop, expert parallelism."""

from gatelab.moe.dispatch import Dispatch, dispatch_expert_choice, dispatch_topk
from gatelab.moe.experts import routed_experts
from gatelab.moe.mixtral import from_mixtral, to_mixtral, use_sparse_moe
from gatelab.moe.model import MoEStats, Router, SparseMoE
from gatelab.moe.parallel import ExpertParallelMoE

__all__ = [
    "Dispatch",
    "ExpertParallelMoE",
    "MoEStats",
    "Router",
    "SparseMoE",
    "dispatch_expert_choice",
    "dispatch_topk",
    "from_mixtral",
    "routed_experts",
    "to_mixtral",
    "use_sparse_moe",
]
