r"""Metrics of gated predictions: accuracy, FLOPs, ECE and split-conformal prediction sets.

- :func:`expected_calibration_error`: 15 equal-width confidence bins over the *whole* test set
  (the public code averaged per-batch ECEs, papers.md §4.4 (4)).
- :func:`conformal_thresholds`: split conformal with score :math:`s = 1 - \hat p(y)`, one
  threshold per exit from the calibration samples that left there, the finite-sample quantile
  :math:`\hat q = s_{(\lceil (n+1)(1-\alpha) \rceil)}`, and the pooled threshold for exits with
  fewer than ``min_count`` calibration samples. Because the same gate decides the exit on the
  calibration and test splits, exchangeability holds within each exit and
  :math:`P(y \in C(x)) \ge 1 - \alpha` (Vovk et al. 2005; Angelopoulos & Bates 2021, §1).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15):
    r"""ECE, equal-width bins: :math:`\sum_b \frac{|B_b|}{N} |\mathrm{acc}_b - \mathrm{conf}_b|`.

    Confidence is the top probability; bin ``b`` holds confidences in ``((b-1)/n_bins, b/n_bins]``.

    Shape:
        probs ``(N, C)``, labels ``(N,)`` -> float.
    """
    return reliability(probs, labels, n_bins).ece


class Reliability(NamedTuple):
    """Per-bin counts, mean confidence and accuracy ``(n_bins,)``, and the ECE."""

    counts: torch.Tensor
    confidence: torch.Tensor
    accuracy: torch.Tensor
    ece: float


def reliability(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> Reliability:
    """The reliability diagram's data (see :func:`expected_calibration_error`)."""
    conf, pred = probs.max(-1)
    correct = (pred == labels).to(probs.dtype)
    bins = (conf * n_bins).ceil().long().clamp(1, n_bins) - 1  # (N,) in [0, n_bins)
    counts = torch.bincount(bins, minlength=n_bins).to(probs.dtype)
    conf_sum = torch.zeros(n_bins, dtype=probs.dtype).index_add_(0, bins, conf)
    acc_sum = torch.zeros(n_bins, dtype=probs.dtype).index_add_(0, bins, correct)
    safe = counts.clamp_min(1)
    gap = (acc_sum - conf_sum).abs().sum() / len(labels)
    return Reliability(counts, conf_sum / safe, acc_sum / safe, float(gap))


def conformal_quantile(scores: torch.Tensor, alpha: float) -> float:
    r"""Finite-sample split-conformal threshold :math:`s_{(\lceil (n+1)(1-\alpha)\rceil)}`.

    Returns ``inf`` (every class in the set) when :math:`\lceil (n+1)(1-\alpha)\rceil > n`.
    """
    _check_alpha(alpha)
    n = len(scores)
    rank = math.ceil((n + 1) * (1 - alpha))
    if rank > n:
        return math.inf
    return float(scores.sort().values[rank - 1])


def conformal_thresholds(
    scores: torch.Tensor, exit_index: torch.Tensor, n_exits: int, alpha: float, min_count: int = 50
) -> torch.Tensor:
    r"""One threshold per exit, the pooled threshold where an exit has < ``min_count`` samples.

    ``min_count`` is raised to :math:`\lceil 1/\alpha \rceil - 1` so a per-exit quantile is
    always finite.

    Shape:
        scores, exit_index ``(N,)`` -> thresholds ``(L,)``.
    """
    _check_alpha(alpha)
    min_count = max(min_count, math.ceil(1 / alpha) - 1)
    pooled = conformal_quantile(scores, alpha)
    out = torch.full((n_exits,), pooled, dtype=torch.float64)
    for ell in range(n_exits):
        mine = scores[exit_index == ell]
        if len(mine) >= min_count:
            out[ell] = conformal_quantile(mine, alpha)
    return out


def prediction_sets(
    probs: torch.Tensor, exit_index: torch.Tensor, thresholds: torch.Tensor
) -> torch.Tensor:
    """Sets ``{y : 1 - p(y) <= q_exit}`` as a boolean mask ``(N, C)``."""
    q = thresholds.to(probs.device, torch.float64)[exit_index]  # (N,)
    return (1 - probs.double()) <= q[:, None]


class SetMetrics(NamedTuple):
    """Empirical coverage and mean set size of conformal sets."""

    coverage: float
    mean_set_size: float


def set_metrics(sets: torch.Tensor, labels: torch.Tensor) -> SetMetrics:
    """Coverage ``P(y in C)`` and mean ``|C|`` of boolean sets ``(N, C)``."""
    covered = sets[torch.arange(len(labels)), labels].double().mean()
    return SetMetrics(float(covered), float(sets.sum(-1).double().mean()))


def gated_metrics(
    logits: torch.Tensor,
    exit_index: torch.Tensor,
    labels: torch.Tensor,
    cost: torch.Tensor,
    n_exits: int,
) -> dict:
    """Accuracy, FLOPs fraction, ECE and exit histogram of gated predictions."""
    probs = logits.double().softmax(-1)
    hist = torch.bincount(exit_index, minlength=n_exits)
    return {
        "accuracy": float((logits.argmax(-1) == labels).double().mean()),
        "flops_fraction": float(cost.double()[exit_index].mean()),
        "ece": expected_calibration_error(probs, labels),
        "exit_histogram": [int(c) for c in hist],
    }
