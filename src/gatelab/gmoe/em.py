r"""EM for the top-K gated Gaussian MoE, vectorised over samples *and* restarts.

One iteration (an ECM cycle, Meng & Rubin 1993) from parameters :math:`\theta_t`:

1. **E-step** responsibilities :math:`r_{ni} \propto w_i(x_n)\mathcal N(y_n; a_i^\top x_n + b_i,
   v_i)` over the active set :math:`S_K(x_n)` (zero elsewhere).
2. **Expert CM-step**: weighted least squares for :math:`(a_i, b_i)` and the closed-form weighted
   residual variance, floored at ``var_floor`` so no expert collapses onto a few points. The gate
   is unchanged, so the active sets are unchanged and this is an exact EM step: the observed
   likelihood cannot decrease (clamping a unimodal 1-D maximiser keeps that true).
3. **Gate CM-step**: one Newton (IRLS) step on the weighted multinomial-logistic objective
   :math:`\sum_n \sum_{i\in S_K(x_n)} r_{ni}\log w_i(x_n)` with the active sets **held fixed** at
   the current :math:`\beta_1` (on fixed sets the objective is smooth and concave; its Hessian is
   :math:`-\sum_n (\operatorname{diag} w_n - w_n w_n^\top)\otimes z_n z_n^\top`). The top-K
   selection is piecewise constant in :math:`\beta_1`, so a step can move inputs across region
   boundaries; the step is therefore **backtracked** (halved up to ``max_halvings`` times) until the
   *observed* log-likelihood, re-evaluated with the new selection, does not decrease, and dropped
   if no halving achieves that. Every iteration is thus monotone by construction.

With ``K = E`` (dense gating) the sets never change and this is a plain generalised EM. With
``K = 1`` every input uses one expert with weight one, :math:`\beta_0` is unidentified (fixed at 0)
and the gate enters only through the hard partition :math:`\arg\max_i \beta_{1i}^\top x`; the gate
step then fits a softmax of :math:`\beta_1^\top x` to the *dense* expert posteriors (which expert
explains each point best) by the same Newton step, accepted only if the observed likelihood does not
decrease.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from gatelab.gmoe.model import Params, expert_log_density, log_gate, logsumexp_experts, project

MAX_HALVINGS = 3  # step sizes 1, 1/2, 1/4, 1/8; then the gate step is dropped this iteration
ROUNDING = 1e-13  # a relative loss this small is float64 noise: halving further cannot help
NEWTON_RIDGE = 1e-9  # relative ridge on the Newton system (keeps it solvable when an expert idles)
EMPTY_EXPERT = 1e-8  # an expert with less total responsibility than this keeps its parameters


class EMResult(NamedTuple):
    """Outcome of :func:`run_em` for ``R`` restarts.

    Attributes:
        params: final batched parameters.
        log_likelihood: final mean log-likelihood per sample, ``(R,)``.
        n_iter: iterations run, ``(R,)``.
        converged: whether the tolerance was met, ``(R,)``.
        history: per restart, mean log-likelihood before each iteration and at the end.
    """

    params: Params
    log_likelihood: torch.Tensor
    n_iter: torch.Tensor
    converged: torch.Tensor
    history: list[list[float]]


def design(X: torch.Tensor, intercept: bool = True):
    """Design matrix ``Z = [X, 1]`` ``(N, Q)`` and its row outer products ``(N, Q*Q)``."""
    Z = torch.cat([X, torch.ones_like(X[:, :1])], dim=1) if intercept else X  # (N, Q)
    return Z, (Z[:, :, None] * Z[:, None, :]).reshape(len(Z), -1)  # (N, Q), (N, Q*Q)


def softmax_experts(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the experts axis (dim 1) of ``(R, E, N)``; ``-inf`` entries get zero."""
    e = torch.exp(x - x.amax(dim=1, keepdim=True))
    return e / e.sum(dim=1, keepdim=True)


