r"""Exact subset selection under monotone budgets: discrete monotonic optimisation.

Problem (MoE², arXiv:2501.09410): maximise an increasing set function :math:`q(S)` over
:math:`S \subseteq \{0, \dots, n-1\}` subject to :math:`g_j(S) \le b_j` with every :math:`g_j`
non-decreasing. Because the constraints are increasing, the feasible family is *normal*
(down-closed), and because :math:`q` is increasing the optimum is attained on its upper boundary.

Algorithm — branch-reduce-and-bound on boxes :math:`[I, U] = \{S : I \subseteq S \subseteq U\}`
(the discrete form of Tuy, Minoux & Hoai-Phuong 2006, "Discrete monotonic optimization with
application to a discrete location problem", SIAM J. Optim. 17(1)):

- **reduce**: drop from ``U`` every item ``j`` for which ``I + {j}`` is infeasible (no feasible
  set in the box can contain it, as the constraints are increasing); if ``I`` itself is
  infeasible the box is empty.
- **bound**: :math:`q(U)` bounds every set in the box from above (monotonicity). If ``U`` is
  feasible it is the best set of its box: record it, do not branch. If the bound cannot beat the
  incumbent, prune.
- **branch**: on a free item ``j`` (largest relative cost first): box ``[I + {j}, U]`` first
  (dives to good incumbents), then ``[I, U - {j}]``.

Each ``q`` value is computed once (memoised), so ``evaluations`` counts distinct subsets. The
result equals brute-force enumeration of all feasible subsets whenever ``q`` is non-decreasing
(tests check hundreds of random instances); the empty set is returned when nothing else fits.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

Quality = Callable[[frozenset[int]], float]
CostFn = Callable[[frozenset[int]], float]


@dataclass(frozen=True)
class Selection:
    """The result of :func:`select_subset`.

    Attributes:
        subset: the chosen feasible subset.
        quality: its quality.
        evaluations: distinct calls made to ``quality``.
        nodes: boxes visited by branch-reduce-and-bound.
    """

    subset: frozenset[int]
    quality: float
    evaluations: int
    nodes: int


def _check(n_items: int, quality: Quality, constraints: Sequence[tuple[CostFn, float]]) -> None:
    if isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 0:
        raise ValueError(f"n_items must be an integer >= 0, got {n_items!r}")
    if not callable(quality):
        raise TypeError(f"quality must be a callable set function, got {type(quality).__name__}")
    if isinstance(constraints, str | bytes) or not isinstance(constraints, Sequence):
        raise TypeError(
            f"constraints must be a sequence of (cost_fn, budget) pairs, "
            f"got {type(constraints).__name__}"
        )
    for i, pair in enumerate(constraints):
        if not isinstance(pair, Sequence) or len(pair) != 2 or not callable(pair[0]):
            raise TypeError(f"constraints[{i}] must be a (cost_fn, budget) pair")
        budget = pair[1]
        if isinstance(budget, bool) or not isinstance(budget, int | float | np.number):
            raise TypeError(f"constraints[{i}]: budget must be a number, got {budget!r}")
        if not np.isfinite(budget) and budget != np.inf or budget < 0:
            raise ValueError(f"constraints[{i}]: budget must be >= 0 (or inf), got {budget}")


WARN_ITEMS = 16  # above this many items the worst case (2^n subsets) takes noticeable time


def _check_size(n_items: int, max_items: int) -> None:
    """Refuse ``n_items`` above ``max_items``; warn above ``WARN_ITEMS`` (2^n worst case)."""
    if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 0:
        raise ValueError(f"max_items must be an integer >= 0, got {max_items!r}")
    if n_items > max_items:
        raise ValueError(
            f"n_items={n_items} exceeds max_items={max_items}: the search may visit 2^{n_items} "
            "subsets; pass a larger max_items to allow it"
        )
    if n_items > WARN_ITEMS:
        warnings.warn(f"subset search over {n_items} items may visit up to 2^{n_items} subsets",
                      stacklevel=3)  # fmt: skip


def _checked_quality(quality: Quality) -> tuple[Quality, dict[frozenset[int], float]]:
    """``quality`` memoised, its every value checked to be a number and not NaN."""
    memo: dict[frozenset[int], float] = {}

    def q(subset: frozenset[int]) -> float:
        if subset not in memo:
            value = quality(subset)
            if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                raise TypeError(f"quality({sorted(subset)}) must be a number, got {value!r}")
            value = float(value)
            if math.isnan(value):
                raise ValueError(f"quality({sorted(subset)}) is NaN")
            memo[subset] = value
        return memo[subset]

    return q, memo


def _checked_cost(constraints: Sequence[tuple[CostFn, float]], i: int, subset) -> float:
    """The ``i``-th constraint's cost of ``subset``, checked to be a number and not NaN."""
    value = constraints[i][0](subset)
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise TypeError(f"constraints[{i}]: cost of {sorted(subset)} must be a number")
    if value != value:  # NaN compares false with everything: it would pass silently
        raise ValueError(f"constraints[{i}]: cost of {sorted(subset)} is NaN")
    return value


