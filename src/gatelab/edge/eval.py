"""Budget sweeps for MoE²: the selector + gate against the baselines of the issue."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

from gatelab.edge.bootstrap import RESAMPLES
from gatelab.edge.client import DEFAULT_NORMALIZE
from gatelab.edge.collect import AnswerTable, load_answers, read_cache
from gatelab.edge.data import MCQuestion, generate_suite, load_mmlu, split_questions
from gatelab.edge.experts import DEFAULT_POOL
from gatelab.edge.model import EdgeGate, embed_texts, mixture, subset_mask
from gatelab.edge.quality import (
    ESTIMATORS,
    N_FOLDS,
    CrossFit,
    QualityChoice,
    all_subsets,
    choose_estimator,
    crossfit_logits,
    estimate,
    subset_loglik,
)
from gatelab.edge.select import (
    RUN_RULES,
    delay_cost,
    energy_cost,
    monotone_hull,
    select_subset,
    subset_to_run,
)
from gatelab.edge.train import GateData, TrainConfig


@dataclass(frozen=True)
class SweepConfig:
    """What questions to use and how to sweep budgets."""

    quick: bool = False  # a stratified subset of questions (demo)
    n_generated: int = 30  # generated questions per generated category
    n_quick: int = 12  # questions per category in quick mode
    seed: int = 0  # seeds the generated suite, splits, gate training and random baselines
    top_k: int = 2  # fine-grained top-k inside a selected subset
    n_budgets: int = 12  # grid points per budget axis
    normalize: str | None = DEFAULT_NORMALIZE  # continuation scores; None: probs as cached
    quality: str = "auto"  # q(S) estimator (gatelab.edge.quality); auto: chosen on non-test data
    n_folds: int = N_FOLDS  # cross-fitting folds over the non-test questions
    run_rule: str = "auto"  # which experts run after selection (RUN_RULES); auto: non-test folds
    resamples: int = RESAMPLES  # paired bootstrap resamples of the test questions

    def __post_init__(self) -> None:
        if self.n_generated < 1 or self.n_quick < 3 or self.top_k < 1 or self.n_budgets < 2:
            raise ValueError(
                "SweepConfig: need n_generated >= 1, n_quick >= 3, top_k >= 1, n_budgets >= 2"
            )
        if self.quality not in ("auto", *ESTIMATORS):
            raise ValueError(
                f"SweepConfig: quality must be auto or one of {ESTIMATORS}, got {self.quality!r}"
            )
        if self.run_rule not in ("auto", *RUN_RULES):
            raise ValueError(
                f"SweepConfig: run_rule must be auto or one of {RUN_RULES}, got {self.run_rule!r}"
            )
        if self.n_folds < 2 or self.resamples < 1:
            raise ValueError("SweepConfig: need n_folds >= 2 and resamples >= 1")


def questions_for(cfg: SweepConfig) -> list[MCQuestion]:
    """The questions of a sweep: quick or the full set.

    Quick: ``n_quick`` per category of MMLU dev + the generated suite (seeded). Full: the full
    set of :func:`gatelab.edge.suites.full_questions` (13 categories; its splits:
    :func:`gatelab.edge.suites.full_splits`).

    Questions come interleaved across categories (round robin over seeded shuffles), so a
    partially collected cache is a stratified sample.
    """
    from gatelab.edge.suites import full_questions

    rng = random.Random(cfg.seed)
    by_category: dict[str, list[MCQuestion]] = {}
    pool = load_mmlu() + generate_suite(cfg.n_generated, cfg.seed)
    for q in pool if cfg.quick else full_questions(cfg.n_generated, cfg.seed):
        by_category.setdefault(q.category, []).append(q)
    for category in sorted(by_category):
        rng.shuffle(by_category[category])
    if cfg.quick:
        by_category = {c: items[: cfg.n_quick] for c, items in by_category.items()}
    columns = [by_category[c] for c in sorted(by_category)]
    longest = max(len(items) for items in columns)
    return [items[i] for i in range(longest) for items in columns if i < len(items)]


METHODS = ("moe2", "best_single", "greedy_per_joule", "random_subset", "all_uniform", "router")


@dataclass
class Pool:
    """Everything the sweep needs, arrays over collected questions ``N`` and experts ``E``."""

    questions: list[MCQuestion]
    table: AnswerTable
    x: np.ndarray  # (N, 384) MiniLM embeddings
    split: np.ndarray  # (N,) "train" | "val" | "test"
    category: np.ndarray  # (N,) category names

    def data(self, rows: np.ndarray) -> GateData:
        """Gate training data for a boolean row mask."""
        t = self.table
        return GateData(self.x[rows], t.probs[rows], t.available[rows], t.answer[rows])


def cached_experts(records: dict[tuple[str, str], dict]) -> list[str]:
    """Expert names of the cache's records, in demo-pool order where they belong to it."""
    names = list(dict.fromkeys(expert for _, expert in records))
    order = [n for n, _ in DEFAULT_POOL]
    return sorted(
        names, key=lambda n: (order.index(n) if n in order else len(order), names.index(n))
    )


