"""Train every variant on the same trainer, evaluate, and write curves, tables and graph pictures.

Variants: ``full`` (S = 1), ``commformer`` (learned graph at S, arXiv:2405.08550),
``commformer_tg`` (learned graph + temporal gates: straight-through with a communication cost, or
causal gates meeting a budget), ``random`` (a fixed random graph at the same S) and ``none`` (no
communication). Each (variant, seed) run lives in ``<out>/<env>/<variant>/seed<s>/`` with its
checkpoint, metrics and ``eval.json``; finished runs are skipped when the comparison is started
again, unfinished ones resume from their checkpoint.
"""

from __future__ import annotations

import multiprocessing
import shutil
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

import numpy as np

from gatelab.comm.config import Env, GateConfig, Graph, TrainConfig
from gatelab.comm.eval import evaluate
from gatelab.comm.train import CHECKPOINT, load_model, train
from gatelab.runs import atomic_write_json, read_checkpoint_metadata, read_json, read_metrics


class Variant(StrEnum):
    """The communication variants :func:`compare` trains."""

    full = "full"
    commformer = "commformer"
    commformer_tg = "commformer_tg"
    random = "random"
    none = "none"


VARIANTS = tuple(v.value for v in Variant)
METRICS = ("success_rate", "mean_steps", "mean_return", "comm_rate", "updates")
# the environments compare's presets cover
COMPARE_ENVS = (Env.predator_prey, Env.predator_capture_prey, Env.simple_spread)


@dataclass(frozen=True)
class CompareConfig:
    """What :func:`compare` runs: one base training config per environment, seeds, evaluation."""

    base: TrainConfig  # environment and optimisation settings shared by every variant
    seeds: tuple[int, ...] = (0, 1, 2)  # >= 3 seeds in full mode (mean +- std)
    comm_cost: float = 0.1  # straight-through temporal gates' cost (commformer_tg, no budget)
    comm_budget: float = 0.0  # > 0: commformer_tg trains causal gates meeting it
    eval_episodes: int = 100  # evaluation episodes per run
    jobs: int = 1  # runs trained in parallel processes
    max_minutes: float = 0.0  # wall-clock budget per run (0: none); reached updates are recorded
    eval_only: bool = False  # evaluate each run's last checkpoint as it is, train nothing


def variant_config(
    base: TrainConfig, variant: Variant | str, seed: int, comm_cost: float, comm_budget: float = 0.0
) -> TrainConfig:
    """The training config of one (variant, seed); ``comm_budget > 0``: causal gates."""
    variant = Variant(variant)
    model = replace(base.model, temporal_gate=False)
    gate = GateConfig()
    if variant is Variant.full:
        model = replace(model, graph=Graph.full, sparsity=1.0)
    elif variant in (Variant.commformer, Variant.commformer_tg):
        model = replace(model, graph=Graph.learned)
    else:
        model = replace(model, graph=Graph(variant.value))
    if variant is Variant.commformer_tg:
        model = replace(model, temporal_gate=True)
        gate = (
            GateConfig.budgeted(comm_budget) if comm_budget > 0 else GateConfig(comm_cost=comm_cost)
        )
    return replace(base, model=model, gate=gate, seed=seed)


def compare_configs(
    quick: bool,
    envs: list[Env] | None = None,
    seeds: int | None = None,
    updates: int = 0,
    jobs: int = 1,
    max_minutes: float = 0.0,
    comm_cost: float = 0.1,
    eval_only: bool = False,
    comm_budget: float = 0.0,
    memory: bool = False,
) -> list[CompareConfig]:
    """The :class:`CompareConfig` of each environment for ``gatelab comm compare``.

    Each environment's :meth:`TrainConfig.preset` (``updates > 0`` replaces its updates), every
    variant with or without ``memory`` alike; ``seeds`` (default 3, quick 1); quick: 50
    evaluation episodes (else 200).
    """
    envs = [Env(e) for e in envs or COMPARE_ENVS]
    unknown = [e.value for e in envs if e not in COMPARE_ENVS]
    if unknown:
        choices = ", ".join(e.value for e in COMPARE_ENVS)
        raise ValueError(f"compare supports {choices}; got {unknown[0]!r}")
    # an invalid budget or cost: a one-line error before any run
    GateConfig.budgeted(comm_budget) if comm_budget > 0 else GateConfig(comm_cost=comm_cost)
    seeds = seeds if seeds is not None else 1 if quick else 3
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    out = []
    for env in envs:
        base = TrainConfig.preset(env, quick)
        base = base.with_(env={"memory": memory}, ppo={"updates": updates or base.ppo.updates})
        out.append(
            CompareConfig(
                base=base,
                seeds=tuple(range(seeds)),
                eval_episodes=50 if quick else 200,
                jobs=jobs,
                max_minutes=max_minutes,
                comm_cost=comm_cost,
                comm_budget=comm_budget,
                eval_only=eval_only,
            )
        )
    return out


