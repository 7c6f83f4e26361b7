r"""Estimators of the subset quality ``q_c(S)`` that MoE²'s selector maximises, per category.

MoE² (arXiv:2501.09410) picks, per category ``c``, the subset ``S`` of experts that maximises
``q_c(S)`` under the budgets; here ``q_c(S)`` is the mean log-likelihood of the gold option under
the gate restricted to ``S`` (top-k inside ``S``):

.. math::
    \ell_i(S) = \log p_\theta(y_i \mid x_i, S),\qquad
    q_c(S) = \frac{1}{|R_c|}\sum_{i\in R_c} \ell_i(S)

Three estimators, differing in the gate and the questions ``R_c`` behind the mean:

- ``holdout``: the gate trained on the train split, ``R_c`` = the validation questions of ``c``
  (about a tenth of a category; what MoE² used first, and noisy with ~10 questions).
- ``crossfit``: ``R_c`` = every non-test question of ``c``, each scored by a gate that never saw
  it: the non-test questions are cut into ``K`` folds (stratified by category, seeded), the gate
  of fold ``k`` is fitted on the train questions outside ``k`` and early-stopped on the
  validation questions outside ``k``, then scores fold ``k`` (cross-fitting, as in
  Chernozhukov et al. 2018, arXiv:1608.00060). ~5x the questions of ``holdout``, no test question.
- ``shrunk``: the cross-fitted category mean pulled toward the pooled mean over all categories,

  .. math::
      \tilde q_c(S) = w_c\, q_c(S) + (1 - w_c)\, \bar q(S),\qquad w_c = \frac{n_c}{n_c + \lambda}

  (James–Stein-style partial pooling; Efron & Morris 1975, JASA 70(350)); ``λ = 0`` is
  ``crossfit``, ``λ = ∞`` one pooled quality for every category.

**Choice, on non-test data only** (:func:`choose_estimator`): the same ``K`` folds again; for fold
``k`` each estimator is computed from the questions outside ``k`` and compared with the
cross-fitted ``q_c(S)`` of the questions *in* ``k``. The error is over subsets and centred per
category (the selector only compares subsets of one category, so a constant offset is harmless):

.. math::
    \mathrm{err} = \sum_{k,c} n_{kc} \,\mathrm{mean}_S\big[(\hat q_c(S) - \overline{\hat q_c})
                   - (t_{kc}(S) - \overline{t_{kc}})\big]^2 \Big/ \sum_{k,c} n_{kc}

``λ`` is the grid point of least error; then the estimator of least error is chosen. A category
with no question behind an estimate in some fold predicts "all subsets equal" there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from gatelab.edge.model import mixture, subset_mask
from gatelab.edge.train import GateData, TrainConfig, train_gate

ESTIMATORS = ("holdout", "crossfit", "shrunk")
LAMBDAS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, math.inf)  # questions
N_FOLDS = 5


def all_subsets(n_experts: int) -> list[frozenset[int]]:
    """Every non-empty subset of ``range(n_experts)``, in bitmask order."""
    return [
        frozenset(i for i in range(n_experts) if mask >> i & 1) for mask in range(1, 1 << n_experts)
    ]


def subset_loglik(
    logits: np.ndarray,
    probs: np.ndarray,
    available: np.ndarray,
    answer: np.ndarray,
    subsets: list[frozenset[int]],
    top_k: int,
) -> np.ndarray:
    """``ℓ_i(S) = log p(y_i | x_i, S)`` of the gate restricted to each subset, ``(N, S)``.

    Clamped at ``log 1e-12`` like :func:`gatelab.edge.model.mixture_nll`, so a category mean of
    these is exactly minus that function's NLL.
    """
    n_experts = probs.shape[1]
    lg, pr = torch.as_tensor(logits), torch.as_tensor(probs)
    avail, gold = torch.as_tensor(available), torch.as_tensor(answer, dtype=torch.long)
    out = np.empty((len(logits), len(subsets)))
    for j, subset in enumerate(subsets):
        mixed, _ = mixture(lg, pr, avail & subset_mask(subset, n_experts), top_k)
        out[:, j] = torch.log(mixed.gather(-1, gold[:, None])[:, 0].clamp_min(1e-12)).numpy()
    return out


@dataclass
class CrossFit:
    """Out-of-fold gate logits of the non-test questions."""

    logits: np.ndarray  # (N, E); NaN on test rows
    fold: np.ndarray  # (N,) fold of each non-test question, -1 on test rows
    trained_on: list[list[str]] = field(default_factory=list)  # qids each fold's gate saw


def assign_folds(category: np.ndarray, split: np.ndarray, qids: list[str], k: int, seed: int):
    """Fold ``0..k-1`` of each non-test question, stratified by category (seeded); test: -1."""
    if k < 2:
        raise ValueError(f"n_folds: need at least 2 folds, got {k}")
    rng = np.random.default_rng(seed)
    fold = np.full(len(qids), -1)
    for c in sorted(set(category[split != "test"])):
        rows = [i for i in np.flatnonzero((category == c) & (split != "test"))]
        rows.sort(key=lambda i: qids[i])  # independent of the order questions arrive in
        fold[np.array(rows)[rng.permutation(len(rows))]] = np.arange(len(rows)) % k
    return fold


def crossfit_logits(
    data: GateData,
    split: np.ndarray,
    category: np.ndarray,
    qids: list[str],
    train_cfg: TrainConfig,
    k: int = N_FOLDS,
    seed: int = 0,
) -> CrossFit:
    """Train ``k`` gates, each without one fold, and score every non-test question out of fold.

    Test questions are neither trained on, early-stopped on nor scored (their logits are NaN).
    """
    fold = assign_folds(category, split, qids, k, seed)
    logits = np.full(data.probs.shape[:2], np.nan)
    trained_on = []
    for f in range(k):
        fit = (split == "train") & (fold >= 0) & (fold != f)
        stop = (split == "val") & (fold >= 0) & (fold != f)
        stop = stop if stop.any() else fit  # a tiny pool: early-stop on the training rows
        gate, _ = train_gate(_rows(data, fit), _rows(data, stop), train_cfg)
        trained_on.append([qids[i] for i in np.flatnonzero(fit | stop)])
        scored = fold == f
        with torch.no_grad():
            logits[scored] = gate(torch.as_tensor(data.x[scored], dtype=torch.float64)).numpy()
    return CrossFit(logits, fold, trained_on)


def _rows(data: GateData, rows: np.ndarray) -> GateData:
    return GateData(data.x[rows], data.probs[rows], data.available[rows], data.answer[rows])


def shrink(means: np.ndarray, counts: np.ndarray, pooled: np.ndarray, lam: float) -> np.ndarray:
    """``w_c q_c + (1 - w_c) q̄`` with ``w_c = n_c / (n_c + λ)`` (``λ = ∞``: the pooled mean).

    Shape:
        means ``(C, S)``, counts ``(C,)``, pooled ``(S,)`` -> ``(C, S)``.
    """
    if not lam >= 0:
        raise ValueError(f"lam: need lam >= 0, got {lam}")
    counts = np.asarray(counts, dtype=np.float64)
    w = np.zeros_like(counts) if math.isinf(lam) else counts / np.maximum(counts + lam, 1e-300)
    return w[:, None] * means + (1 - w[:, None]) * pooled[None]


def _category_means(ll: np.ndarray, rows: np.ndarray, category: np.ndarray, names: list[str]):
    """Per-category means ``(C, S)`` of ``ll`` over ``rows`` (NaN where none) and counts."""
    counts = np.array([int((rows & (category == c)).sum()) for c in names])
    means = np.full((len(names), ll.shape[1]), np.nan)
    for i, c in enumerate(names):
        if counts[i]:
            means[i] = ll[rows & (category == c)].mean(0)
    return means, counts


def estimate(
    name: str,
    holdout_ll: np.ndarray,
    crossfit_ll: np.ndarray,
    split: np.ndarray,
    category: np.ndarray,
    names: list[str],
    lam: float = 0.0,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """``q_c(S)`` ``(C, S)`` of estimator ``name`` from the ``allowed`` rows (default: all).

    ``holdout_ll``: ``ℓ`` under the gate trained on the train split; ``crossfit_ll``: out of
    fold. Only validation rows (holdout) or non-test rows (the others) are read.
    """
    allowed = np.ones(len(split), dtype=bool) if allowed is None else allowed
    if name == "holdout":
        return _category_means(holdout_ll, allowed & (split == "val"), category, names)[0]
    if name not in ("crossfit", "shrunk"):
        raise ValueError(f"quality estimator: unknown {name!r}; choose from {ESTIMATORS}")
    rows = allowed & (split != "test")
    means, counts = _category_means(crossfit_ll, rows, category, names)
    if name == "crossfit":
        return means
    pooled = crossfit_ll[rows].mean(0)
    return shrink(np.nan_to_num(means), counts, pooled, lam)


@dataclass
class QualityChoice:
    """Which estimator was chosen and the fold errors behind the choice (all non-test data)."""

    chosen: str
    lam: float  # the shrinkage weight's λ (used when chosen == "shrunk")
    errors: dict[str, float]  # estimator -> centred fold error
    lambda_errors: dict[str, float]  # λ -> error of "shrunk" with it
    n_folds: int
    forced: bool = False  # the estimator was given, not chosen


def _centred_error(estimated: np.ndarray, target: np.ndarray, weight: np.ndarray) -> float:
    """Weighted over categories, mean over subsets of the squared difference of centred rows."""
    known = ~np.isnan(estimated).all(1)  # a category without data predicts all subsets equal
    e = np.zeros_like(estimated)
    e[known] = estimated[known] - estimated[known].mean(1, keepdims=True)
    t = target - target.mean(1, keepdims=True)
    return float((weight * ((e - t) ** 2).mean(1)).sum())


def choose_estimator(
    holdout_ll: np.ndarray,
    crossfit_ll: np.ndarray,
    split: np.ndarray,
    category: np.ndarray,
    fold: np.ndarray,
    lambdas: tuple[float, ...] = LAMBDAS,
) -> QualityChoice:
    """Pick ``λ``, then the estimator, by the fold error of the module doc.

    Reads only rows with ``fold >= 0`` (non-test); ``split`` only to find validation rows.
    """
    names = sorted(set(category[split != "test"]))
    k = int(fold.max()) + 1
    candidates = [("holdout", 0.0), ("crossfit", 0.0)] + [("shrunk", lam) for lam in lambdas]
    totals = np.zeros(len(candidates))
    weight_sum = 0.0
    for f in range(k):
        held = fold == f
        target, counts = _category_means(crossfit_ll, held, category, names)
        seen = counts > 0
        weight_sum += counts.sum()
        outside = (fold >= 0) & ~held
        for j, (name, lam) in enumerate(candidates):
            est = estimate(name, holdout_ll, crossfit_ll, split, category, names, lam, outside)
            totals[j] += _centred_error(est[seen], target[seen], counts[seen])
    errors = totals / max(weight_sum, 1)
    lambda_errors = {
        _lam_key(lam): float(errors[j])
        for j, (name, lam) in enumerate(candidates)
        if name == "shrunk"
    }
    best_lam = lambdas[int(np.argmin(list(lambda_errors.values())))]
    by_name = {"holdout": float(errors[0]), "crossfit": float(errors[1])}
    by_name["shrunk"] = lambda_errors[_lam_key(best_lam)]
    chosen = min(ESTIMATORS, key=lambda n: (by_name[n], ESTIMATORS.index(n)))
    return QualityChoice(chosen, float(best_lam), by_name, lambda_errors, k)


def _lam_key(lam: float) -> str:
    return "inf" if math.isinf(lam) else f"{lam:g}"
