r"""Losses between a fitted and a true top-K gated Gaussian MoE (arXiv:2309.13850 §3-4).

* :func:`voronoi_cells` assigns each fitted atom :math:`(\beta_{1i}, a_i, b_i, v_i)` to its
  nearest true atom (Euclidean distance on the concatenated vector).
* :func:`voronoi_loss` is :math:`\mathcal D_1` (exact-specified) or :math:`\mathcal D_2`
  (over-specified): inside a cell with :math:`m > 1` fitted atoms the differences are raised to
  :math:`\bar r(m)` (for :math:`\beta_1, b`) and :math:`\bar r(m)/2` (for :math:`a, v`), with
  :math:`\bar r(2) = 4`, :math:`\bar r(3) = 6` (exponents reconstructed from arXiv:2309.13850).
* :func:`hellinger`, :func:`total_variation` average over inputs the distance between the two
  conditional densities of ``y``, integrated numerically (Gauss-Legendre on a grid adapted to every
  Gaussian component of both models; for total variation the grid also gets the points where the
  densities cross, where ``|p - q|`` has a kink).

The gate is identified only up to a common shift of all ``(beta0_i, beta1_i)``; before comparing,
:func:`align_gate` re-anchors the fitted gate on the true atom its last expert estimates (a no-op
when that is the true last atom), so fits whose experts come out in another order compare fairly.
"""

from __future__ import annotations

import numpy as np
import torch

from gatelab.gmoe.model import GaussianMoE

GRID_HALF_WIDTH = 12.0  # breakpoints reach +-12 sd of every component (tail mass < 1e-32)
GRID_STEPS = 25  # breakpoints per component, i.e. one interval per sd
GAUSS_NODES = 8  # Gauss-Legendre nodes per interval
BISECTIONS = 50  # bisection steps locating where p - q changes sign (total variation)


def _atoms(model: GaussianMoE) -> np.ndarray:
    """Atoms as rows ``(beta1, a, b, var)``, shape (n_experts, 2 d + 2)."""
    return np.column_stack([model.beta1, model.a, model.b, model.var])


def align_gate(fitted: GaussianMoE, true: GaussianMoE) -> GaussianMoE:
    """Re-anchor the fitted gate on the truth's (the gate is identified up to a common shift).

    The fitted last atom (gate ``(0, 0)``) is matched to the nearest true atom ``j`` on the
    anchor-free ``(a, b, var)``; the fitted gate is then shifted by ``beta1*_j`` and so that the
    gate mass of ``j``'s cell equals ``exp(beta0*_j)``. When the fitted last atom is alone in the
    true last atom's cell (the usual case) nothing changes.
    """
    if fitted.n_features != true.n_features:
        raise ValueError(
            f"voronoi_cells: models have {fitted.n_features} and {true.n_features} features"
        )
    free = lambda m: np.column_stack([m.a, m.b, m.var])  # noqa: E731
    nearest = np.linalg.norm(free(fitted)[:, None] - free(true)[None], axis=-1).argmin(1)
    j = nearest[-1]
    cell = nearest == j
    shift0 = true.beta0[j] - np.log(np.exp(fitted.beta0[cell]).sum())
    if fitted.top_k == 1:
        shift0 = 0.0
    beta0 = fitted.beta0 + shift0
    beta1 = fitted.beta1 + true.beta1[j]
    aligned = GaussianMoE(beta0, beta1, fitted.a, fitted.b, fitted.var, fitted.top_k)
    # the constructor re-normalises to the last atom; put the shift back on the stored arrays
    object.__setattr__(aligned, "beta0", beta0)
    object.__setattr__(aligned, "beta1", beta1)
    return aligned


def voronoi_cells(fitted: GaussianMoE, true: GaussianMoE) -> list[np.ndarray]:
    """For each true atom ``j``, the indices of the fitted atoms nearest to it (its cell).

    The fitted gate is first re-anchored with :func:`align_gate`.

    Args:
        fitted: a model with ``k`` experts.
        true: a model with ``k*`` experts and the same number of features.

    Returns:
        A list of ``k*`` int arrays (some possibly empty) partitioning ``range(k)``.
    """
    fitted = align_gate(fitted, true)
    dist = np.linalg.norm(_atoms(fitted)[:, None, :] - _atoms(true)[None, :, :], axis=-1)
    nearest = dist.argmin(1)  # (k,)
    return [np.flatnonzero(nearest == j) for j in range(true.n_experts)]


