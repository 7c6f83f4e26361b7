r"""The top-K sparse softmax gating Gaussian mixture of experts (Nguyen et al., ICLR 2024).

.. math::
    p(y \mid x) = \sum_{i \in S_K(x)} w_i(x)\, \mathcal N(y;\ a_i^\top x + b_i,\ v_i),\qquad
    S_K(x) = \operatorname{top}_K(\beta_1^\top x),\qquad
    w_i(x) = \frac{\exp(\beta_{1i}^\top x + \beta_{0i})}{\sum_{j\in S_K(x)}
                   \exp(\beta_{1j}^\top x + \beta_{0j})}

(arXiv:2309.13850 Eq. 1). The selection uses the slopes :math:`\beta_1` only and the intercepts
:math:`\beta_0` enter after selection (:func:`gatelab.gates.topk_softmax`). ``v`` are variances.

Identifiability: the density is unchanged by a common shift of all :math:`(\beta_{0i}, \beta_{1i})`,
so :class:`GaussianMoE` stores the gate normalised to the last expert's gate being ``(0, 0)``.
With ``top_k == 1`` each input uses one expert with weight one, so :math:`\beta_0` drops out of the
density entirely; it is stored as zeros (arXiv:2309.13850).

The heavy maths is in functions over *batched* parameters (a leading restart axis ``R``) so the EM
can run several restarts as one tensor program.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from gatelab import gates

_LOG_2PI = math.log(2 * math.pi)


class Params(NamedTuple):
    """Batched parameters as float64 tensors with a leading restart axis ``R``.

    Shapes: beta0 ``(R, E)``, beta1 ``(R, E, D)``, a ``(R, E, D)``, b ``(R, E)``, var ``(R, E)``.
    """

    beta0: torch.Tensor
    beta1: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    var: torch.Tensor

    def take(self, index: torch.Tensor | slice) -> Params:
        """The restarts selected by ``index`` along the leading axis."""
        return Params(*(t[index] for t in self))


def project(X: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    r"""Per restart and expert, :math:`W_{ri}^\top x_n`: one 2-D matmul (faster than einsum).

    Shape:
        X ``(N, D)``, W ``(R, E, D)`` -> ``(R, E, N)``.
    """
    r, e, d = W.shape
    return (W.reshape(r * e, d) @ X.T).reshape(r, e, -1)


def active_mask(X: torch.Tensor, beta1: torch.Tensor, top_k: int) -> torch.Tensor:
    r"""Boolean mask of the selected set :math:`S_K(x)`, selection by :math:`\beta_1^\top x` only.

    Same selection as :func:`gatelab.gates.select_topk` (ties to the lower index), computed by
    ranking: expert ``i`` is selected when fewer than ``K`` experts beat it. For the few experts of
    a statistical MoE this pairwise comparison is ~20x faster than a sort along a tiny axis.

    Shape:
        X ``(N, D)``, beta1 ``(R, E, D)`` -> ``(R, E, N)``.
    """
    logits = project(X, beta1)  # (R, E, N)
    n_experts = logits.shape[1]
    if top_k == n_experts:  # dense gating: every expert is active
        return torch.ones_like(logits, dtype=torch.bool)
    if n_experts > 64:
        indices = gates.select_topk(logits.transpose(1, 2), top_k)  # (R, N, K)
        mask = torch.zeros_like(logits.transpose(1, 2), dtype=torch.bool).scatter(-1, indices, True)
        return mask.transpose(1, 2)
    rank = torch.zeros_like(logits, dtype=torch.uint8)  # (R, E, N): experts that beat expert i
    for j in range(n_experts):
        other = logits[:, j : j + 1]  # (R, 1, N)
        rank[:, j + 1 :] += other >= logits[:, j + 1 :]  # a lower index wins ties
        rank[:, :j] += other > logits[:, :j]
    return rank < top_k


def log_softmax_masked(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the experts axis (dim 1) restricted to ``mask``; ``-inf`` off it."""
    scores = scores.masked_fill(~mask, -math.inf)
    top = scores.amax(dim=1, keepdim=True)  # (R, 1, N)
    return scores - top - torch.log(torch.exp(scores - top).sum(dim=1, keepdim=True))