def _run_one(job: tuple[dict, str, int, float, bool]) -> dict:
    """Train (or resume) and evaluate one run; returns its eval metrics and history.

    With ``eval_only`` an unevaluated run is evaluated from its last checkpoint (e.g. one cut by
    a time limit) and its metrics are cut back to that checkpoint's update.
    """
    cfg_dict, run_dir, eval_episodes, max_minutes, eval_only = job
    cfg = TrainConfig.from_dict(cfg_dict)
    run = Path(run_dir)
    done = run / "eval.json"
    if not done.exists():
        if not eval_only:
            train(cfg, run, max_seconds=max_minutes * 60 or None)
        elif not (run / CHECKPOINT).exists():
            raise FileNotFoundError(f"{run}: no checkpoint to evaluate (--eval-only)")
        model, train_cfg = load_model(run / CHECKPOINT, cfg.device)
        updates = int(read_checkpoint_metadata(run / CHECKPOINT)["step"])
        history = [h for h in read_metrics(run) if h["step"] <= updates]
        metrics = evaluate(model, train_cfg.env, eval_episodes, seed=10_000 + cfg.seed)
        metrics["updates"] = updates
        metrics["agent_steps"] = history[-1]["agent_steps"] if history else 0
        atomic_write_json(done, metrics)
    upto = read_json(done)["updates"]
    history = [h for h in read_metrics(run) if h["step"] <= upto]
    return {"eval": read_json(done), "history": history}


def run_dirs(cfg: CompareConfig, out: str | Path) -> list[tuple[str, int, Path]]:
    """``(variant, seed, run folder)`` of every run of :func:`compare`, in the order it runs them.

    A folder holding ``eval.json`` is an evaluated run, which :func:`compare` reuses.
    """
    env_dir = _env_dir(cfg, out)
    return [(v, s, _run_dir(env_dir, v, s)) for v in VARIANTS for s in cfg.seeds]


def _env_dir(cfg: CompareConfig, out: str | Path) -> Path:
    """The folder of one environment's comparison: runs, results and figures."""
    return Path(out) / cfg.base.env.name.replace(".", "_")


def _run_dir(env_dir: Path, variant: str, seed: int) -> Path:
    return env_dir / variant / f"seed{seed}"


def compare(cfg: CompareConfig, out: str | Path, progress=None) -> dict:
    """Run all variants x seeds on ``cfg.base.env``; write results and figures under ``out/<env>``.

    Returns:
        ``{"table": {variant: {metric: [mean, std]}}, "runs": {variant: [eval dicts]}, ...}``.
    """
    env_dir = _env_dir(cfg, out)
    env_dir.mkdir(parents=True, exist_ok=True)
    jobs, keys = [], []
    for variant, seed, run_dir in run_dirs(cfg, out):
        run_cfg = variant_config(cfg.base, variant, seed, cfg.comm_cost, cfg.comm_budget)
        jobs.append(
            (run_cfg.to_dict(), str(run_dir), cfg.eval_episodes, cfg.max_minutes, cfg.eval_only)
        )
        keys.append(variant)
    results: list[dict] = []
    if cfg.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(cfg.jobs) as pool:
            for i, result in enumerate(pool.imap(_run_one, jobs)):
                results.append(result)
                if progress:
                    progress(i + 1, len(jobs))
    else:
        for i, job in enumerate(jobs):
            results.append(_run_one(job))
            if progress:
                progress(i + 1, len(jobs))
    return _summarise(cfg, env_dir, keys, results)


