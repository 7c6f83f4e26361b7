r"""Which experts MoE² runs once the selector has chosen: a choice made on non-test folds only.

The selector maximises the monotone hull :math:`\tilde q(S) = \max_{T \subseteq S} \hat q(T)` of
the estimated subset quality under the budgets and returns a feasible set ``U``. Two rules
(:func:`gatelab.edge.select.subset_to_run`): run the hull's argmax ``T ⊆ U`` (``hull_argmax``),
or ``U`` itself (``selected_set``: MoE²'s property, arXiv:2501.09410 §III, that a gate trained on
all experts loses nothing when more of them are allowed, so ``q(U) ≥ q(T)``).

:func:`choose_run_rule` compares them by nested cross-fitting on the non-test questions, on the
folds of the quality estimate (:func:`gatelab.edge.quality.crossfit_logits`). For fold ``k``,
:math:`\hat q` comes from the questions outside ``k`` (:func:`gatelab.edge.quality.estimate`,
the estimator already chosen), the selector runs at every budget of the sweep's grids, and each
rule's subset answers the questions *in* ``k`` with their out-of-fold gate logits. Pooled over
folds, each rule gets per axis a curve of (realised modelled cost, accuracy) and its AIQ
(:func:`gatelab.cost.area_under_tradeoff`) over a span shared by both rules; the larger sum of
the two AIQs wins, ties go to ``hull_argmax`` (the cheaper set). No test question is read. The
gates behind the estimate outside ``k`` were trained on folds that include ``k``'s training
questions (as in :func:`gatelab.edge.quality.choose_estimator`); no gate scores a question it
was trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gatelab.cost import area_under_tradeoff
from gatelab.edge.eval import (
    Pool,
    QualityData,
    category_models,
    predict_options,
    quality_table,
    realised_costs,
)
from gatelab.edge.quality import QualityChoice, all_subsets, estimate
from gatelab.edge.select import (
    RUN_RULES,
    delay_cost,
    energy_cost,
    select_subset,
    subset_to_run,
)


@dataclass
class RunRuleChoice:
    """The rule chosen and the validation AIQ behind it (``aiq[rule][axis]``)."""

    chosen: str
    aiq: dict[str, dict[str, float]]
    n_questions: int  # non-test questions scored out of fold
    forced: bool = False  # the rule was given, not chosen


def choose_run_rule(
    pool: Pool,
    data: QualityData,
    quality: QualityChoice,
    grids: dict[str, np.ndarray],
    aggregate_s: float,
    top_k: int,
) -> RunRuleChoice:
    """Nested fold comparison of :data:`gatelab.edge.select.RUN_RULES`; see the module doc.

    Args:
        pool: the sweep's questions; only rows with ``data.fit.fold >= 0`` (non-test) are read.
        data: per-question ``ℓ_i(S)`` and the out-of-fold gate logits
            (:func:`gatelab.edge.eval.subset_quality`).
        quality: the estimator (and ``λ``) behind ``q̂``.
        grids: ``{"energy": budgets, "delay": budgets}`` (:func:`gatelab.edge.eval.budget_grids`).
        aggregate_s: gating time added to every delay.
        top_k: experts weighted per query inside a subset.
    """
    t, fold = pool.table, data.fit.fold
    names = sorted(set(pool.category))
    subsets = all_subsets(len(t.experts))
    # totals[rule][axis]: (budgets, 3) correct, energy, delay summed over scored questions
    totals = {r: {a: np.zeros((len(g), 3)) for a, g in grids.items()} for r in RUN_RULES}
    for k in range(int(fold.max()) + 1):
        values = estimate(
            quality.chosen, data.holdout_ll, data.crossfit_ll, pool.split, pool.category, names,
            quality.lam, (fold >= 0) & (fold != k),
        )  # fmt: skip
        table = quality_table(names, subsets, values)
        models = category_models(pool, data.fit.logits, top_k, table)
        for c, cm in models.items():
            rows = (pool.category == c) & (fold == k)
            if not rows.any():
                continue
            energy_of, delay_of = energy_cost(cm.energy_j), delay_cost(cm.delay_s, aggregate_s)
            for axis, grid in grids.items():
                for b, budget in enumerate(grid):
                    e_b, d_b = (budget, math.inf) if axis == "energy" else (math.inf, budget)
                    cons = [(energy_of, e_b), (delay_of, d_b)]
                    selected = select_subset(len(t.experts), cm.quality, cons).subset
                    scored: dict[frozenset[int], list[float]] = {}  # rules often agree
                    for rule in RUN_RULES:
                        subset = subset_to_run(rule, selected, cm.argmax)
                        if subset not in scored:
                            pred = predict_options(pool, data.fit.logits, rows, subset, top_k)
                            energy, delay = realised_costs(pool, rows, subset, aggregate_s)
                            correct = (pred == t.answer[rows]).sum()
                            scored[subset] = [correct, energy.sum(), delay.sum()]
                        totals[rule][axis][b] += scored[subset]
    n = int((fold >= 0).sum())
    aiq: dict[str, dict[str, float]] = {r: {} for r in RUN_RULES}
    for axis in grids:
        column = 1 if axis == "energy" else 2
        curves = {r: totals[r][axis][:, [column, 0]] / max(n, 1) for r in RUN_RULES}  # (cost, acc)
        costs = np.concatenate([c[:, 0] for c in curves.values()])
        span = (float(costs.min()), float(costs.max()))
        for r in RUN_RULES:
            aiq[r][axis] = area_under_tradeoff(curves[r], span)
    chosen = max(RUN_RULES, key=lambda r: (sum(aiq[r].values()), -RUN_RULES.index(r)))
    return RunRuleChoice(chosen, aiq, n)