def build_pool(cfg: SweepConfig, cache: Path, out_dir: Path) -> Pool:
    """Collected questions (every expert attempted), their answers, embeddings and splits."""
    if not cache.exists():
        raise FileNotFoundError(f"no answer cache at {cache}: run `gatelab edge collect` first")
    records = read_cache(cache)  # read once: experts, attempts and answers all come from it
    experts = cached_experts(records)
    attempted: dict[str, set[str]] = {}
    for qid, expert in records:
        attempted.setdefault(qid, set()).add(expert)
    questions = [q for q in questions_for(cfg) if attempted.get(q.qid, set()) >= set(experts)]
    if len(questions) < 4 * len({q.category for q in questions}) or not questions:
        raise ValueError(
            f"{cache}: too few collected questions ({len(questions)}) to train and test"
        )
    table = load_answers(cache, questions, experts, cfg.normalize, records=records)
    emb_path = out_dir / "embeddings.npz"
    stored = dict(np.load(emb_path)) if emb_path.exists() else {}
    todo = [q for q in questions if q.qid not in stored]
    if todo:
        texts = [q.question + " " + " | ".join(q.options) for q in todo]
        stored |= dict(zip([q.qid for q in todo], embed_texts(texts), strict=True))
        out_dir.mkdir(parents=True, exist_ok=True)
        np.savez(emb_path, **stored)
    x = np.stack([stored[q.qid] for q in questions]).astype(np.float64)
    if cfg.quick:  # 50/20/30 within each category of the quick set
        splits = split_questions(questions, seed=cfg.seed)
        where = {q.qid: name for name, items in splits.items() for q in items}
    else:  # the full set's test-heavy split, fixed by qid and seed
        from gatelab.edge.suites import full_questions, full_splits

        where = full_splits(full_questions(cfg.n_generated, cfg.seed), cfg.seed)
    split = np.array([where[q.qid] for q in questions])
    return Pool(questions, table, x, split, np.array([q.category for q in questions]))


def gate_outputs(gate: EdgeGate, pool: Pool) -> np.ndarray:
    """Gate logits ``(N, E)`` of every question of the pool."""
    with torch.no_grad():
        return gate(torch.as_tensor(pool.x, dtype=torch.float64)).numpy()  # (N, E)


def predict_options(
    pool: Pool,
    logits: np.ndarray,
    rows: np.ndarray,
    subset: frozenset[int],
    top_k: int,
    uniform: bool = False,
) -> np.ndarray:
    """Predicted option per row (−1 when the subset is empty: no answer, counted wrong)."""
    if not subset:
        return np.full(int(rows.sum()), -1)
    t = pool.table
    allowed = torch.as_tensor(t.available[rows]) & subset_mask(subset, len(t.experts))
    scores = (
        torch.zeros_like(torch.as_tensor(logits[rows]))
        if uniform
        else torch.as_tensor(logits[rows])
    )
    k = len(t.experts) if uniform else top_k
    mixed, _ = mixture(scores, torch.as_tensor(t.probs[rows]), allowed, k)
    return mixed.argmax(-1).numpy()


