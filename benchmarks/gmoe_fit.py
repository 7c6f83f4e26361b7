"""EM speed of gatelab.gmoe against a straightforward per-sample Python EM (same algorithm).

Both run the identical algorithm from the identical start (the true parameters perturbed):
E-step over the top-K active set, weighted least squares and floored variances for the experts,
one Newton step on the gate over fixed active sets backtracked on the observed likelihood. The
naive version loops over samples in Python (NumPy only for the small per-expert solves). Its
first-iteration log-likelihood is checked against the vectorised one, so both really compute
the same thing.

The naive EM is stopped after ``--naive-cap`` seconds per cell; when it has not converged by then
its time to convergence is *extrapolated* as (iterations the vectorised EM needed) / (naive
iterations per second) and marked so in the output.

    python benchmarks/gmoe_fit.py            # n = 1e4 only (what `make bench` runs, ~2 min)
    python benchmarks/gmoe_fit.py --full --out benchmarks/gmoe_fit.json   # the README table
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import warnings

import numpy as np
import torch

import gatelab
from gatelab.gmoe import GaussianMoE, GaussianMoERegressor

TOP_K = 2
TOL = 1e-6
MAX_ITER = 2000


def make_problem(n: int, d: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    true = GaussianMoE(
        rng.normal(size=k), 2 * rng.normal(size=(k, d)), rng.normal(size=(k, d)) * 2,
        rng.normal(size=k) * 2, rng.uniform(0.05, 0.3, size=k), TOP_K,
    )  # fmt: skip
    X = rng.uniform(-1, 1, size=(n, d))
    y = true.sample(X, rng)
    init = GaussianMoE(
        true.beta0 + 0.2 * rng.normal(size=k), true.beta1 + 0.2 * rng.normal(size=(k, d)),
        true.a + 0.2 * rng.normal(size=(k, d)), true.b + 0.2 * rng.normal(size=k),
        true.var * 1.5, TOP_K,
    )  # fmt: skip
    return X, y, init


# ------------------------------------------------------------------ naive per-sample EM
def naive_loglik(X, y, p):
    beta0, beta1, a, b, var = p
    k = len(b)
    total, logj_all = 0.0, []
    for n in range(len(y)):
        logits = [float(beta1[i] @ X[n]) for i in range(k)]
        sel = sorted(range(k), key=lambda i: (-logits[i], i))[:TOP_K]
        scores = [logits[i] + beta0[i] for i in sel]
        m = max(scores)
        lse = m + math.log(sum(math.exp(s - m) for s in scores))
        logj = {}
        for i, s in zip(sel, scores, strict=True):
            mean = float(a[i] @ X[n]) + b[i]
            logj[i] = s - lse - 0.5 * (math.log(2 * math.pi * var[i]) + (y[n] - mean) ** 2 / var[i])
        m = max(logj.values())
        total += m + math.log(sum(math.exp(v - m) for v in logj.values()))
        logj_all.append(logj)
    return total / len(y), logj_all


def naive_iteration(X, y, p, ll, logj_all, var_floor):
    beta0, beta1, a, b, var = (np.array(t, dtype=float) for t in p)
    n_samples, d = X.shape
    k, q = len(b), d + 1
    # E-step
    resp = []
    for logj in logj_all:
        m = max(logj.values())
        z = sum(math.exp(v - m) for v in logj.values())
        resp.append({i: math.exp(v - m) / z for i, v in logj.items()})
    # expert step, one expert and one sample at a time
    for i in range(k):
        gram, rhs, nk = np.zeros((q, q)), np.zeros(q), 0.0
        for n in range(n_samples):
            r = resp[n].get(i, 0.0)
            if r == 0.0:
                continue
            z = np.append(X[n], 1.0)
            gram += r * np.outer(z, z)
            rhs += r * y[n] * z
            nk += r
        if nk < 1e-8 * n_samples:
            continue
        theta = np.linalg.solve(gram + 1e-12 * np.trace(gram) / q * np.eye(q), rhs)
        sse = sum(
            resp[n].get(i, 0.0) * (y[n] - X[n] @ theta[:d] - theta[d]) ** 2
            for n in range(n_samples)
        )
        a[i], b[i], var[i] = theta[:d], theta[d], max(sse / nk, var_floor)
    p = (beta0, beta1, a, b, var)
    ll, logj_all = naive_loglik(X, y, p)
    # gate step: responsibilities and gate weights on the (fixed) active sets
    size = (k - 1) * q
    grad, hess = np.zeros(size), np.zeros((size, size))
    for n in range(n_samples):
        logj = logj_all[n]
        m = max(logj.values())
        z_n = sum(math.exp(v - m) for v in logj.values())
        logits = {i: float(beta1[i] @ X[n]) + beta0[i] for i in logj}
        mw = max(logits.values())
        zw = sum(math.exp(v - mw) for v in logits.values())
        w = np.zeros(k)
        t = np.zeros(k)
        for i in logj:
            w[i] = math.exp(logits[i] - mw) / zw
            t[i] = math.exp(logj[i] - m) / z_n
        z = np.append(X[n], 1.0)
        grad += np.kron(t[:-1] - w[:-1], z)
        hess += np.kron(np.diag(w[:-1]) - np.outer(w[:-1], w[:-1]), np.outer(z, z))
    ridge = 1e-9 * np.trace(hess) / size * np.eye(size)
    step = np.linalg.solve(hess + ridge, grad).reshape(k - 1, q)
    step = np.vstack([step, np.zeros(q)])
    for halving in range(4):
        s = 0.5**halving
        trial = (beta0 + s * step[:, d], beta1 + s * step[:, :d], a, b, var)
        ll_t, logj_t = naive_loglik(X, y, trial)
        if ll_t >= ll:
            return trial, ll_t, logj_t
    return p, ll, logj_all


def run_naive(X, y, init, cap_s, var_floor):
    p = (init.beta0, init.beta1, init.a, init.b, init.var)
    start = time.perf_counter()
    ll, logj = naive_loglik(X, y, p)
    history, it = [ll], 0
    while it < MAX_ITER:
        p, ll_new, logj = naive_iteration(X, y, p, ll, logj, var_floor)
        it += 1
        history.append(ll_new)
        converged = bool(abs(ll_new - ll) <= TOL * max(1.0, abs(ll)))
        ll = ll_new
        if converged or time.perf_counter() - start > cap_s:
            break
    return {
        "seconds": time.perf_counter() - start,
        "n_iter": it,
        "converged": converged,
        "history": history,
    }


def run_vectorised(X, y, init, device):
    est = GaussianMoERegressor(
        n_experts=init.n_experts, top_k=TOP_K, init=init, max_iter=MAX_ITER, tol=TOL, device=device
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X, y)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "n_iter": est.n_iter_,
        "converged": est.converged_,
        "history": est.history_.tolist(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="n = 1e4 and 1e5 (default: 1e4)")
    parser.add_argument("--naive-cap", type=float, default=20.0, help="seconds per naive cell")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench/gmoe_fit.json")
    args = parser.parse_args()
    rows = []
    sizes = (10_000, 100_000) if args.full else (10_000,)
    for n in sizes:
        for d in (1, 5):
            for k in (3, 8):
                X, y, init = make_problem(n, d, k, args.seed)
                var_floor = 1e-6 * float(np.var(y))
                vec = run_vectorised(X, y, init, args.device)
                naive = run_naive(X, y, init, args.naive_cap, var_floor)
                first_naive, first_vec = naive["history"][1], vec["history"][1]
                agree = bool(abs(first_naive - first_vec) <= 1e-9 * abs(first_vec))
                naive_rate = naive["n_iter"] / naive["seconds"]
                vec_rate = vec["n_iter"] / vec["seconds"]
                naive_ttc = naive["seconds"] if naive["converged"] else vec["n_iter"] / naive_rate
                row = {
                    "n": n, "d": d, "k": k, "top_k": TOP_K,
                    "vectorised_iter_per_s": vec_rate, "vectorised_seconds": vec["seconds"],
                    "vectorised_n_iter": vec["n_iter"], "vectorised_converged": vec["converged"],
                    "naive_iter_per_s": naive_rate, "naive_seconds_to_converge": naive_ttc,
                    "naive_extrapolated": not naive["converged"],
                    "naive_n_iter_run": naive["n_iter"],
                    "first_iteration_loglik_agrees": agree,
                    "speedup_iter_per_s": vec_rate / naive_rate,
                }  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    payload = {
        "config": {"sizes": sizes, "d": [1, 5], "k": [3, 8], "top_k": TOP_K, "tol": TOL,
                   "max_iter": MAX_ITER, "naive_cap_s": args.naive_cap, "device": args.device},
        "seed": args.seed,
        "versions": {"gatelab": gatelab.__version__, "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "hardware": {"machine": platform.machine(), "processor": platform.processor(),
                     "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "load_average": os.getloadavg()},
        "results": rows,
    }  # fmt: skip
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(payload, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