def _summarise(cfg: CompareConfig, env_dir: Path, keys: list[str], results: list[dict]) -> dict:
    from gatelab.comm.plots import plot_curves

    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    curves: dict[str, list[list[dict]]] = {v: [] for v in VARIANTS}
    for key, result in zip(keys, results, strict=True):
        runs[key].append(result["eval"])
        curves[key].append(result["history"])
    table = {
        v: {
            m: [float(np.mean([r[m] for r in runs[v]])), float(np.std([r[m] for r in runs[v]]))]
            for m in METRICS
        }
        for v in VARIANTS
    }
    figures = []
    env = cfg.base.env.name.replace(".", "_")
    for key, name in (("train/success", "success"), ("train/return", "return")):
        path = env_dir / f"curves_{name}.png"
        plot_curves(curves, key, path, f"{env}: training {name}, mean +- std over seeds")
        figures.append(path)
    for variant in ("commformer", "commformer_tg", "random"):
        source = _run_dir(env_dir, variant, cfg.seeds[0]) / "graph.png"
        if source.exists():
            shutil.copyfile(source, env_dir / f"graph_{variant}.png")
            figures.append(env_dir / f"graph_{variant}.png")
    summary = {
        "env": env,
        "seeds": list(cfg.seeds),
        "base": cfg.base.to_dict(),
        "comm_cost": cfg.comm_cost,
        "comm_budget": cfg.comm_budget,
        "gate_estimator": "causal" if cfg.comm_budget > 0 else "st",
        "max_minutes": cfg.max_minutes,
        "eval_episodes": cfg.eval_episodes,
        "table": table,
        "targets": targets(table) if env in ("predator_prey", "predator_capture_prey") else None,
        "runs": runs,
        "figures": [str(f) for f in figures],
    }
    atomic_write_json(env_dir / "results.json", summary)
    (env_dir / "results.md").write_text(results_markdown(summary) + "\n")
    return summary


def targets(table: dict) -> dict:
    """The issue's comparisons on the mean success rates (and comm rates) of ``table``.

    Returns ``cf_over_full`` (commformer / full success), ``full_minus_none`` and
    ``cf_minus_none`` (points of success), ``cf_minus_random``, ``tg_rate_cut`` (1 - comm rate of
    commformer_tg / commformer) and ``tg_success_loss`` (commformer - commformer_tg), with the
    issue's pass/fail verdict of each target.
    """
    s = {v: table[v]["success_rate"][0] for v in VARIANTS}
    rate = {v: table[v]["comm_rate"][0] for v in VARIANTS}
    out = {
        "cf_over_full": s["commformer"] / s["full"] if s["full"] > 0 else float("nan"),
        "full_minus_none": s["full"] - s["none"],
        "cf_minus_none": s["commformer"] - s["none"],
        "cf_minus_random": s["commformer"] - s["random"],
        "tg_rate_cut": 1 - rate["commformer_tg"] / rate["commformer"]
        if rate["commformer"]
        else 0.0,
        "tg_success_loss": s["commformer"] - s["commformer_tg"],
    }
    out["met"] = {
        "cf_95pct_of_full": bool(out["cf_over_full"] >= 0.95),
        "full_and_cf_beat_none_by_10pts": bool(
            min(out["full_minus_none"], out["cf_minus_none"]) >= 0.10
        ),
        "learned_beats_random": bool(out["cf_minus_random"] > 0),
        "tg_cuts_50pct_losing_le_5pts": bool(
            out["tg_rate_cut"] >= 0.5 and out["tg_success_loss"] <= 0.05
        ),
    }
    return out


def results_markdown(summary: dict) -> str:
    """The results table as markdown (mean +- std over seeds)."""
    n = len(summary["seeds"])
    lines = [
        f"`{summary['env']}`, {n} seed(s), {summary['eval_episodes']} evaluation episodes each",
        "",
        "| variant | success rate | mean steps | mean return | comm rate | updates |",
        "|---|---|---|---|---|---|",
    ]
    for variant, row in summary["table"].items():
        cells = [f"{row[m][0]:.3f} ± {row[m][1]:.3f}" for m in METRICS]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    t = summary.get("targets")
    if t:
        lines += [
            "",
            f"commformer / full success = {t['cf_over_full']:.3f}; full - none = "
            f"{t['full_minus_none']:+.3f}; commformer - none = {t['cf_minus_none']:+.3f}; "
            f"commformer - random = {t['cf_minus_random']:+.3f}; temporal gates cut the comm rate "
            f"by {t['tg_rate_cut']:.1%} and lose {t['tg_success_loss']:+.3f} success.",
            "Targets met: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in t["met"].items()),
        ]
    return "\n".join(lines)
