"""Top-K sparse softmax gating Gaussian mixture of experts (Nguyen et al., ICLR 2024).

The model (:class:`GaussianMoE`), its maximum-likelihood estimator
(:class:`GaussianMoERegressor`, scikit-learn style, EM on torch float64), the Voronoi losses and
density distances of the paper (:mod:`gatelab.gmoe.eval`), model selection by BIC and atom merging
(:mod:`gatelab.gmoe.select`), and the convergence-rate study (:mod:`gatelab.gmoe.rates`).
"""

from gatelab.gmoe.estimator import GaussianMoERegressor
from gatelab.gmoe.eval import hellinger, total_variation, voronoi_cells, voronoi_loss
from gatelab.gmoe.model import GaussianMoE
from gatelab.gmoe.rates import RateConfig
from gatelab.gmoe.select import merge_experts, select_n_experts

__all__ = [
    "GaussianMoE",
    "GaussianMoERegressor",
    "RateConfig",
    "hellinger",
    "merge_experts",
    "select_n_experts",
    "total_variation",
    "voronoi_cells",
    "voronoi_loss",
]
