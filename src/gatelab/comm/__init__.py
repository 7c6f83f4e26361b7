"""CommFormer: multi-agent RL with a learned sparse communication graph and temporal gates.

Hu et al., ICLR 2024 (arXiv:2405.08550) and its temporal-gating extension; see papers.md §5.
"""

from gatelab.comm.checkpoint import load_model
from gatelab.comm.compare import VARIANTS, CompareConfig, compare
from gatelab.comm.envs import ENVS, PredatorCapturePrey, PredatorPrey, make_env
from gatelab.comm.eval import evaluate
from gatelab.comm.graph import CommGraph, TemporalGate, comm_rate, gate_graph, n_senders
from gatelab.comm.model import CommConfig, CommFormer, graph_attention
from gatelab.comm.train import TrainConfig, TrainResult, train

__all__ = [
    "ENVS",
    "VARIANTS",
    "CommConfig",
    "CommFormer",
    "CommGraph",
    "CompareConfig",
    "PredatorCapturePrey",
    "PredatorPrey",
    "TemporalGate",
    "TrainConfig",
    "TrainResult",
    "comm_rate",
    "compare",
    "evaluate",
    "gate_graph",
    "graph_attention",
    "load_model",
    "make_env",
    "n_senders",
    "train",
]
