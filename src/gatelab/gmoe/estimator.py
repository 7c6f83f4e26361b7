"""``GaussianMoERegressor``: maximum-likelihood fitting of the top-K gated Gaussian MoE.

A scikit-learn estimator (house rule 7) around :func:`gatelab.gmoe.em.run_em`; all restarts run
as one batched tensor program in float64 on ``device``.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.validation import (
    _check_sample_weight,
    check_array,
    check_consistent_length,
    check_is_fitted,
    column_or_1d,
    validate_data,
)
from threadpoolctl import threadpool_limits

from gatelab.gmoe.em import design, expert_step, newton_direction, run_em, softmax_experts
from gatelab.gmoe.model import GaussianMoE, Params, project
from gatelab.threads import torch_threads

INIT_NEWTON_STEPS = 10  # Newton steps of the initial gate fit to the k-means labels
INIT_LABEL_SMOOTHING = 0.1  # keeps that logistic fit finite when the clusters are separable
INIT_CANDIDATES = 4  # candidate partitions per restart, screened by a short EM run
SHORT_RUN = 20  # EM iterations of that screening run
MAX_BATCH = 5_000_000  # cap on candidates * n_samples * n_experts (memory of one batch tensor)
SMALL_PROBLEM = 2_000_000  # n_samples * n_experts * n_init below which fit uses one thread


def _named(name: str, error: Exception) -> Exception:
    """``error`` (a ``ValueError`` or ``TypeError``) with its message prefixed by ``name:``."""
    kind = TypeError if isinstance(error, TypeError) else ValueError
    return kind(f"{name}: {error}")


def _random_state(value, name: str = "random_state"):
    """``check_random_state`` with an error that names the argument."""
    try:
        return check_random_state(value)
    except (ValueError, TypeError):
        raise ValueError(
            f"{name} must be None, an int in [0, 2**32) or a numpy RandomState, got {value!r}"
        ) from None


@contextmanager
def _thread_limit(n_threads):
    """Run with ``n_threads`` torch and OpenMP/BLAS threads, restoring torch's setting after."""
    if n_threads is None:
        yield
        return
    with torch_threads(int(n_threads)), threadpool_limits(limits=int(n_threads)):
        yield