def logsumexp_experts(x: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over dim 1, written out (fast for a short middle axis).

    Shape:
        ``(R, E, N) -> (R, N)``.
    """
    top = x.amax(dim=1, keepdim=True)
    return (top + torch.log(torch.exp(x - top).sum(dim=1, keepdim=True)))[:, 0]


def log_gate(X: torch.Tensor, beta0: torch.Tensor, beta1: torch.Tensor, top_k: int):
    """Log gate weights on the active set and ``-inf`` elsewhere, plus the active mask.

    Same values as :func:`gatelab.gates.topk_softmax` (checked in the tests), computed as a masked
    log-softmax so far-away experts do not underflow to ``log 0``.

    Shape:
        X ``(N, D)``, beta0 ``(R, E)``, beta1 ``(R, E, D)`` -> log weights, mask ``(R, E, N)``.
    """
    mask = active_mask(X, beta1, top_k)  # (R, E, N)
    scores = project(X, beta1) + beta0[:, :, None]  # (R, E, N)
    return log_softmax_masked(scores, mask), mask


def expert_log_density(X: torch.Tensor, y: torch.Tensor, p: Params) -> torch.Tensor:
    r""":math:`\log \mathcal N(y_n; a_i^\top x_n + b_i, v_i)` for every expert.

    Shape:
        X ``(N, D)``, y ``(N,)`` -> ``(R, E, N)``.
    """
    mean = project(X, p.a) + p.b[:, :, None]  # (R, E, N)
    var = p.var[:, :, None]  # (R, E, 1)
    return -0.5 * (_LOG_2PI + torch.log(var) + (y - mean) ** 2 / var)


def log_joint(X: torch.Tensor, y: torch.Tensor, p: Params, top_k: int) -> torch.Tensor:
    r""":math:`\log w_i(x_n) + \log \mathcal N(y_n; \cdot)` on the active set, ``-inf`` off it.

    ``logsumexp`` over the experts axis is the log-density; ``softmax`` the EM responsibilities.

    Shape:
        X ``(N, D)``, y ``(N,)`` -> ``(R, E, N)``.
    """
    logw, _ = log_gate(X, p.beta0, p.beta1, top_k)
    return logw + expert_log_density(X, y, p)


def _as_float64(name: str, value, ndim: int) -> np.ndarray:
    array = np.array(value, dtype=np.float64)
    if array.ndim != ndim:
        raise ValueError(f"GaussianMoE: {name} must be {ndim}-D, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"GaussianMoE: {name} contains NaN or inf")
    return array


@dataclass(frozen=True, eq=False)
class GaussianMoE:
    """A top-K sparse softmax gated Gaussian MoE with fixed parameters (float64, NumPy storage).

    The constructor validates shapes and positivity, then normalises the gate so the last
    expert's ``(beta0, beta1)`` is zero (the density is invariant to a common shift), and sets
    ``beta0`` to zero when ``top_k == 1`` (it does not enter the density then).

    Args:
        beta0: gate intercepts, array-like of shape (n_experts,).
        beta1: gate slopes, array-like of shape (n_experts, n_features).
        a: expert slopes, array-like of shape (n_experts, n_features).
        b: expert intercepts, array-like of shape (n_experts,).
        var: expert variances (> 0), array-like of shape (n_experts,).
        top_k: number of selected experts K, ``1 <= K <= n_experts``.

    Raises:
        ValueError: inconsistent shapes, non-finite values, non-positive variances, bad top_k.

    Example:
        >>> m = GaussianMoE([0.0, 0.0], [[1.0], [0.0]], [[1.0], [-1.0]], [0.0, 0.0], [1, 1], 2)
        >>> m.mean([[0.0]]).shape
        (1,)
    """

    beta0: np.ndarray
    beta1: np.ndarray
    a: np.ndarray
    b: np.ndarray
    var: np.ndarray
    top_k: int

    def __post_init__(self) -> None:
        beta0 = _as_float64("beta0", self.beta0, 1)
        beta1 = _as_float64("beta1", self.beta1, 2)
        a = _as_float64("a", self.a, 2)
        b = _as_float64("b", self.b, 1)
        var = _as_float64("var", self.var, 1)
        k, d = beta1.shape
        for name, arr, shape in (("beta0", beta0, (k,)), ("a", a, (k, d)), ("b", b, (k,))):
            if arr.shape != shape:
                raise ValueError(f"GaussianMoE: {name} must have shape {shape}, got {arr.shape}")
        if var.shape != (k,):
            raise ValueError(f"GaussianMoE: var must have shape {(k,)}, got {var.shape}")
        if np.any(var <= 0):
            raise ValueError(f"GaussianMoE: variances must be > 0, got {var.tolist()}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int | np.integer):
            raise TypeError(f"GaussianMoE: top_k must be an int, got {type(self.top_k).__name__}")
        if not 1 <= self.top_k <= k:
            raise ValueError(f"GaussianMoE: top_k must be in [1, n_experts={k}], got {self.top_k}")
        beta1 = beta1 - beta1[-1]
        beta0 = np.zeros(k) if self.top_k == 1 else beta0 - beta0[-1]
        for name, arr in (("beta0", beta0), ("beta1", beta1), ("a", a), ("b", b), ("var", var)):
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "top_k", int(self.top_k))

    @property
    def n_experts(self) -> int:
        """Number of experts ``E``."""
        return self.beta1.shape[0]

    @property
    def n_features(self) -> int:
        """Input width ``D``."""
        return self.beta1.shape[1]

    def to_params(self, device: str | torch.device = "cpu") -> Params:
        """Batched float64 tensors with ``R = 1`` on ``device``."""

        def t(x: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(x, dtype=torch.float64, device=device)[None]

        return Params(t(self.beta0), t(self.beta1), t(self.a), t(self.b), t(self.var))

    @classmethod
    def from_params(cls, p: Params, top_k: int, index: int = 0) -> GaussianMoE:
        """The ``index``-th restart of batched parameters as a :class:`GaussianMoE`."""
        return cls(*(t[index].detach().cpu().numpy() for t in p), top_k=top_k)

    def _x(self, X, device="cpu") -> torch.Tensor:
        x = torch.as_tensor(np.asarray(X, dtype=np.float64), device=device)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(
                f"GaussianMoE: expected X of shape (n_samples, {self.n_features}), "
                f"got {tuple(x.shape)}; reshape a single feature with X.reshape(-1, 1)"
            )
        if not torch.isfinite(x).all():
            raise ValueError("GaussianMoE: X contains NaN or inf")
        return x

    def gate(self, X, device: str | torch.device = "cpu") -> gates.TopK:
        """Gate weights and selected experts via :func:`gatelab.gates.topk_softmax`.

        Shape:
            X ``(N, D)`` -> weights, indices ``(N, K)`` (torch tensors).
        """
        x = self._x(X, device)
        p = self.to_params(device)
        return gates.topk_softmax(x @ p.beta1[0].T, self.top_k, p.beta0[0])

    def log_density(self, X, y, device: str | torch.device = "cpu") -> np.ndarray:
        r"""Conditional log-density :math:`\log p(y_n \mid x_n)`, shape (n_samples,)."""
        x = self._x(X, device)
        yt = torch.as_tensor(np.asarray(y, dtype=np.float64), device=device)
        if yt.shape != (x.shape[0],):
            raise ValueError(
                f"GaussianMoE: y must have shape ({x.shape[0]},) to match X, got {tuple(yt.shape)}"
            )
        lj = log_joint(x, yt, self.to_params(device), self.top_k)  # (1, E, N)
        return logsumexp_experts(lj)[0].cpu().numpy()

    def mean(self, X, device: str | torch.device = "cpu") -> np.ndarray:
        r"""Conditional mean :math:`\sum_{i\in S_K(x)} w_i(x)(a_i^\top x + b_i)`, (n_samples,)."""
        x = self._x(X, device)
        weights, indices = self.gate(x, device)  # (N, K)
        p = self.to_params(device)
        means = x @ p.a[0].T + p.b[0]  # (N, E)
        return (weights * torch.gather(means, -1, indices)).sum(-1).cpu().numpy()

    def regions(self, X, device: str | torch.device = "cpu") -> np.ndarray:
        """The selected set :math:`S_K(x)` of each input, sorted, int array (n_samples, top_k)."""
        _, indices = self.gate(X, device)
        return torch.sort(indices, dim=-1).values.cpu().numpy()

    def sample(self, X, random_state=None) -> np.ndarray:
        r"""Draw :math:`y_n \sim p(\cdot \mid x_n)`, shape (n_samples,).

        Args:
            X: array-like of shape (n_samples, n_features).
            random_state: None, an int seed or a ``numpy.random.Generator``.
        """
        rng = np.random.default_rng(random_state)
        weights, indices = (t.numpy() for t in self.gate(X))
        x = self._x(X).numpy()
        u = rng.random(len(x))[:, None]
        pick = np.minimum((np.cumsum(weights, axis=1) < u).sum(1), self.top_k - 1)
        expert = indices[np.arange(len(x)), pick]  # (N,)
        mean = np.einsum("nd,nd->n", x, self.a[expert]) + self.b[expert]
        return mean + np.sqrt(self.var[expert]) * rng.standard_normal(len(x))

    def n_parameters(self) -> int:
        """Free parameters: gate ``(E-1)(D+1)`` (``(E-1)D`` when K = 1), experts ``E(D+2)``."""
        k, d = self.n_experts, self.n_features
        gate = (k - 1) * d if self.top_k == 1 else (k - 1) * (d + 1)
        return gate + k * (d + 2)