def mean_loglik(X: torch.Tensor, y: torch.Tensor, p: Params, top_k: int):
    """Log joint ``(R, E, N)`` and mean log-likelihood per sample ``(R,)``."""
    logw, _ = log_gate(X, p.beta0, p.beta1, top_k)
    lj = logw + expert_log_density(X, y, p)  # (R, E, N)
    return lj, logsumexp_experts(lj).mean(-1)


def expert_step(
    Z: torch.Tensor, zz: torch.Tensor, y: torch.Tensor, resp: torch.Tensor, p: Params, var_floor
) -> Params:
    """Weighted least squares and floored variances for every expert of every restart.

    Shape:
        Z ``(N, Q)``, zz ``(N, Q*Q)``, y ``(N,)``, resp ``(R, E, N)``.
    """
    q = Z.shape[1]
    nk = resp.sum(-1)  # (R, E)
    gram = (resp @ zz).reshape(*nk.shape, q, q)  # (R, E, Q, Q)
    rhs = resp @ (Z * y[:, None])  # (R, E, Q)
    eye = torch.eye(q, dtype=Z.dtype, device=Z.device)
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)  # (R, E)
    theta = torch.linalg.solve(gram + 1e-12 * scale[..., None, None] * eye, rhs)  # (R, E, Q)
    resid = y - project(Z, theta)  # (R, E, N)
    var = (resp * resid**2).sum(-1) / nk.clamp_min(1e-300)  # (R, E)
    var = var.clamp_min(var_floor)
    keep = nk < EMPTY_EXPERT * Z.shape[0]  # (R, E)
    a = torch.where(keep[..., None], p.a, theta[..., :-1])
    b = torch.where(keep, p.b, theta[..., -1])
    return Params(p.beta0, p.beta1, a, b, torch.where(keep, p.var, var))


def newton_direction(F: torch.Tensor, ff: torch.Tensor, target: torch.Tensor, prob: torch.Tensor):
    r"""Newton ascent direction for :math:`\sum_n\sum_i t_{ni}\log p_{ni}`, p a (masked) softmax.

    Parameters are the first ``E-1`` experts' coefficients on the features ``F`` (the last
    expert is the reference at zero).

    Shape:
        F ``(N, Q)``, ff ``(N, Q*Q)``, target, prob ``(R, E, N)`` -> ``(R, E-1, Q)``.
    """
    n_restarts, n_experts, n = prob.shape
    q, e1 = F.shape[1], n_experts - 1
    size = e1 * q
    grad = (target[:, :e1] - prob[:, :e1]) @ F  # (R, E-1, Q)
    diag = (prob[:, :e1] @ ff).reshape(n_restarts, e1, q, q)  # (R, E-1, Q, Q)
    neg_hess = torch.zeros(n_restarts, e1, q, e1, q, dtype=F.dtype, device=F.device)
    idx = torch.arange(e1, device=F.device)
    neg_hess[:, idx, :, idx, :] = diag.transpose(0, 1)  # block diagonal
    neg_hess = neg_hess.reshape(n_restarts, size, size)
    for r in range(n_restarts):  # restarts one by one keeps memory at (E-1) * Q * N
        A = (prob[r, :e1, None, :] * F.T[None]).reshape(size, n)  # ((E-1)Q, N)
        neg_hess[r] -= A @ A.T
    scale = neg_hess.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)  # (R,)
    eye = torch.eye(size, dtype=F.dtype, device=F.device)
    ridge = NEWTON_RIDGE * scale[:, None, None] * eye
    step = torch.linalg.solve(neg_hess + ridge, grad.reshape(n_restarts, size, 1))
    return step.reshape(n_restarts, e1, q)


