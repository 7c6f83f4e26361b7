"""Model selection beyond the paper: the number of experts by BIC, and merging fitted atoms.

An over-specified fit (more experts than the truth) puts several atoms into one Voronoi cell of
the truth (arXiv:2309.13850 §4). :func:`merge_experts` collapses atoms that are closer than
``tol`` (single linkage): the merged atom gets the total gate mass ``exp(beta0) = sum exp(beta0_i)``
and mass-weighted averages of the other parameters. By default the distance uses the expert
slopes ``a`` and variances ``var`` only: inside a cell those converge at n^-1/4 while ``beta1``
and ``b`` crawl at n^-1/8 (arXiv:2309.13850), so at practical n the atoms of one cell are still far
apart in ``beta1``/``b`` but already close in ``a``/``var``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage

from gatelab.gmoe.estimator import GaussianMoERegressor
from gatelab.gmoe.model import GaussianMoE

MERGE_TOL = 0.5  # distance on (beta1, a, b, var) under which the demo merges atoms


class BICSelection(NamedTuple):
    """Result of :func:`select_n_experts`: the chosen count, every BIC, and the chosen fit."""

    n_experts: int
    bic: dict[int, float]
    estimator: GaussianMoERegressor


def select_n_experts(X, y, candidates, *, top_k=None, **estimator_kwargs) -> BICSelection:
    """Fit one :class:`GaussianMoERegressor` per candidate ``n_experts``; lowest BIC wins.

    Args:
        X: array-like of shape (n_samples, n_features).
        y: array-like of shape (n_samples,).
        candidates: iterable of expert counts to try.
        top_k: ``K`` for every fit, capped at each candidate count; ``None`` means dense.
        **estimator_kwargs: passed to :class:`GaussianMoERegressor` (``random_state``, ...).
    """
    candidates = sorted(set(int(k) for k in candidates))
    if not candidates or candidates[0] < 1:
        raise ValueError(f"candidates must be expert counts >= 1, got {candidates}")
    bics, fits = {}, {}
    for k in candidates:
        kk = None if top_k is None else min(top_k, k)
        est = GaussianMoERegressor(n_experts=k, top_k=kk, **estimator_kwargs).fit(X, y)
        bics[k], fits[k] = est.bic(X, y), est
    best = min(bics, key=bics.get)
    return BICSelection(best, bics, fits[best])


def merge_experts(
    model: GaussianMoE,
    tol: float,
    top_k: int | None = None,
    compare: tuple[str, ...] = ("a", "var"),
) -> GaussianMoE:
    """Collapse atoms closer than ``tol`` into one atom each.

    Args:
        model: a fitted model.
        tol: Euclidean distance on the concatenated ``compare`` parameters below which atoms
            merge (single linkage).
        compare: which of ``beta1``, ``a``, ``b``, ``var`` the distance uses.
        top_k: ``K`` of the merged model; default ``max(1, K - (removed atoms))``, which turns a
            fit satisfying the Voronoi condition ``K̄ = K + (extra atoms)`` back into top-``K``.

    Returns:
        A :class:`GaussianMoE` with one atom per group (gate re-anchored on its last atom).
    """
    if not tol >= 0:
        raise ValueError(f"merge_experts: tol must be >= 0, got {tol}")
    unknown = set(compare) - {"beta1", "a", "b", "var"}
    if unknown or not compare:
        raise ValueError(f"merge_experts: compare must name beta1, a, b or var, got {compare}")
    atoms = np.column_stack([getattr(model, name) for name in compare])
    if model.n_experts == 1:
        return model
    groups = fcluster(linkage(atoms, method="single"), t=tol, criterion="distance")
    # keep the group of the last atom last, so the gate anchor stays where it was
    order = [g for g in dict.fromkeys(groups) if g != groups[-1]] + [groups[-1]]
    mass = np.exp(model.beta0)
    out = {name: [] for name in ("beta0", "beta1", "a", "b", "var")}
    for g in order:
        members = groups == g
        w = mass[members] / mass[members].sum()
        out["beta0"].append(np.log(mass[members].sum()))
        for name in ("beta1", "a", "b", "var"):
            out[name].append(np.tensordot(w, getattr(model, name)[members], axes=1))
    n_new = len(order)
    k_new = max(1, model.top_k - (model.n_experts - n_new)) if top_k is None else top_k
    return GaussianMoE(**{k: np.array(v) for k, v in out.items()}, top_k=min(k_new, n_new))


def selection_demo(out_dir: Path, n: int = 3000, seed: int = 0, candidates=range(1, 6)) -> dict:
    """Recover k* on data simulated from the rate study's truth (k* = 3, top-2).

    Fits every candidate count by BIC (top-2, or dense below 2 experts), and an over-specified
    k = 4, top-3 fit whose atoms are then merged. Writes ``selection.json`` and ``bic.png``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gatelab.gmoe.rates import sample_inputs, true_model

    true = true_model()
    rng = np.random.default_rng(seed)
    X = sample_inputs(n, rng)
    y = true.sample(X, rng)
    chosen = select_n_experts(X, y, candidates, top_k=true.top_k, random_state=seed)
    over = GaussianMoERegressor(n_experts=true.n_experts + 1, top_k=true.top_k + 1,
                                random_state=seed).fit(X, y)  # fmt: skip
    merged = merge_experts(over.params_, tol=MERGE_TOL)
    result = {
        "n": n,
        "seed": seed,
        "true_n_experts": true.n_experts,
        "bic": chosen.bic,
        "bic_n_experts": chosen.n_experts,
        "over_n_experts": over.params_.n_experts,
        "merged_n_experts": merged.n_experts,
        "merge_tol": MERGE_TOL,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "selection.json").write_text(json.dumps(result, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    ks = sorted(chosen.bic)
    ax.plot(ks, [chosen.bic[k] for k in ks], "o-")
    ax.axvline(true.n_experts, ls="--", color="grey", label="true k*")
    ax.set_xlabel("number of experts k")
    ax.set_ylabel("BIC")
    ax.set_title(f"BIC picks k = {chosen.n_experts} (n = {n})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "bic.png", dpi=110)
    plt.close(fig)
    return result
