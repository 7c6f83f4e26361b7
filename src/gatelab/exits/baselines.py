r"""Threshold baselines on the same IMs, the oracle ceiling, and curve comparisons.

- max-probability threshold, entropy threshold, patience (PABEE, Zhou et al. 2020,
  arXiv:2006.04152):
  each swept over its parameter; the parameters kept are those whose
  *validation* (cost, accuracy) point is Pareto-optimal, and only those are reported on test;
- oracle: :math:`l^* = \arg\min_l 1[\hat y_l \ne y] + \lambda c_l`, which needs the label
  (a ceiling, not a method).
"""

from __future__ import annotations

import numpy as np
import torch

from gatelab.cost import pareto_front
from gatelab.exits.inference import EntropyPolicy, MaxProbPolicy, PatiencePolicy, simulate_exits


def validation_point(exit_logits: torch.Tensor, labels: torch.Tensor, cost: torch.Tensor, policy):
    """Mean cost and accuracy of ``policy`` on ``(L, N, C)`` exit logits (floats)."""
    out = simulate_exits(exit_logits, policy)
    acc = float((out.logits.argmax(-1) == labels).double().mean())
    return float(cost.double()[out.exit_index].mean()), acc


def baseline_policies(val_logits: torch.Tensor, n_grid: int = 40) -> dict[str, list]:
    """Candidate policies per method; thresholds from quantiles of the validation confidences.

    Shape:
        val_logits ``(L, N, C)``.
    """
    probs = val_logits[:-1].softmax(-1)  # (L-1, N, C)
    maxprob = probs.amax(-1).flatten()
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).flatten()
    qs = torch.linspace(0.0, 1.0, n_grid, dtype=maxprob.dtype)
    n_exits = val_logits.shape[0]
    return {
        "max-prob": [MaxProbPolicy(float(t)) for t in torch.quantile(maxprob, qs).unique()],
        "entropy": [EntropyPolicy(float(t)) for t in torch.quantile(entropy, qs).unique()],
        "patience": [PatiencePolicy(p) for p in range(1, n_exits)],
    }


def select_on_validation(
    policies: list, val_logits: torch.Tensor, val_labels: torch.Tensor, cost: torch.Tensor
) -> list:
    """The policies whose validation (cost, accuracy) point lies on the Pareto front."""
    points = np.array([validation_point(val_logits, val_labels, cost, p) for p in policies])
    return [policies[i] for i in pareto_front(points)]


def oracle_exits(exit_logits: torch.Tensor, labels: torch.Tensor, cost: torch.Tensor, lam: float):
    r"""Exit of the label-aware oracle :math:`\arg\min_l 1[\hat y_l \ne y] + \lambda c_l`."""
    wrong = (exit_logits.argmax(-1) != labels[None]).double()  # (L, N)
    return (wrong + lam * cost.double()[:, None]).argmin(0)


def interpolate_front(points: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Accuracy of the piecewise-linear Pareto front at each cost in ``grid`` (NaN below it)."""
    front = points[pareto_front(points)]
    out = np.interp(grid, front[:, 0], front[:, 1], left=np.nan, right=front[-1, 1])
    return out


def margins(curves: dict[str, np.ndarray], ours: str, lo: float, hi: float, n: int = 61) -> dict:
    """Our front minus the best other front on a cost grid in ``[lo, hi]`` (points where all exist).

    Returns min and max margin (accuracy points, i.e. x100) and where the max is reached.
    """
    grid = np.linspace(lo, hi, n)
    mine = interpolate_front(curves[ours], grid)
    others = np.stack([interpolate_front(v, grid) for k, v in curves.items() if k != ours])
    best_other = np.nanmax(np.where(np.isnan(others), -np.inf, others), axis=0)
    diff = (mine - best_other) * 100
    ok = np.isfinite(diff)
    if not ok.any():
        return {"min_margin_points": None, "max_margin_points": None, "at_cost": None}
    i = int(np.nanargmax(np.where(ok, diff, -np.inf)))
    return {
        "min_margin_points": float(diff[ok].min()),
        "max_margin_points": float(diff[i]),
        "at_cost": float(grid[i]),
        "compared_from_cost": float(grid[ok][0]),
    }
