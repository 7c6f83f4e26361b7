"""JEI-DNN early exits (Regol, Chataoui, Coates, ICLR 2024, arXiv:2310.09163).

A frozen backbone gets an inference module and a gate after every block but the last; the gates
decide where each sample leaves (hazard form, :func:`gatelab.gates.exit_probabilities`). Inference
is really early: exited samples leave the batch. See ``docs/exits.md`` for the measured results.
"""

from gatelab.exits.backbones import (
    FeatureCache,
    Prepared,
    extract_features,
    load_backbone,
    load_exits,
    prepare,
    prepare_efficientnet,
    save_exits,
)
from gatelab.exits.data import SplitConfig, load_fashion_mnist, make_splits
from gatelab.exits.eval import (
    conformal_quantile,
    conformal_thresholds,
    evaluate,
    evaluate_checkpoint,
    expected_calibration_error,
    prediction_sets,
    reliability,
)
from gatelab.exits.inference import (
    EntropyPolicy,
    ExitResult,
    GatePolicy,
    MaxProbPolicy,
    PatiencePolicy,
    exit_flops,
    run_early_exit,
    simulate_exits,
)
from gatelab.exits.model import (
    EarlyExitModel,
    ExitGate,
    confidence_features,
    global_pool,
    vit_early_exit,
)
from gatelab.exits.train import (
    TrainConfig,
    gate_targets,
    oracle_exit,
    train,
    weighted_im_loss,
)
from gatelab.exits.vit import ViT, ViTConfig, cls_token

__all__ = [
    "EarlyExitModel",
    "EntropyPolicy",
    "ExitGate",
    "ExitResult",
    "FeatureCache",
    "GatePolicy",
    "MaxProbPolicy",
    "PatiencePolicy",
    "Prepared",
    "SplitConfig",
    "TrainConfig",
    "ViT",
    "ViTConfig",
    "cls_token",
    "confidence_features",
    "conformal_quantile",
    "conformal_thresholds",
    "evaluate",
    "evaluate_checkpoint",
    "exit_flops",
    "expected_calibration_error",
    "extract_features",
    "gate_targets",
    "global_pool",
    "load_backbone",
    "load_exits",
    "load_fashion_mnist",
    "make_splits",
    "oracle_exit",
    "prediction_sets",
    "prepare",
    "prepare_efficientnet",
    "reliability",
    "run_early_exit",
    "save_exits",
    "simulate_exits",
    "train",
    "vit_early_exit",
    "weighted_im_loss",
]
