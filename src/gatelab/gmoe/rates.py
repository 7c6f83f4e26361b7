r"""The convergence-rate study of arXiv:2309.13850 (exact- and over-specified top-K MoE).

**True model** (k* = 3 experts, top-K with K = 2, d = 1, x uniform on [-1, 1]): gate slopes
:math:`\beta_1 = (0, 2.5, -2.5)` (stored shifted so the last is 0; the order is what matters) and
intercepts :math:`\beta_0 = (0.5, -0.5, 0)`. Because x takes both signs the inputs visit two
top-2 regions, {0, 1} for x > 0 and {0, 2} for x < 0 (with x > 0 only there would be one region,
arXiv:2309.13850). Atom 0 has the middle slope, so it is selected everywhere: splitting *it* is the
over-specified case in which a top-K̄ fit can represent the truth exactly in every region (had the
split atom been left out of some true top-K set, the K̄ fitted atoms there would include a spurious
one). Experts :math:`a = (1, -2, 3)`, :math:`b = (0.5, -0.5, -1.5)` do not cross inside the region
where they compete, and the variances :math:`(0.09, 0.16, 0.25)` are distinct.

**Fits** (as the authors did, EM starts near the truth so the statistical rate is isolated from
the optimisation): (a) ``exact`` k = 3, K = 2; (b) ``over`` k = 4 with true atom 0 split in two
and K̄ = 3, the Voronoi cardinality condition (cells of sizes 2, 1, 1 and every true top-2 set
contains cell 0: 3 atoms); (c) ``over_small`` k = 4 with K̄ = 2 < 3, where the theory predicts no
consistency.

Each (setting, n, replication) is one job; jobs run in a process pool with one torch thread per
worker. The main process writes each result atomically to ``runs/gmoe-rates/reps/`` as it
arrives (keyed by a fingerprint of the configuration), and a rerun skips the cached ones: a study
killed at any point, even inside a write, resumes to the same records (the replications are
seeded by (seed, n, rep), so the order they run in does not matter).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from gatelab.gmoe.eval import hellinger, total_variation, voronoi_cells, voronoi_loss
from gatelab.gmoe.model import GaussianMoE
from gatelab.runs import atomic_write_bytes, fault_point, read_json
from gatelab.threads import torch_threads

SETTINGS = {  # name: (n_experts, top_k, split the first true atom in two)
    "exact": (3, 2, False),
    "over": (4, 3, True),
    "over_small": (4, 2, True),
}
THEORY = {  # predicted slope of log(loss) vs log(n); None: no convergence predicted
    "exact": {"hellinger": -0.5, "tv": -0.5, "voronoi": -0.5, "beta1": -0.5, "a": -0.5,
              "b": -0.5, "var": -0.5},
    "over": {"hellinger": -0.5, "tv": -0.5, "voronoi": -0.5, "beta1": -0.125, "a": -0.25,
             "b": -0.125, "var": -0.25},
    "over_small": {"hellinger": None, "tv": None, "voronoi": None, "beta1": None, "a": None,
                   "b": None, "var": None},
}  # fmt: skip


@dataclass(frozen=True)
class RateConfig:
    """Settings of the rate study (``quick`` and full presets via :meth:`preset`)."""

    sample_sizes: tuple[int, ...] = (1000, 2000, 5000, 10000, 20000, 50000, 100000)
    n_reps: int = 20  # replications per (setting, n); the paper's group used 40
    n_eval: int = 500  # inputs the density distances are averaged over
    max_iter: int = 2000  # EM iterations (the authors' setting)
    tol: float = 1e-6  # relative log-likelihood tolerance (the authors' setting)
    init_noise: float = 0.1  # sd of the perturbation of the true parameters EM starts from
    split_offset: float = 0.3  # distance between the two atoms a split true atom starts as
    seed: int = 0
    settings: tuple[str, ...] = ("exact", "over", "over_small")

    def __post_init__(self):
        if min(self.sample_sizes) < 50 or self.n_reps < 2 or self.n_eval < 10:
            raise ValueError("RateConfig: need sample_sizes >= 50, n_reps >= 2, n_eval >= 10")
        unknown = set(self.settings) - set(SETTINGS)
        if unknown:
            raise ValueError(
                f"RateConfig: unknown settings {sorted(unknown)}; use {list(SETTINGS)}"
            )

    @classmethod
    def preset(cls, quick: bool) -> RateConfig:
        """``quick``: 6 replications of n in 500..4000 (a 0.9-decade check); full: defaults."""
        if quick:
            return cls(sample_sizes=(500, 1000, 2000, 4000), n_reps=6)
        return cls()


def true_model() -> GaussianMoE:
    """The study's ground truth (see the module docstring for why these values)."""
    return GaussianMoE(
        beta0=[0.5, -0.5, 0.0],
        beta1=[[0.0], [2.5], [-2.5]],
        a=[[1.0], [-2.0], [3.0]],
        b=[0.5, -0.5, -1.5],
        var=[0.09, 0.16, 0.25],
        top_k=2,
    )