def voronoi_loss(
    fitted: GaussianMoE,
    true: GaussianMoE,
    kind: str = "exact",
    rbar: dict[int, float] | None = None,
) -> float:
    r"""Voronoi loss :math:`\mathcal D_1` (``kind="exact"``) or :math:`\mathcal D_2` (``"over"``).

    .. math::
        \mathcal D = \sum_j \sum_{i\in A_j} e^{\beta_{0i}}\big(\|\Delta\beta_{1}\|^{r_1}
        + \|\Delta a\|^{r_2} + |\Delta b|^{r_1} + |\Delta v|^{r_2}\big)
        + \sum_j \Big|\sum_{i\in A_j} e^{\beta_{0i}} - e^{\beta^*_{0j}}\Big|

    with :math:`r_1 = r_2 = 1` for :math:`\mathcal D_1` and in single-atom cells, and
    :math:`r_1 = \bar r(|A_j|)`, :math:`r_2 = \bar r(|A_j|)/2` in larger cells of
    :math:`\mathcal D_2`.

    Args:
        fitted: the estimate.
        true: the true model.
        kind: ``"exact"`` or ``"over"``.
        rbar: exponent :math:`\bar r(m)` per cell size ``m``; default ``{2: 4, 3: 6}``.

    Raises:
        ValueError: unknown ``kind``, or a cell size without an exponent in ``rbar``.
    """
    if kind not in ("exact", "over"):
        raise ValueError(f"voronoi_loss: kind must be 'exact' or 'over', got {kind!r}")
    rbar = {2: 4.0, 3: 6.0} if rbar is None else rbar
    cells = voronoi_cells(fitted, true)
    fitted = align_gate(fitted, true)
    total = 0.0
    for j, cell in enumerate(cells):
        m = len(cell)
        r1 = r2 = 1.0
        if kind == "over" and m > 1:
            if m not in rbar:
                raise ValueError(
                    f"voronoi_loss: a cell has {m} fitted atoms but rbar has no exponent for "
                    f"m={m}; pass rbar={{..., {m}: r}} (r >= 7 is the known bound)"
                )
            r1, r2 = float(rbar[m]), float(rbar[m]) / 2
        for i in cell:
            diff = (
                np.linalg.norm(fitted.beta1[i] - true.beta1[j]) ** r1
                + np.linalg.norm(fitted.a[i] - true.a[j]) ** r2
                + abs(fitted.b[i] - true.b[j]) ** r1
                + abs(fitted.var[i] - true.var[j]) ** r2
            )
            total += np.exp(fitted.beta0[i]) * diff
        total += abs(np.exp(fitted.beta0[cell]).sum() - np.exp(true.beta0[j]))
    return float(total)


def _breakpoints(X: np.ndarray, models: tuple[GaussianMoE, ...], device):
    """Per input, sorted breakpoints every sd out to +-12 sd of every component of ``models``.

    Shape:
        X ``(N, D)`` -> x ``(N, D)`` tensor, breaks ``(N, B)``.
    """
    x = torch.as_tensor(X, dtype=torch.float64, device=device)
    centres, scales = [], []
    for model in models:
        p = model.to_params(device)
        centres.append(x @ p.a[0].T + p.b[0])  # (N, E)
        scales.append(p.var[0].sqrt().expand(len(x), -1))  # (N, E)
    mu, sd = torch.cat(centres, 1), torch.cat(scales, 1)  # (N, C)
    steps = torch.linspace(-GRID_HALF_WIDTH, GRID_HALF_WIDTH, GRID_STEPS, dtype=x.dtype)
    breaks = (mu[:, :, None] + sd[:, :, None] * steps.to(device)).reshape(len(x), -1)
    return x, torch.sort(breaks, dim=1).values  # (N, B)