def select_subset(
    n_items: int,
    quality: Quality,
    constraints: Sequence[tuple[CostFn, float]],
    max_items: int = 20,
) -> Selection:
    """The feasible subset of maximum quality, found by branch-reduce-and-bound (module doc).

    Args:
        n_items: items are ``0 .. n_items-1``.
        quality: non-decreasing set function ``frozenset[int] -> float``.
        constraints: ``(cost_fn, budget)`` pairs, each ``cost_fn`` non-decreasing; feasible means
            ``cost_fn(S) <= budget`` for all pairs.
        max_items: refuse larger ``n_items`` (the worst case visits 2^n subsets); a warning is
            given above ``WARN_ITEMS``.

    Returns:
        :class:`Selection`; ties are broken towards the set found first.

    Raises:
        ValueError: negative budgets, a bad ``n_items`` or one above ``max_items``, or a NaN
            quality or cost.
        TypeError: a constraint is not a ``(callable, number)`` pair.
    """
    _check(n_items, quality, constraints)
    _check_size(n_items, max_items)
    q, memo = _checked_quality(quality)

    def cost(i: int, subset: frozenset[int]) -> float:
        return _checked_cost(constraints, i, subset)

    def feasible(subset: frozenset[int]) -> bool:
        return all(cost(i, subset) <= budget for i, (_, budget) in enumerate(constraints))

    def share(j: int) -> float:  # how much of the tightest budget item j uses alone
        single = frozenset([j])
        return max(
            (
                cost(i, single) / b if b > 0 else np.inf
                for i, (_, b) in enumerate(constraints)
                if b < np.inf
            ),
            default=0.0,
        )

    empty = frozenset()
    best, best_q = empty, None
    order = {j: share(j) for j in range(n_items)}
    stack = [(empty, frozenset(range(n_items)))]
    nodes = 0
    while stack:
        inside, upper = stack.pop()
        nodes += 1
        if not feasible(inside):
            continue
        upper = frozenset(j for j in upper if j in inside or feasible(inside | {j}))  # reduce
        if best_q is not None and q(upper) <= best_q:
            continue  # bound: nothing in [inside, upper] beats the incumbent
        if feasible(upper):
            best, best_q = upper, q(upper)
            continue
        free = sorted(upper - inside, key=lambda j: (-order[j], j))
        j = free[0]  # upper infeasible and inside feasible, so a free item exists
        stack.append((inside, upper - {j}))  # explored second
        stack.append((inside | {j}, upper))  # explored first
    if best_q is None:  # only when nothing, not even the empty set, is feasible
        best_q = q(empty)
    return Selection(best, best_q, len(memo), nodes)