def sample_inputs(n: int, rng: np.random.Generator) -> np.ndarray:
    """Inputs uniform on ``[-1, 1]``, shape (n, 1)."""
    return rng.uniform(-1.0, 1.0, size=(n, 1))


def start_near_truth(setting: str, cfg: RateConfig, rng: np.random.Generator) -> GaussianMoE:
    """EM's starting point: the truth perturbed by ``init_noise`` (atom 0 split when over)."""
    true = true_model()
    n_experts, top_k, split = SETTINGS[setting]
    rows = [0, 0, 1, 2] if split else [0, 1, 2]
    beta0, beta1 = true.beta0[rows].copy(), true.beta1[rows].copy()
    a, b, var = true.a[rows].copy(), true.b[rows].copy(), true.var[rows].copy()
    if split:  # two atoms on either side of the true one, sharing its gate mass
        d = true.n_features
        direction = rng.standard_normal(2 * d + 2)
        direction *= cfg.split_offset / 2 / np.linalg.norm(direction)
        for i, sign in ((0, 1.0), (1, -1.0)):
            beta1[i] += sign * direction[:d]
            a[i] += sign * direction[d : 2 * d]
            b[i] += sign * direction[2 * d]
            var[i] *= np.exp(sign * direction[2 * d + 1])
        beta0[:2] -= np.log(2.0)
    noise = cfg.init_noise
    return GaussianMoE(
        beta0=beta0 + noise * rng.standard_normal(n_experts),
        beta1=beta1 + noise * rng.standard_normal(beta1.shape),
        a=a + noise * rng.standard_normal(a.shape),
        b=b + noise * rng.standard_normal(n_experts),
        var=var * np.exp(noise * rng.standard_normal(n_experts)),
        top_k=top_k,
    )


def raw_errors(fitted: GaussianMoE, true: GaussianMoE, cell_of: int | None) -> dict[str, float]:
    """Largest per-parameter error, over all atoms (``cell_of=None``) or one true atom's cell."""
    cells = voronoi_cells(fitted, true)
    pairs = [(i, j) for j, cell in enumerate(cells) for i in cell]
    if cell_of is not None:
        pairs = [(i, j) for i, j in pairs if j == cell_of]
    if not pairs:
        return {name: float("nan") for name in ("beta1", "a", "b", "var")}
    return {
        "beta1": max(np.linalg.norm(fitted.beta1[i] - true.beta1[j]) for i, j in pairs),
        "a": max(np.linalg.norm(fitted.a[i] - true.a[j]) for i, j in pairs),
        "b": max(abs(fitted.b[i] - true.b[j]) for i, j in pairs),
        "var": max(abs(fitted.var[i] - true.var[j]) for i, j in pairs),
    }


def run_replication(setting: str, n: int, rep: int, cfg: RateConfig) -> dict:
    """Simulate, fit from near the truth, and measure every loss for one replication.

    Runs with one torch thread (one per worker process), restored afterwards.
    """
    with torch_threads(1):
        return _replication(setting, n, rep, cfg)


