"""Sparse mixture-of-experts layers: fast grouped dispatch, Mixtral interop, expert parallelism."""

from gatelab.moe.dispatch import Dispatch, combine, dispatch_expert_choice, dispatch_topk
from gatelab.moe.mixtral import from_mixtral, to_mixtral, use_sparse_moe
from gatelab.moe.model import MoEStats, Router, SparseMoE
from gatelab.moe.parallel import ExpertParallelMoE

__all__ = [
    "Dispatch",
    "ExpertParallelMoE",
    "MoEStats",
    "Router",
    "SparseMoE",
    "combine",
    "dispatch_expert_choice",
    "dispatch_topk",
    "from_mixtral",
    "to_mixtral",
    "use_sparse_moe",
]
