"""CommFormer: multi-agent RL with a learned sparse communication graph and temporal gates.

Hu et al., ICLR 2024 (arXiv:2405.08550) with temporal gates; see docs/comm.md.
"""

from gatelab.comm.compare import VARIANTS, CompareConfig, Variant, compare
from gatelab.comm.config import (
    Env,
    EnvConfig,
    Estimator,
    GateConfig,
    Graph,
    ModelConfig,
    PPOConfig,
    TrainConfig,
)
from gatelab.comm.envs import (
    ENVS,
    PredatorCapturePrey,
    PredatorCapturePreyEnv,
    PredatorPrey,
    PredatorPreyEnv,
    make_env,
)
from gatelab.comm.eval import evaluate
from gatelab.comm.graph import CommGraph, TemporalGate, comm_rate, gate_graph, n_senders
from gatelab.comm.model import CommConfig, CommFormer, graph_attention
from gatelab.comm.train import TrainResult, load_model, train

__all__ = [
    "ENVS",
    "VARIANTS",
    "CommConfig",
    "CommFormer",
    "CommGraph",
    "CompareConfig",
    "Env",
    "EnvConfig",
    "Estimator",
    "GateConfig",
    "Graph",
    "ModelConfig",
    "PPOConfig",
    "PredatorCapturePrey",
    "PredatorCapturePreyEnv",
    "PredatorPrey",
    "PredatorPreyEnv",
    "TemporalGate",
    "TrainConfig",
    "TrainResult",
    "Variant",
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
