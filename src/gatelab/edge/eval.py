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

from gatelab.edge.client import DEFAULT_NORMALIZE
from gatelab.edge.collect import AnswerTable, load_answers, read_cache
from gatelab.edge.data import MCQuestion, generate_suite, load_mmlu, split_questions
from gatelab.edge.experts import DEFAULT_POOL
from gatelab.edge.model import EdgeGate, embed_texts, mixture, mixture_nll, subset_mask
from gatelab.edge.select import delay_cost, energy_cost, monotone_hull, select_subset
from gatelab.edge.train import GateData


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

    def __post_init__(self) -> None:
        if self.n_generated < 1 or self.n_quick < 3 or self.top_k < 1 or self.n_budgets < 2:
            raise ValueError(
                "SweepConfig: need n_generated >= 1, n_quick >= 3, top_k >= 1, n_budgets >= 2"
            )


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
    splits = split_questions(questions, seed=cfg.seed)
    where = {q.qid: name for name, items in splits.items() for q in items}
    split = np.array([where[q.qid] for q in questions])
    return Pool(questions, table, x, split, np.array([q.category for q in questions]))


def gate_outputs(gate: EdgeGate, pool: Pool) -> np.ndarray:
    """Gate logits ``(N, E)`` of every question of the pool."""
    with torch.no_grad():
        return gate(torch.as_tensor(pool.x, dtype=torch.float64)).numpy()  # (N, E)


def _predict(
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


def _realised(
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
    quality: Callable[[frozenset[int]], float]  # monotone hull of -validation NLL
    argmax: dict[frozenset[int], frozenset[int]]  # hull argmax: the subset actually run
    base_quality: Callable[[frozenset[int]], float]  # -validation NLL of exactly S


def category_models(pool: Pool, logits: np.ndarray, top_k: int) -> dict[str, CategoryModel]:
    """Costs and the validation quality ``q(S) = -NLL`` of the gate restricted to ``S``."""
    t, models = pool.table, {}
    for c in sorted(set(pool.category)):
        fit = (pool.category == c) & (pool.split != "test")
        val = (pool.category == c) & (pool.split == "val")
        probs, avail = torch.as_tensor(t.probs[val]), torch.as_tensor(t.available[val])
        answer, val_logits = torch.as_tensor(t.answer[val]), torch.as_tensor(logits[val])

        def base(
            subset: frozenset[int], probs=probs, avail=avail, answer=answer, lg=val_logits
        ) -> float:
            if not subset:
                return -math.inf  # running nothing gives no answer
            mixed, _ = mixture(lg, probs, avail & subset_mask(subset, len(t.experts)), top_k)
            return -float(mixture_nll(mixed, answer))

        quality, argmax = monotone_hull(base)
        single = (t.probs[val].argmax(-1) == t.answer[val][:, None]).mean(0)
        energy = np.nanmean(t.energy_j[fit], axis=0)
        delay = np.nanmean(t.delay_s[fit], axis=0)
        models[c] = CategoryModel(energy, delay, single, quality, argmax, base)
    return models


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
) -> dict[str, dict[str, float]]:
    """Test accuracy and realised modelled cost per query of every method at one budget pair."""
    t = pool.table
    totals = {m: np.zeros(3) for m in METHODS}  # correct, energy, delay summed over test questions
    feasible_all = True
    stats = {"evaluations": 0, "feasible_subsets": 0}
    n_test = int((pool.split == "test").sum())
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
            pred = _predict(pool, logits, rows, subset, cfg.top_k, uniform)
            energy, delay = _realised(pool, rows, subset, aggregate_s)
            totals[method] += weight * np.array([(pred == answer).sum(), energy.sum(), delay.sum()])

        selection = select_subset(len(t.experts), cm.quality, cons)
        stats["evaluations"] += selection.evaluations
        stats["feasible_subsets"] += len(feasible) + 1
        add("moe2", cm.argmax.get(selection.subset, selection.subset))
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
        _route(
            pool, logits, rows, [s for s in feasible if len(s) == 1], aggregate_s, totals["router"]
        )
    out = {
        m: {"accuracy": v[0] / n_test, "energy_j": v[1] / n_test, "delay_s": v[2] / n_test}
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
) -> None:
    """Per-query single-model router: argmax gate logit among affordable experts that answered."""
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
