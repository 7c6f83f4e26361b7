r"""One vocabulary for budgets: what a gated computation costs and how quality trades against it.

- :class:`Cost` — FLOPs, seconds, joules and messages; any may be absent; costs add up.
- :func:`pareto_front` — the non-dominated (cost, quality) points.
- :func:`area_under_tradeoff` — normalised area under the non-decreasing convex hull of the
  cost-quality points, RouterBench's AIQ (Hu et al. 2024, arXiv:2403.12031 §3.2).
- :func:`count_flops` — FLOPs of one call, counted by ``torch.utils.flop_counter``.
- :func:`plot_tradeoff` — quality-vs-cost curves of several methods on one figure.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

import numpy as np
import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

_FIELDS = ("flops", "seconds", "joules", "messages")


@dataclass(frozen=True)
class Cost:
    """The cost of some computation. A field left ``None`` is not tracked.

    Addition is field-wise; a field absent on both sides stays absent, a field present on one
    side keeps that side's value (an untracked cost contributes nothing). ``sum(costs)`` works.

    Example:
        >>> Cost(flops=2e9, seconds=0.1) + Cost(seconds=0.2, joules=3.0)
        Cost(flops=2000000000.0, seconds=0.30000000000000004, joules=3.0, messages=None)
    """

    flops: float | None = None
    seconds: float | None = None
    joules: float | None = None
    messages: float | None = None

    def __post_init__(self) -> None:
        for name in _FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, Real):
                raise TypeError(f"Cost.{name} must be a number or None, got {type(value).__name__}")
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"Cost.{name} must be a finite number >= 0, got {value}")

    def __add__(self, other: Cost) -> Cost:
        if not isinstance(other, Cost):
            return NotImplemented
        merged = {}
        for name in _FIELDS:
            mine, theirs = getattr(self, name), getattr(other, name)
            merged[name] = mine if theirs is None else theirs if mine is None else mine + theirs
        return Cost(**merged)

    def __radd__(self, other: object) -> Cost:
        if other == 0:  # lets the built-in sum() start from 0
            return self
        return NotImplemented

    def __mul__(self, factor: float) -> Cost:
        if isinstance(factor, bool) or not isinstance(factor, Real):
            raise TypeError(f"factor must be a number, got {type(factor).__name__}")
        if not (math.isfinite(factor) and factor >= 0):
            raise ValueError(f"factor must be a finite number >= 0, got {factor}")
        return Cost(**{k: None if v is None else v * factor for k, v in self.as_dict().items()})

    __rmul__ = __mul__

    def as_dict(self) -> dict[str, float | None]:
        """The four fields as a plain dict (JSON-ready)."""
        return dataclasses.asdict(self)

    def within(self, budget: Cost) -> bool:
        """True when every field the budget sets is tracked here and no larger than the budget."""
        if not isinstance(budget, Cost):
            raise TypeError(f"budget must be a Cost, got {type(budget).__name__}")
        for name in _FIELDS:
            limit, value = getattr(budget, name), getattr(self, name)
            if limit is not None and (value is None or value > limit):
                return False
        return True


def _as_points(points: Sequence[Sequence[float]] | np.ndarray, name: str = "points") -> np.ndarray:
    """``points`` as a float ``(n, 2)`` array, ``n >= 1``, all finite; errors name ``name``."""
    if isinstance(points, str | bytes | Mapping) or points is None:
        raise TypeError(
            f"{name} must be an (n, 2) array of (cost, quality), got {type(points).__name__}"
        )
    try:
        array = np.asarray(points, dtype=float)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"{name} must be an (n, 2) array of (cost, quality) numbers ({error})"
        ) from None
    if array.ndim != 2 or array.shape[1] != 2 or len(array) == 0:
        raise ValueError(
            f"{name} must be a non-empty (n, 2) array of (cost, quality), got shape {array.shape}"
        )
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return array


def pareto_front(points: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Indices of the Pareto-optimal points (lower cost, higher quality), sorted by cost.

    A point is dominated when another costs no more and achieves strictly more, or costs strictly
    less and achieves as much. Of exact duplicates the first is kept.

    Shape:
        points ``(N, 2)`` of (cost, quality) -> indices ``(M,)``.
    """
    array = _as_points(points)
    order = np.lexsort((-array[:, 1], array[:, 0]))  # by cost, then best quality first
    front, best = [], -np.inf
    for i in order:
        if array[i, 1] > best:
            front.append(i)
            best = array[i, 1]
    return np.asarray(front, dtype=int)


def _upper_hull(xy: np.ndarray) -> np.ndarray:
    """Upper concave envelope of points sorted by x (Andrew's monotone chain)."""
    hull: list[np.ndarray] = []
    for p in xy:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:
                hull.pop()  # hull[-1] lies on or below the chord: not on the envelope
            else:
                break
        hull.append(p)
    return np.asarray(hull)