class GaussianMoERegressor(RegressorMixin, BaseEstimator):
    """Top-K sparse softmax gated Gaussian mixture of experts, fitted by EM.

    See :mod:`gatelab.gmoe.em` for the algorithm and how the non-smooth top-K selection is
    handled (gate Newton step on fixed active sets, backtracked on the observed likelihood).

    Args:
        n_experts: number of experts ``E``.
        top_k: experts per input ``K``; ``None`` means ``n_experts`` (dense softmax gating).
        n_init: restarts from k-means initialisations; the highest likelihood wins.
        max_iter: EM iterations per restart.
        tol: relative change of the mean log-likelihood that counts as converged.
        init: ``"kmeans"`` or a :class:`GaussianMoE` to start from (then one restart is run).
            ``"kmeans"``: partitions of the standardised ``[X, y]`` (``n_init`` by k-means and
            ``3 * n_init`` more by nearest of random data points), experts by least squares per
            part, gate by a softmax fit to the labels; all candidates run 20 EM iterations as
            one batch and the ``n_init`` most likely continue to convergence. With
            ``1 < top_k < n_experts`` one more restart starts from the best dense (K = E) fit.
        reg_var: variance floor as a fraction of ``var(y)`` (prevents collapse onto few points).
        random_state: None, int or ``RandomState``; seeds the k-means initialisations.
        device: torch device the EM runs on (``"cpu"``, ``"cuda"``).
        n_threads: CPU threads (torch and OpenMP) during ``fit``, restored afterwards. ``None``:
            one thread when ``n_samples * n_experts * n_init < 2e6`` (the tensors are then too
            small for threads to pay off, and on a busy machine they slow EM down many times),
            otherwise torch's current setting.

    Attributes:
        params_: the fitted :class:`GaussianMoE`.
        log_likelihood_: mean log-likelihood per training sample at the end of EM.
        n_iter_: EM iterations of the best restart.
        converged_: whether the best restart met ``tol``.
        history_: mean log-likelihood per iteration of the best restart, ndarray.
        n_features_in_: number of features seen in ``fit``.

    Note:
        ``score`` returns the mean conditional log-likelihood per sample, **not** R².

    Example:
        >>> import numpy as np
        >>> X = np.linspace(-1, 1, 200)[:, None]
        >>> y = np.where(X[:, 0] > 0, 2 * X[:, 0], -X[:, 0])
        >>> est = GaussianMoERegressor(n_experts=2, random_state=0).fit(X, y)
        >>> est.predict(X).shape
        (200,)
    """

    def __init__(
        self,
        *,
        n_experts=2,
        top_k=None,
        n_init=5,
        max_iter=2000,
        tol=1e-6,
        init="kmeans",
        reg_var=1e-6,
        random_state=None,
        device="cpu",
        n_threads=None,
    ):
        self.n_experts = n_experts
        self.top_k = top_k
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.init = init
        self.reg_var = reg_var
        self.random_state = random_state
        self.device = device
        self.n_threads = n_threads

    # ----------------------------------------------------------------- validation
    def _check_params(self, n_samples: int, n_features: int) -> int:
        def check_int(name, low):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")

        check_int("n_experts", 1)
        check_int("n_init", 1)
        check_int("max_iter", 1)
        if self.n_threads is not None:
            check_int("n_threads", 1)
        top_k = self.n_experts if self.top_k is None else self.top_k
        if isinstance(top_k, bool) or not isinstance(top_k, Integral):
            raise ValueError(f"top_k must be an int or None, got {top_k!r}")
        if not 1 <= top_k <= self.n_experts:
            raise ValueError(
                f"top_k must be in [1, n_experts={self.n_experts}], got {top_k}; "
                "choose n_experts >= top_k"
            )
        for name in ("tol", "reg_var"):
            value = getattr(self, name)
            bad_type = isinstance(value, bool) or not isinstance(value, Real)
            if bad_type or not value >= 0 or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(
                f"device must name a torch device (cpu, cuda), got {self.device!r}"
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r}, but CUDA is not available on this machine")
        _random_state(self.random_state)
        if n_samples < max(2, self.n_experts):
            raise ValueError(
                f"n_samples={n_samples} is too few: need at least max(2, n_experts="
                f"{self.n_experts}) samples"
            )
        if isinstance(self.init, GaussianMoE):
            shape = (self.init.n_experts, self.init.n_features)
            if shape != (self.n_experts, n_features):
                raise ValueError(
                    f"init has (n_experts, n_features)={shape}, expected "
                    f"({self.n_experts}, {n_features})"
                )
        elif not (isinstance(self.init, str) and self.init == "kmeans"):
            raise ValueError(f"init must be 'kmeans' or a GaussianMoE, got {self.init!r}")
        return int(top_k)

    # ----------------------------------------------------------------- fitting
    def fit(self, X, y):
        """Fit by EM from ``n_init`` initialisations; the highest likelihood wins.

        Args:
            X: array-like of shape (n_samples, n_features).
            y: array-like of shape (n_samples,).

        Returns:
            self.

        Raises:
            ValueError: NaN/inf, wrong shapes, ``y`` of the wrong length, ``top_k > n_experts``.
        """
        X, y = self._check_Xy(X, y, reset=True)
        top_k = self._check_params(*X.shape)
        threads = self.n_threads
        if threads is None and len(X) * self.n_experts * self.n_init < SMALL_PROBLEM:
            threads = 1
        with _thread_limit(threads):
            self._fit(X, y, top_k)
        if not self.converged_:
            warnings.warn(
                f"GaussianMoERegressor did not converge in max_iter={self.max_iter} iterations "
                f"(tol={self.tol}); increase max_iter, loosen tol or try more n_init.",
                ConvergenceWarning,
                stacklevel=2,
            )
        return self

    def _check_Xy(self, X, y, reset: bool):
        """Validated ``(X, y)``; every error names the argument at fault."""
        X = self._check_X(X, reset)
        try:
            if y is None:
                raise ValueError("requires y to be passed, but the target y is None")
            y = check_array(y, ensure_2d=False, dtype=np.float64, input_name="y")
            y = column_or_1d(y, warn=True)  # a column vector warns, as sklearn regressors do
        except (ValueError, TypeError) as error:
            raise _named("y", error) from None
        try:
            check_consistent_length(X, y)
        except ValueError as error:
            raise _named("X and y", error) from None
        return X, y

    def _check_X(self, X, reset: bool):
        """Validated ``X`` (2-D, finite, float64; its width that of ``fit`` unless ``reset``)."""
        try:
            return validate_data(self, X, reset=reset, dtype=np.float64)
        except (ValueError, TypeError) as error:
            raise _named("X", error) from None

    def _fit(self, X, y, top_k):
        rng = check_random_state(self.random_state)
        device = torch.device(self.device)
        Xt = torch.tensor(X, device=device)  # a copy: X may be a read-only memmap
        yt = torch.tensor(y, device=device)
        var_y = float(np.var(y))
        var_floor = self.reg_var * (var_y if var_y > 0 else 1.0)
        if isinstance(self.init, GaussianMoE):
            p0, prefix, spent = self.init.to_params(device), [[]], [0]
        else:
            p0, prefix, spent = self._initial_params(X, Xt, yt, top_k, rng, var_floor, var_y)
            if 1 < top_k < self.n_experts:
                extra = self._dense_start(X, Xt, yt, rng, var_floor, var_y)
                p0 = Params(*(torch.cat([a, b]) for a, b in zip(p0, extra, strict=True)))
                prefix, spent = [*prefix, []], [*spent, 0]
        max_iter = self.max_iter - max(spent)  # the screening run counts towards max_iter
        res = run_em(Xt, yt, p0, top_k, max_iter=max_iter, tol=self.tol, var_floor=var_floor)
        best = int(torch.argmax(res.log_likelihood))
        self.params_ = GaussianMoE.from_params(res.params, top_k, best)
        self.log_likelihood_ = float(res.log_likelihood[best])
        self.n_iter_ = spent[best] + int(res.n_iter[best])
        self.converged_ = bool(res.converged[best])
        self.history_ = np.asarray(prefix[best] + res.history[best])

    def _dense_start(self, X, Xt, yt, rng, var_floor, var_y) -> Params:
        """One more top-K restart: the best *dense* (K = E) fit.

        The dense likelihood is smooth, with no selection kinks to stall on; it finds better
        basins on some data and worse on others, so it competes with the k-means restarts
        rather than replacing them.
        """
        k = self.n_experts
        p0, _, _ = self._initial_params(X, Xt, yt, k, rng, var_floor, var_y)
        dense = run_em(Xt, yt, p0, k, max_iter=self.max_iter, tol=self.tol, var_floor=var_floor)
        best = int(torch.argmax(dense.log_likelihood))
        return dense.params.take(slice(best, best + 1))

    def _init_labels(self, X, y, rng) -> np.ndarray:
        """Hard partitions of the standardised ``[X, y]``, shape (n_candidates, n_samples).

        ``n_init`` come from k-means, the others from the nearest of ``k`` random data points (no
        Lloyd steps: far more diverse, which is what finds the good basins; k-means alone often
        lands in the same poor one).
        """
        k, n = self.n_experts, len(X)
        joint = np.column_stack([X, y])
        joint = (joint - joint.mean(0)) / np.where(joint.std(0) > 0, joint.std(0), 1.0)
        n_candidates = max(self.n_init, min(INIT_CANDIDATES * self.n_init, MAX_BATCH // (n * k)))
        labels = []
        for _ in range(self.n_init):
            seed = int(rng.randint(np.iinfo(np.int32).max))
            km = KMeans(n_clusters=k, n_init=1, random_state=seed)
            with warnings.catch_warnings():  # fewer distinct points than clusters is fine here
                warnings.simplefilter("ignore", ConvergenceWarning)
                labels.append(km.fit_predict(joint))
        for _ in range(n_candidates - self.n_init):
            centres = joint[rng.choice(n, size=k, replace=False)]  # (E, D+1)
            labels.append(((joint[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1))
        return np.stack(labels).astype(np.int64)  # (R, N)

    def _initial_params(self, X, Xt, yt, top_k, rng, var_floor, var_y) -> Params:
        """Starting parameters, with the history and iterations already spent on each.

        Parameters come from each candidate partition; with more candidates than ``n_init``, all
        run ``SHORT_RUN`` EM iterations as one batch and the ``n_init`` most likely are kept.
        """
        k, d = self.n_experts, X.shape[1]
        labels = self._init_labels(X, yt.cpu().numpy(), rng)
        onehot = torch.nn.functional.one_hot(torch.as_tensor(labels), k).transpose(1, 2)
        resp = onehot.to(Xt.dtype).to(Xt.device)  # (R, E, N)
        r = len(labels)
        zeros = torch.zeros(r, k, d, dtype=Xt.dtype, device=Xt.device)
        start = Params(zeros[..., 0], zeros, zeros, zeros[..., 0], zeros[..., 0] + max(var_y, 1.0))
        Z, zz = design(Xt)
        p = expert_step(Z, zz, yt, resp, start, var_floor)
        # gate: a few Newton steps of a dense softmax fit to smoothed labels
        target = resp * (1 - INIT_LABEL_SMOOTHING) + INIT_LABEL_SMOOTHING / k
        F, ff = design(Xt, intercept=top_k > 1)
        coef = torch.zeros(r, k, F.shape[1], dtype=Xt.dtype, device=Xt.device)
        if k > 1:
            for _ in range(INIT_NEWTON_STEPS):
                prob = softmax_experts(project(F, coef))
                coef[:, :-1] += newton_direction(F, ff, target, prob)
        beta0 = coef[..., d] if top_k > 1 else zeros[..., 0]
        p = Params(beta0, coef[..., :d].contiguous(), p.a, p.b, p.var)
        short_iters = min(SHORT_RUN, self.max_iter // 2)
        if r <= self.n_init or short_iters == 0:  # no screening: the k-means candidates
            first = torch.arange(self.n_init, device=Xt.device)
            return p.take(first), [[] for _ in range(self.n_init)], [0] * self.n_init
        short = run_em(Xt, yt, p, top_k, max_iter=short_iters, tol=self.tol, var_floor=var_floor)
        keep = torch.argsort(short.log_likelihood, descending=True)[: self.n_init].tolist()
        history = [short.history[i][:-1] for i in keep]  # the last value starts the next run
        return (
            short.params.take(torch.tensor(keep, device=Xt.device)),
            history,
            [int(short.n_iter[i]) for i in keep],
        )

    # ----------------------------------------------------------------- prediction
    def _X(self, X):
        check_is_fitted(self)
        return self._check_X(X, reset=False)

    def predict(self, X):
        r"""Conditional mean :math:`E[y \mid x]`, ndarray of shape (n_samples,)."""
        X = self._X(X)
        return self.params_.mean(X, self.device)

    def score(self, X, y, sample_weight=None):
        """Mean conditional log-likelihood per sample (**not** R², unlike most regressors).

        Args:
            X: array-like of shape (n_samples, n_features).
            y: array-like of shape (n_samples,).
            sample_weight: optional array-like of shape (n_samples,) for a weighted mean.
        """
        check_is_fitted(self)
        X, y = self._check_Xy(X, y, reset=False)
        if sample_weight is not None:
            try:
                weights = _check_sample_weight(sample_weight, X, ensure_non_negative=True)
            except (ValueError, TypeError) as error:
                raise _named("sample_weight", error) from None
            if not weights.sum() > 0:
                raise ValueError("sample_weight must not sum to zero")
            sample_weight = weights
        return float(np.average(self.params_.log_density(X, y, self.device), weights=sample_weight))

    def sample(self, X, random_state=None):
        """Draw one ``y`` per row of ``X`` from the fitted model, ndarray (n_samples,)."""
        X = self._X(X)
        try:
            rng = np.random.default_rng(random_state)
        except (ValueError, TypeError):
            raise ValueError(
                f"random_state must be None, an int >= 0 or a numpy Generator, got {random_state!r}"
            ) from None
        return self.params_.sample(X, rng)

    def bic(self, X, y):
        r"""Bayesian information criterion :math:`-2\log L + p\log n` (lower is better)."""
        check_is_fitted(self)
        X, y = self._check_Xy(X, y, reset=False)
        n = len(X)
        return -2.0 * n * self.score(X, y) + self.params_.n_parameters() * math.log(n)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # score() is a mean log-likelihood, not R², so sklearn's "score > 0.5" sanity check
        # (check_regressors_train) does not apply: it is the only check we opt out of.
        tags.regressor_tags.poor_score = True
        return tags