def _replication(setting: str, n: int, rep: int, cfg: RateConfig) -> dict:
    from gatelab.gmoe.estimator import GaussianMoERegressor

    true = true_model()
    data_rng = np.random.default_rng([cfg.seed, n, rep])  # same data for every setting
    X = sample_inputs(n, data_rng)
    y = true.sample(X, data_rng)
    X_eval = sample_inputs(cfg.n_eval, np.random.default_rng([cfg.seed, 10**9]))
    init = start_near_truth(setting, cfg, np.random.default_rng([cfg.seed, n, rep, 1]))
    n_experts, top_k, split = SETTINGS[setting]
    est = GaussianMoERegressor(
        n_experts=n_experts, top_k=top_k, n_init=1, init=init, max_iter=cfg.max_iter, tol=cfg.tol
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-convergence is recorded, not warned, here
        est.fit(X, y)
    fitted = est.params_
    return {
        "setting": setting,
        "n": n,
        "rep": rep,
        "hellinger": hellinger(fitted, true, X_eval),
        "tv": total_variation(fitted, true, X_eval),
        "voronoi": voronoi_loss(fitted, true, kind="over" if split else "exact"),
        **raw_errors(fitted, true, cell_of=0 if split else None),
        "n_iter": est.n_iter_,
        "converged": est.converged_,
        "log_likelihood": est.log_likelihood_,
    }


def fingerprint(cfg: RateConfig) -> str:
    """Hash of the settings that change one replication's result (not n_reps or sizes).

    Code changes are not part of the key: delete ``runs/gmoe-rates/reps`` after changing the
    fitting or loss code.
    """
    keys = ("n_eval", "max_iter", "tol", "init_noise", "split_offset", "seed")
    payload = {k: getattr(cfg, k) for k in keys} | {"true": repr(true_model())}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


# fingerprint-free settings: they choose which replications run, not what one of them gives
STUDY_SIZE_KEYS = ("sample_sizes", "n_reps", "settings")


def _job(args):
    setting, n, rep, cfg = args
    return run_replication(setting, n, rep, cfg) | {"fingerprint": fingerprint(cfg)}


def _die_with_parent(parent: int) -> None:
    """Pool initializer: a worker whose parent was killed exits instead of waiting forever."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _save(record: dict, path: Path) -> dict:
    """Write one replication's record atomically (fault points ``gmoe-rep-write``, ``-done``)."""
    atomic_write_bytes(path, json.dumps(record).encode(), fault="gmoe-rep")
    fault_point("gmoe-rep-done")  # kill tests: die between two replications
    return record


def _order(record: dict) -> tuple:
    return record["setting"], record["n"], record["rep"]


def run_study(
    cfg: RateConfig, out_dir: Path, workers: int = 2, progress: Callable | None = None
) -> list[dict]:
    """Run (or resume) every replication; all per-replication records, by (setting, n, rep).

    A cached record is kept if its fingerprint is this configuration's (a corrupt one is
    reported naming its file); the others run, ``workers`` at a time.
    """
    cache = Path(out_dir) / "reps"
    cache.mkdir(parents=True, exist_ok=True)
    key = fingerprint(cfg)
    records, todo = [], []
    for setting in cfg.settings:
        for n in cfg.sample_sizes:
            for rep in range(cfg.n_reps):
                path = cache / f"{setting}_n{n}_r{rep}.json"
                if path.exists():
                    record = read_json(path)
                    if record.get("fingerprint") == key:
                        records.append(record)
                        continue
                todo.append(((setting, n, rep, cfg), path))
    todo.sort(key=lambda job: (-job[0][1], job[0][0] == "exact"))  # big jobs first balance the pool
    total = len(records) + len(todo)
    if progress:
        progress(len(records), total)
    if todo and workers <= 1:
        for job, path in todo:
            records.append(_save(_job(job), path))
            if progress:
                progress(len(records), total)
    elif todo:
        # fork (no re-import of __main__, works from any script); torch re-creates its thread
        # pool after fork and every worker runs single-threaded (run_replication)
        ctx = get_context("fork")
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=ctx,
            initializer=_die_with_parent,
            initargs=(os.getpid(),),
        ) as pool:
            futures = {pool.submit(_job, job): path for job, path in todo}
            for future in as_completed(futures):
                records.append(_save(future.result(), futures[future]))
                if progress:
                    progress(len(records), total)
    return sorted(records, key=_order)  # one order, however the run was split or interrupted


def config_dict(cfg: RateConfig) -> dict:
    """The configuration and the true model, as written to ``config.json``."""
    true = true_model()
    truth = {k: np.asarray(getattr(true, k)).tolist() for k in ("beta0", "beta1", "a", "b", "var")}
    return asdict(cfg) | {"true_model": truth | {"top_k": true.top_k}, "settings_def": SETTINGS}