def area_under_tradeoff(
    points: Sequence[Sequence[float]] | np.ndarray, cost_range: tuple[float, float] | None = None
) -> float:
    r"""Normalised area under the non-decreasing convex hull of (cost, quality) points.

    .. math::
        \text{AIQ} = \frac{1}{c_\max - c_\min} \int_{c_\min}^{c_\max} \hat q(c)\, dc

    where :math:`\hat q` is the upper concave envelope of the Pareto points, held flat after its
    maximum (spending more never has to hurt) and zero below the cheapest point (the method cannot
    run there). Mixing two operating points at random realises any point on their chord, so the
    hull is achievable (RouterBench AIQ, arXiv:2403.12031 §3.2). Pass one common ``cost_range`` to
    compare methods; by default it is the points' own range. A single point, or a zero-width range,
    gives the hull's value at that cost.
    """
    array = _as_points(points)
    if cost_range is None:
        lo, hi = array[:, 0].min(), array[:, 0].max()
    else:
        lo, hi = _check_range(cost_range)
    front = array[pareto_front(array)]
    hull = _upper_hull(front)
    peak = int(np.argmax(hull[:, 1]))
    hull = hull[: peak + 1]  # non-decreasing part; after the peak the curve stays flat

    if hi == lo:
        return 0.0 if lo < hull[0, 0] else float(np.interp(lo, hull[:, 0], hull[:, 1]))
    # Zero below the cheapest point; piecewise linear between hull vertices, flat after the last:
    # the trapezoid rule on the vertices is exact.
    start = max(lo, hull[0, 0])
    if start >= hi:
        return 0.0
    inside = hull[(hull[:, 0] > start) & (hull[:, 0] < hi), 0]
    knots = np.concatenate([[start], inside, [hi]])
    area = np.trapezoid(np.interp(knots, hull[:, 0], hull[:, 1]), knots)
    return float(area / (hi - lo))


def _check_range(cost_range: object) -> tuple[float, float]:
    """``cost_range`` as ``(low, high)``: two finite numbers with ``low <= high``."""
    if isinstance(cost_range, str | bytes) or not isinstance(cost_range, Sequence | np.ndarray):
        raise TypeError(
            f"cost_range must be a (low, high) pair or None, got {type(cost_range).__name__}"
        )
    if len(cost_range) != 2:
        raise ValueError(f"cost_range must be a (low, high) pair, got {len(cost_range)} values")
    if any(isinstance(v, bool) or not isinstance(v, Real) for v in cost_range):
        raise TypeError(f"cost_range must hold two numbers, got {cost_range!r}")
    lo, hi = float(cost_range[0]), float(cost_range[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"cost_range must be (low, high), finite, low <= high, got {cost_range}")
    return lo, hi


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_bwd_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
):
    return flop_counter.sdpa_backward_flop_count(
        grad_out_shape, query_shape, key_shape, value_shape
    )


def flop_counter_mode() -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts the CPU fused attention kernel.

    torch 2.13 dispatches ``scaled_dot_product_attention`` on CPU to
    ``_scaled_dot_product_flash_attention_for_cpu``, which its counter does not know: attention
    would silently count as zero FLOPs (the undercount of JEI-DNN's public FLOP counter).
    """
    aten = torch.ops.aten
    return FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_bwd_flops,
        },
    )


def count_flops(fn: Callable[..., object], *args: object, **kwargs: object) -> int:
    """FLOPs of one call ``fn(*args, **kwargs)`` under :func:`flop_counter_mode`, without grad.

    A multiply-add counts as two FLOPs; matmuls, convolutions and attention are counted with all
    their token dimensions. Elementwise ops are not counted (they are a rounding error next to
    matmuls and torch does not count them).

    Raises:
        TypeError: ``fn`` is not callable.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    with flop_counter_mode() as counter, torch.no_grad():
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def plot_tradeoff(
    curves: Mapping[str, Sequence[Sequence[float]] | np.ndarray],
    path: str | Path,
    *,
    xlabel: str = "cost",
    ylabel: str = "quality",
    title: str | None = None,
    hull: bool = False,
    logx: bool = False,
) -> Path:
    """Plot quality against cost for several methods on one figure and save it as PNG.

    Args:
        curves: method name -> points ``(N, 2)`` of (cost, quality).
        path: output file (its folder is created).
        xlabel: x-axis label, with its unit.
        ylabel: y-axis label.
        title: optional figure title.
        hull: also draw each method's Pareto front as a step line.
        logx: logarithmic cost axis (for budgets on a geometric grid).

    Returns:
        The path written.

    Raises:
        TypeError: ``curves`` is not a mapping of names to points, or ``path`` not a path.
        ValueError: ``curves`` is empty or a curve's points are not a finite ``(n, 2)`` array.
    """
    if not isinstance(curves, Mapping):
        raise TypeError(f"curves must map method names to points, got {type(curves).__name__}")
    if not curves:
        raise ValueError("curves must hold at least one method")
    arrays = {name: _as_points(points, f"curves[{name!r}]") for name, points in curves.items()}
    if not isinstance(path, str | Path):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    markers = "osD^v<>pP*X"
    for i, (name, array) in enumerate(arrays.items()):
        array = array[np.argsort(array[:, 0], kind="stable")]
        (line,) = ax.plot(
            array[:, 0], array[:, 1], marker=markers[i % len(markers)], ms=4, label=name
        )
        if hull:
            front = array[pareto_front(array)]
            ax.step(front[:, 0], front[:, 1], where="post", color=line.get_color(), alpha=0.4)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
