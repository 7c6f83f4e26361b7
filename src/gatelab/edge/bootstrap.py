r"""Paired bootstrap intervals for the difference of two methods on the same test questions.

Two methods ``a`` and ``b`` are scored on the same ``n`` questions (accuracy 0/1, or any
per-question score such as the mean correctness of a randomised method). The statistic is the
mean paired difference :math:`\bar d = \frac1n \sum_i (a_i - b_i)`. Resampling *questions* with
replacement, :math:`\bar d^{*r} = \frac1n \sum_i c^{r}_i d_i` with :math:`c^r` the multiplicities
of resample ``r``, keeps each question's two outcomes together (pairing: their correlation, both
methods failing on the hard questions, cancels out of the variance). The 95% interval is the
2.5% and 97.5% percentiles of :math:`\bar d^{*}` (Efron & Tibshirani 1993, *An Introduction to the
Bootstrap*, ch. 13; for NLP evaluation see Berg-Kirkpatrick et al. 2012, ACL, "An Empirical
Investigation of Statistical Significance in NLP").

Over several budgets ``B`` the outcomes are ``(B, n)``: one set of question resamples serves every
budget, so the per-budget intervals and the interval of the difference averaged over budgets,
:math:`\frac1B \sum_b \bar d_b`, all come from the same draws (pairing across budgets: a question
that is hard at one budget is hard at all of them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

RESAMPLES = 10_000  # percentiles of 10k resamples move by ~0.1 point between seeds
CHUNK = 1 << 21  # question draws processed at once (bounds memory at ~16 MB per array)


@dataclass(frozen=True)
class Interval:
    """A mean paired difference and its bootstrap percentile interval."""

    mean: float  # observed mean of a - b
    low: float
    high: float
    n: int  # questions
    resamples: int
    confidence: float

    def to_dict(self) -> dict:
        """Plain floats and ints, for JSON."""
        return asdict(self)

    def describe(self, scale: float = 100.0) -> str:
        """``+3.1 [-1.2, +7.5]`` (points of accuracy by default)."""
        m, lo, hi = (scale * v for v in (self.mean, self.low, self.high))
        return f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def _outcomes(name: str, values, ndim: int) -> np.ndarray:
    """``values`` as a float array of ``ndim`` dimensions, non-empty and finite, or ValueError."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim:
        shape = "(n,)" if ndim == 1 else "(budgets, n)"
        raise ValueError(f"{name}: expected shape {shape}, got {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name}: empty (no questions)")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise ValueError(f"{name}: contains NaN or inf ({bad} values)")
    return array


def _check(a, b, ndim: int, resamples: int, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    a, b = _outcomes("a", a, ndim), _outcomes("b", b, ndim)
    if a.shape != b.shape:
        raise ValueError(f"a and b: shapes differ, {a.shape} vs {b.shape} (pair the questions)")
    if isinstance(resamples, bool) or not isinstance(resamples, int | np.integer) or resamples < 1:
        raise ValueError(f"resamples: need an integer >= 1, got {resamples!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: need 0 < confidence < 1, got {confidence!r}")
    return a, b


def resample_indices(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Question indices ``(resamples, n)``, each row ``n`` draws with replacement (one call)."""
    return rng.integers(0, n, size=(resamples, n))


def resampled_means(diff: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Mean of ``diff (B, n)`` over each resample of ``indices (R, n)``: ``(R, B)``.

    Vectorised as multiplicities times differences, ``counts (R, n) @ diff.T / n``, in chunks of
    resamples so that memory stays bounded for thousands of questions.
    """
    n_resamples, n = indices.shape
    rows = max(1, CHUNK // n)
    out = np.empty((n_resamples, diff.shape[0]))
    for start in range(0, n_resamples, rows):
        block = indices[start : start + rows]  # (r, n)
        offsets = np.arange(block.shape[0])[:, None] * n
        counts = np.bincount((block + offsets).ravel(), minlength=block.size)
        out[start : start + rows] = counts.reshape(block.shape) @ diff.T / n
    return out


def _interval(mean: float, means: np.ndarray, n: int, confidence: float) -> Interval:
    alpha = 1 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Interval(float(mean), float(low), float(high), n, len(means), confidence)


def paired_bootstrap(
    a,
    b,
    rng: np.random.Generator,
    resamples: int = RESAMPLES,
    confidence: float = 0.95,
) -> Interval:
    """Percentile interval of ``mean(a - b)`` over question resamples (module doc).

    Args:
        a: per-question outcomes ``(n,)`` of the first method.
        b: the second method's outcomes on the same questions, in the same order.
        rng: draws the resamples (``np.random.default_rng(seed)``).
        resamples: bootstrap resamples of the questions.
        confidence: coverage of the percentile interval.

    Raises:
        ValueError: empty, NaN/inf, shapes that differ, or bad ``resamples``/``confidence``; the
            message names the argument.
    """
    a, b = _check(a, b, 1, resamples, confidence)
    diff = (a - b)[None]  # (1, n)
    means = resampled_means(diff, resample_indices(a.size, resamples, rng))[:, 0]
    return _interval(float(diff.mean()), means, a.size, confidence)


def paired_bootstrap_budgets(
    a,
    b,
    rng: np.random.Generator,
    resamples: int = RESAMPLES,
    confidence: float = 0.95,
) -> tuple[list[Interval], Interval]:
    """Per-budget intervals and the interval of the difference averaged over budgets.

    Args:
        a: outcomes ``(B, n)`` of the first method: row ``k`` holds every test question at
            budget ``k``, in one order shared by all rows (resampled once for all budgets).
        b: the second method's outcomes, same shape and order.
        rng: draws the resamples.
        resamples: bootstrap resamples of the questions.
        confidence: coverage of the percentile intervals.

    Returns:
        ``B`` intervals, one per budget, and the interval of ``mean_b mean_i (a - b)``.

    Raises:
        ValueError: as :func:`paired_bootstrap`.
    """
    a, b = _check(a, b, 2, resamples, confidence)
    diff = a - b  # (B, n)
    means = resampled_means(diff, resample_indices(a.shape[1], resamples, rng))  # (R, B)
    n = a.shape[1]
    per_budget = [
        _interval(float(d.mean()), m, n, confidence) for d, m in zip(diff, means.T, strict=True)
    ]
    return per_budget, _interval(float(diff.mean()), means.mean(1), n, confidence)