def gate_step(X, y, resp, lj, ll, p: Params, top_k: int, cache):
    """Backtracked Newton step on the gate; returns ``(params, log_joint, mean_loglik)``."""
    n_experts = p.beta0.shape[1]
    if n_experts == 1:
        return p, lj, ll
    if top_k == 1:  # surrogate: softmax(beta1^T x) towards the dense expert posteriors
        target = softmax_experts(expert_log_density(X, y, p))
        prob = softmax_experts(project(X, p.beta1))
        F, ff = cache["X"], cache["xx"]
    else:
        logw, _ = log_gate(X, p.beta0, p.beta1, top_k)
        target, prob, F, ff = resp, logw.exp(), cache["Z"], cache["zz"]
    step = newton_direction(F, ff, target, prob)  # (R, E-1, Q)
    step = torch.cat([step, torch.zeros_like(step[:, :1])], dim=1)  # (R, E, Q)
    d = X.shape[1]
    pending = torch.ones_like(ll, dtype=torch.bool)
    t = 1.0
    for _ in range(MAX_HALVINGS + 1):
        beta1 = p.beta1 + t * step[..., :d]
        beta0 = p.beta0 + t * step[..., d] if top_k > 1 else p.beta0
        lj_t, ll_t = mean_loglik(X, y, Params(beta0, beta1, p.a, p.b, p.var), top_k)
        accept = pending & (ll_t >= ll)  # (R,)
        if accept.any():
            p = Params(
                torch.where(accept[:, None], beta0, p.beta0),
                torch.where(accept[:, None, None], beta1, p.beta1),
                p.a,
                p.b,
                p.var,
            )
            lj = torch.where(accept[:, None, None], lj_t, lj)
            ll = torch.where(accept, ll_t, ll)
            pending &= ~accept
        # stop when done, or when the loss is at rounding level (smaller steps cannot help)
        if not (pending & (ll - ll_t > ROUNDING * ll.abs())).any():
            break
        t *= 0.5
    return p, lj, ll


def run_em(X, y, p0: Params, top_k: int, *, max_iter: int, tol: float, var_floor: float):
    """Run EM for every restart in ``p0`` until converged or ``max_iter`` iterations.

    Converged means a relative change in mean log-likelihood of at most ``tol``:
    ``|l_t - l_{t-1}| <= tol * max(1, |l_{t-1}|)``.

    Converged restarts leave the batch, so the remaining ones run faster.

    Shape:
        X ``(N, D)``, y ``(N,)``, p0 with ``R`` restarts.
    """
    Z, zz = design(X)
    _, xx = design(X, intercept=False)
    cache = {"Z": Z, "zz": zz, "X": X, "xx": xx}
    n_restarts = p0.beta0.shape[0]
    out = [None] * n_restarts
    history: list[list[float]] = [[] for _ in range(n_restarts)]
    ids = list(range(n_restarts))
    p = p0
    lj, ll = mean_loglik(X, y, p, top_k)
    for it in range(1, max_iter + 1):
        for j, r in enumerate(ids):
            history[r].append(float(ll[j]))
        p = expert_step(Z, zz, y, softmax_experts(lj), p, var_floor)  # E-step + expert CM-step
        lj_mid, ll_mid = mean_loglik(X, y, p, top_k)
        resp = softmax_experts(lj_mid)  # refreshed after the expert step (multicycle ECM)
        p, lj_new, ll_new = gate_step(X, y, resp, lj_mid, ll_mid, p, top_k, cache)
        met = (ll_new - ll).abs() <= tol * ll.abs().clamp_min(1.0)  # (R,)
        done = met | (it == max_iter)
        lj, ll = lj_new, ll_new
        if done.any():
            for j in torch.nonzero(done).flatten().tolist():
                r = ids[j]
                history[r].append(float(ll[j]))
                out[r] = (p.take(slice(j, j + 1)), float(ll[j]), it, bool(met[j]))
            keep = torch.nonzero(~done).flatten()
            ids = [ids[j] for j in keep.tolist()]
            if not ids:
                break
            p, lj, ll = p.take(keep), lj[keep], ll[keep]
    params = Params(*(torch.cat([o[0][f] for o in out]) for f in range(5)))
    return EMResult(
        params,
        torch.tensor([o[1] for o in out], dtype=X.dtype),
        torch.tensor([o[2] for o in out]),
        torch.tensor([o[3] for o in out]),
        history,
    )