def brute_force_subset(
    n_items: int,
    quality: Quality,
    constraints: Sequence[tuple[CostFn, float]],
    max_items: int = 20,
) -> Selection:
    """Enumerate every feasible subset (the naive baseline; exponential in ``n_items``).

    Checks its arguments, quality and cost values like :func:`select_subset`.
    """
    _check(n_items, quality, constraints)
    _check_size(n_items, max_items)
    q, _ = _checked_quality(quality)
    best, best_q, calls = frozenset(), None, 0
    for size in range(n_items + 1):
        for combo in combinations(range(n_items), size):
            subset = frozenset(combo)
            if all(_checked_cost(constraints, i, subset) <= budget
                   for i, (_, budget) in enumerate(constraints)):  # fmt: skip
                value = q(subset)
                calls += 1
                if best_q is None or value > best_q:
                    best, best_q = subset, value
    return Selection(best, best_q if best_q is not None else q(best), calls, calls)


def _per_item(values: Sequence[float], name: str) -> list[float]:
    """Per-expert costs as floats, each finite and >= 0, named ``name[i]`` when not."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}")
    return [_non_negative(value, f"{name}[{i}]") for i, value in enumerate(values)]


def _non_negative(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return float(value)


def energy_cost(energy_j: Sequence[float]) -> CostFn:
    """``energy(S) = sum_{n in S} e_n`` (experts each spend their own energy)."""
    values = _per_item(energy_j, "energy_j")
    return lambda subset: float(sum(values[n] for n in subset))


def delay_cost(delay_s: Sequence[float], aggregate_s: float = 0.0) -> CostFn:
    """``delay(S) = max_{n in S} d_n + t_aggregate`` (experts run in parallel); 0 when empty."""
    values = _per_item(delay_s, "delay_s")
    aggregate_s = _non_negative(aggregate_s, "aggregate_s")
    return lambda subset: max(values[n] for n in subset) + aggregate_s if subset else 0.0


def monotone_hull(quality: Quality) -> tuple[Quality, dict[frozenset[int], frozenset[int]]]:
    r"""``q̃(S) = max_{T ⊆ S} q(T)``: the best any gate could do by ignoring experts in ``S``.

    Returns the hull (non-decreasing by construction) and a dict filled lazily with the argmax
    ``T`` of each evaluated ``S``. Costs ``2^|S|`` calls of ``q`` per ``S`` (memoised): meant for
    the handful of experts of MoE², not for large pools.
    """
    cache: dict[frozenset[int], float] = {}
    argmax: dict[frozenset[int], frozenset[int]] = {}

    def base(subset: frozenset[int]) -> float:
        if subset not in cache:
            cache[subset] = float(quality(subset))
        return cache[subset]

    def hull(subset: frozenset[int]) -> float:
        items = sorted(subset)
        best_t, best_v = frozenset(), base(frozenset())
        for size in range(1, len(items) + 1):
            for combo in combinations(items, size):
                value = base(frozenset(combo))
                if value > best_v:
                    best_t, best_v = frozenset(combo), value
        argmax[subset] = best_t
        return best_v

    return hull, argmax


RUN_RULES = ("hull_argmax", "selected_set")


def subset_to_run(
    rule: str, selected: frozenset[int], argmax: dict[frozenset[int], frozenset[int]]
) -> frozenset[int]:
    r"""The experts to run once :func:`select_subset` has chosen ``selected`` on the hull.

    ``hull_argmax``: the ``T ⊆ selected`` whose own estimate is best (``argmax`` of
    :func:`monotone_hull`), trusting the estimate subset by subset. ``selected_set``: ``selected``
    itself, trusting MoE²'s property (arXiv:2501.09410 §III) that the quality of a gate trained
    on all experts never drops when more of them are allowed, so that the estimate's dips below
    the hull are noise. :func:`gatelab.edge.run_rule.choose_run_rule` picks one on non-test data.
    """
    if rule == "hull_argmax":
        return argmax.get(selected, selected)
    if rule == "selected_set":
        return selected
    raise ValueError(f"run rule must be one of {RUN_RULES}, got {rule!r}")