def realised_costs(
    pool: Pool, rows: np.ndarray, subset: frozenset[int], aggregate_s: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-question modelled energy (sum) and delay (max + aggregation) of running ``subset``."""
    if not subset:
        return np.zeros(int(rows.sum())), np.zeros(int(rows.sum()))
    cols = sorted(subset)
    energy = np.nan_to_num(pool.table.energy_j[rows][:, cols]).sum(1)
    delay = np.nan_to_num(pool.table.delay_s[rows][:, cols]).max(1) + aggregate_s
    return energy, delay


@dataclass
class CategoryModel:
    """Per-category costs (mean *modelled* values over train+val questions) and subset quality."""

    energy_j: np.ndarray  # (E,)
    delay_s: np.ndarray  # (E,)
    single_accuracy: np.ndarray  # (E,) validation accuracy of each expert alone
    quality: Callable[[frozenset[int]], float]  # monotone hull of base_quality
    argmax: dict[frozenset[int], frozenset[int]]  # hull argmax: the subset actually run
    base_quality: Callable[[frozenset[int]], float]  # estimated q(S) of exactly S


QualityTable = dict[str, dict[frozenset[int], float]]  # category -> subset -> q(S)


@dataclass
class QualityData:
    """What the quality estimate was computed from: per-question ``ℓ_i(S)`` and the folds.

    ``holdout_ll``/``crossfit_ll`` ``(N, S)`` over :func:`gatelab.edge.quality.all_subsets`
    (NaN on test rows); ``fit``: the out-of-fold gate logits and the fold of each question.
    """

    holdout_ll: np.ndarray
    crossfit_ll: np.ndarray
    fit: CrossFit


def subset_quality(
    pool: Pool, logits: np.ndarray, cfg: SweepConfig, train_cfg: TrainConfig
) -> tuple[QualityTable, QualityChoice, QualityData]:
    """``q_c(S)`` for every category and non-empty subset, by the estimator ``cfg.quality``.

    ``auto`` chooses among :data:`gatelab.edge.quality.ESTIMATORS` on non-test data
    (:func:`gatelab.edge.quality.choose_estimator`); the test split is never read.
    """
    t, nontest = pool.table, pool.split != "test"
    subsets = all_subsets(len(t.experts))
    holdout_ll = np.full((len(pool.questions), len(subsets)), np.nan)
    holdout_ll[nontest] = subset_loglik(
        logits[nontest], t.probs[nontest], t.available[nontest], t.answer[nontest], subsets,
        cfg.top_k,
    )  # fmt: skip
    qids = [q.qid for q in pool.questions]
    fit = crossfit_logits(
        pool.data(np.ones(len(qids), dtype=bool)), pool.split, pool.category, qids, train_cfg,
        cfg.n_folds, cfg.seed,
    )  # fmt: skip
    crossfit_ll = np.full_like(holdout_ll, np.nan)
    crossfit_ll[nontest] = subset_loglik(
        fit.logits[nontest], t.probs[nontest], t.available[nontest], t.answer[nontest], subsets,
        cfg.top_k,
    )  # fmt: skip
    choice = choose_estimator(holdout_ll, crossfit_ll, pool.split, pool.category, fit.fold)
    if cfg.quality != "auto":
        choice.chosen, choice.forced = cfg.quality, True
    names = sorted(set(pool.category))
    values = estimate(
        choice.chosen, holdout_ll, crossfit_ll, pool.split, pool.category, names, choice.lam
    )
    return quality_table(names, subsets, values), choice, QualityData(holdout_ll, crossfit_ll, fit)


def quality_table(names: list[str], subsets: list, values: np.ndarray) -> QualityTable:
    """``values (C, S)`` as category -> subset -> float."""
    rows = zip(names, values, strict=True)
    return {c: dict(zip(subsets, map(float, row), strict=True)) for c, row in rows}


def category_models(
    pool: Pool, logits: np.ndarray, top_k: int, quality: QualityTable | None = None
) -> dict[str, CategoryModel]:
    """Costs and the quality ``q_c(S)`` per category (default: validation −NLL, ``holdout``)."""
    t, models = pool.table, {}
    if quality is None:
        subsets = all_subsets(len(t.experts))
        val = pool.split == "val"
        ll = np.full((len(pool.questions), len(subsets)), np.nan)
        ll[val] = subset_loglik(
            logits[val], t.probs[val], t.available[val], t.answer[val], subsets, top_k
        )
        names = sorted(set(pool.category))
        values = estimate("holdout", ll, ll, pool.split, pool.category, names)
        quality = quality_table(names, subsets, values)
    for c in sorted(set(pool.category)):
        fit = (pool.category == c) & (pool.split != "test")
        val = (pool.category == c) & (pool.split == "val")

        def base(subset: frozenset[int], table=quality[c]) -> float:
            if not subset:
                return -math.inf  # running nothing gives no answer
            value = table[subset]
            return -math.inf if math.isnan(value) else float(value)  # no data: never chosen

        hull, argmax = monotone_hull(base)
        single = (t.probs[val].argmax(-1) == t.answer[val][:, None]).mean(0)
        energy = np.nanmean(t.energy_j[fit], axis=0)
        delay = np.nanmean(t.delay_s[fit], axis=0)
        models[c] = CategoryModel(energy, delay, single, hull, argmax, base)
    return models


def budget_grids(
    models: dict[str, CategoryModel], aggregate_s: float, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` energy and ``n`` delay budgets, geometric, from the cheapest expert to all of them.

    Geometric on both axes: the experts' costs span two orders of magnitude (about 7 to 700 ms of
    modelled delay here), and a linear delay grid put one budget below the point where five of
    six experts already fit.
    """
    energy = np.stack([m.energy_j for m in models.values()])  # (categories, E)
    delay = np.stack([m.delay_s for m in models.values()])
    e_grid = np.geomspace(energy.min() * 0.95, energy.sum(1).max() * 1.05, n)
    d_grid = np.geomspace(delay.min() + aggregate_s, delay.max() * 1.05 + aggregate_s, n)
    return e_grid, d_grid


def _feasible_subsets(cm: CategoryModel, constraints: list) -> list[frozenset[int]]:
    n = len(cm.energy_j)
    subsets = [frozenset(c) for size in range(1, n + 1) for c in combinations(range(n), size)]
    return [s for s in subsets if all(f(s) <= b for f, b in constraints)]


def evaluate_budget(
    pool: Pool,
    logits: np.ndarray,
    models: dict[str, CategoryModel],
    energy_budget: float,
    delay_budget: float,
    aggregate_s: float,
    cfg: SweepConfig,
    rng: np.random.Generator,
    run_rule: str = "hull_argmax",
) -> dict[str, dict[str, float]]:
    """Test accuracy and realised modelled cost per query of every method at one budget pair.

    Each method's entry also holds ``correct``: its per-test-question score in the order of
    ``pool.split == "test"`` (0/1; the random baseline's is the mean over its draws), the input
    of the paired bootstrap. MoE² runs what ``run_rule`` (:func:`gatelab.edge.select.subset_to_run`)
    makes of the selected set. ``selector.min_affordable`` is the fewest experts affordable alone
    in any category (the issue's targets count budgets where at least two fit);
    ``selector.moe2_multi_expert_categories`` counts categories where MoE² runs two or more.
    """
    t = pool.table
    totals = {m: np.zeros(3) for m in METHODS}  # correct, energy, delay summed over test questions
    scores = {m: np.zeros(len(pool.questions)) for m in METHODS}  # per question, test rows used
    feasible_all = True
    stats = {
        "evaluations": 0,
        "feasible_subsets": 0,
        "min_affordable": len(t.experts),
        "moe2_multi_expert_categories": 0,  # categories where MoE² runs more than one expert
    }
    test = pool.split == "test"
    n_test = int(test.sum())
    for c, cm in models.items():
        rows = (pool.category == c) & (pool.split == "test")
        answer = t.answer[rows]
        cons = [
            (energy_cost(cm.energy_j), energy_budget),
            (delay_cost(cm.delay_s, aggregate_s), delay_budget),
        ]
        feasible = _feasible_subsets(cm, cons)

        def add(
            method: str,
            subset: frozenset[int],
            uniform: bool = False,
            weight: float = 1.0,
            rows: np.ndarray = rows,
            answer: np.ndarray = answer,
        ) -> None:
            pred = predict_options(pool, logits, rows, subset, cfg.top_k, uniform)
            energy, delay = realised_costs(pool, rows, subset, aggregate_s)
            totals[method] += weight * np.array([(pred == answer).sum(), energy.sum(), delay.sum()])
            scores[method][rows] += weight * (pred == answer)

        selection = select_subset(len(t.experts), cm.quality, cons)
        stats["evaluations"] += selection.evaluations
        stats["feasible_subsets"] += len(feasible) + 1
        chosen = subset_to_run(run_rule, selection.subset, cm.argmax)
        stats["moe2_multi_expert_categories"] += len(chosen) > 1
        add("moe2", chosen)
        single = select_subset(len(t.experts), cm.quality, [*cons, (len, 1)])
        add("best_single", single.subset)
        greedy: frozenset[int] = frozenset()
        for n in np.argsort(-cm.single_accuracy / np.maximum(cm.energy_j, 1e-12), kind="stable"):
            if all(f(greedy | {int(n)}) <= b for f, b in cons):
                greedy |= {int(n)}
        add("greedy_per_joule", greedy)
        draws = (
            [feasible[i] for i in rng.integers(0, len(feasible), 10)] if feasible else [frozenset()]
        )
        for subset in draws:
            add("random_subset", subset, weight=1 / len(draws))
        everyone = frozenset(range(len(t.experts)))
        feasible_all &= everyone in feasible
        add("all_uniform", everyone, uniform=True)
        singles = [s for s in feasible if len(s) == 1]
        stats["min_affordable"] = min(stats["min_affordable"], len(singles))
        scores["router"][rows] = _route(pool, logits, rows, singles, aggregate_s, totals["router"])
    out = {
        m: {
            "accuracy": v[0] / n_test,
            "energy_j": v[1] / n_test,
            "delay_s": v[2] / n_test,
            "correct": scores[m][test].tolist(),
        }
        for m, v in totals.items()
    }
    if not feasible_all:
        out["all_uniform"]["accuracy"] = math.nan  # over budget: not an option at this point
    out["selector"] = stats
    return out


def _route(
    pool: Pool,
    logits: np.ndarray,
    rows: np.ndarray,
    singles: list,
    aggregate_s: float,
    total: np.ndarray,
) -> np.ndarray:
    """Per-query single-model router: argmax gate logit among affordable experts that answered.

    Adds its correct count and costs to ``total``; returns the per-question correctness.
    """
    t = pool.table
    allowed = np.zeros(len(t.experts), dtype=bool)
    allowed[[next(iter(s)) for s in singles]] = True
    ok = t.available[rows] & allowed  # (N, E)
    choice = np.where(ok, logits[rows], -np.inf).argmax(1)  # (N,)
    has = ok.any(1)
    idx = np.arange(int(rows.sum()))
    pred = np.where(has, t.probs[rows][idx, choice].argmax(-1), -1)
    total += [
        (pred == t.answer[rows]).sum(),
        np.where(has, np.nan_to_num(t.energy_j[rows][idx, choice]), 0).sum(),
        np.where(has, np.nan_to_num(t.delay_s[rows][idx, choice]) + aggregate_s, 0).sum(),
    ]
    return (pred == t.answer[rows]).astype(np.float64)