def _quadrature(breaks: torch.Tensor):
    """Gauss-Legendre nodes ``y`` and weights ``w`` ``(N, M)`` on the intervals of ``breaks``."""
    lo, hi = breaks[:, :-1], breaks[:, 1:]  # (N, B-1)
    nodes, weights = np.polynomial.legendre.leggauss(GAUSS_NODES)
    nodes = torch.as_tensor(nodes, device=breaks.device)
    weights = torch.as_tensor(weights, device=breaks.device)
    half = (hi - lo)[..., None] / 2  # (N, B-1, 1)
    y = (lo[..., None] + half * (nodes + 1)).reshape(len(breaks), -1)  # (N, M)
    return y, (half * weights).reshape(len(breaks), -1)


def _add_crossings(p, q, x: torch.Tensor, breaks: torch.Tensor) -> torch.Tensor:
    """Add the points where ``p - q`` changes sign, found by bisection.

    ``|p - q|`` is then smooth on every interval, so Gauss-Legendre stays accurate (a kink inside
    an interval would cost ~1e-4).
    """
    lo, hi = breaks[:, :-1].clone(), breaks[:, 1:].clone()  # (N, B-1)
    f_lo = _densities(p, x, lo) - _densities(q, x, lo)
    f_hi = _densities(p, x, hi) - _densities(q, x, hi)
    change = (f_lo * f_hi) < 0  # (N, B-1)
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2
        f_mid = _densities(p, x, mid) - _densities(q, x, mid)
        left = (f_lo * f_mid) <= 0  # the root lies in [lo, mid]
        hi = torch.where(left, mid, hi)
        lo = torch.where(left, lo, mid)
        f_lo = torch.where(left, f_lo, f_mid)
    roots = torch.where(change, (lo + hi) / 2, breaks[:, :-1])  # duplicates add empty intervals
    return torch.sort(torch.cat([breaks, roots], dim=1), dim=1).values


def _densities(model: GaussianMoE, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``p(y_{nm} | x_n)`` on a grid ``y`` of shape (N, M)."""
    weights, indices = model.gate(x, x.device)  # (N, K)
    p = model.to_params(x.device)
    mean = torch.gather(x @ p.a[0].T + p.b[0], 1, indices)  # (N, K)
    var = p.var[0][indices]  # (N, K)
    dens = torch.exp(-0.5 * (y[:, :, None] - mean[:, None]) ** 2 / var[:, None])  # (N, M, K)
    return (dens * (weights / torch.sqrt(2 * torch.pi * var))[:, None]).sum(-1)


def _distance(p: GaussianMoE, q: GaussianMoE, X, kind: str, device) -> float:
    if p.n_features != q.n_features:
        raise ValueError(f"models have {p.n_features} and {q.n_features} features")
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != p.n_features:
        raise ValueError(f"X must have shape (n_samples, {p.n_features}), got {X.shape}")
    x, breaks = _breakpoints(X, (p, q), device)
    if kind == "tv":
        breaks = _add_crossings(p, q, x, breaks)
    y, w = _quadrature(breaks)
    fp, fq = _densities(p, x, y), _densities(q, x, y)
    if kind == "hellinger":
        h2 = 0.5 * (w * (fp.sqrt() - fq.sqrt()) ** 2).sum(1)
        return float(h2.clamp_min(0).sqrt().mean())
    return float((0.5 * (w * (fp - fq).abs()).sum(1)).mean())


def hellinger(p: GaussianMoE, q: GaussianMoE, X, device="cpu") -> float:
    r"""Mean Hellinger distance :math:`\frac1N\sum_n h(p(\cdot|x_n), q(\cdot|x_n))`.

    :math:`h^2(f, g) = \frac12\int(\sqrt f - \sqrt g)^2\,dy`, so ``0 <= h <= 1``.

    Args:
        p: first model.
        q: second model.
        X: inputs to average over, array-like of shape (n_samples, n_features).
        device: torch device.
    """
    return _distance(p, q, X, "hellinger", device)


def total_variation(p: GaussianMoE, q: GaussianMoE, X, device="cpu") -> float:
    r"""Mean total variation :math:`\frac1N\sum_n \frac12\int|p(y|x_n) - q(y|x_n)|\,dy`.

    Args:
        p: first model.
        q: second model.
        X: inputs to average over, array-like of shape (n_samples, n_features).
        device: torch device.
    """
    return _distance(p, q, X, "tv", device)
