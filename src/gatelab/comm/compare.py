"""Train every variant on the same trainer, evaluate, and write curves, tables and graph pictures.

Variants (papers.md §5 and issue #7): ``full`` (S = 1), ``commformer`` (learned graph at S),
``commformer_tg`` (learned graph + temporal gates + communication cost), ``random`` (a fixed random
graph at the same S) and ``none`` (no communication). Each (variant, seed) run lives in
``<out>/<env>/<variant>/seed<s>/`` with its checkpoint, scalars and ``eval.json``; finished runs are
skipped when the comparison is started again, unfinished ones resume from their checkpoint.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from gatelab.comm.checkpoint import checkpoint_update, load_model
from gatelab.comm.eval import evaluate
from gatelab.comm.train import TrainConfig, train

VARIANTS = ("full", "commformer", "commformer_tg", "random", "none")
METRICS = ("success_rate", "mean_steps", "mean_return", "comm_rate", "updates")


@dataclass(frozen=True)
class CompareConfig:
    """What :func:`compare` runs: one base training config per environment, seeds, evaluation."""

    base: TrainConfig  # environment and optimisation settings shared by every variant
    seeds: tuple[int, ...] = (0, 1, 2)  # >= 3 seeds in full mode (mean +- std)
    comm_cost: float = 0.1  # temporal-gate communication-cost coefficient (commformer_tg)
    comm_budget: float = 0.0  # > 0: commformer_tg trains budgeted gates (BUDGETED_GATES)
    gate_estimator: str = "causal"  # the budgeted gates' estimator: causal | hybrid
    eval_episodes: int = 100  # evaluation episodes per run
    jobs: int = 1  # runs trained in parallel processes
    max_minutes: float = 0.0  # wall-clock budget per run (0: none); reached updates are recorded
    eval_only: bool = False  # evaluate each run's last checkpoint as it is, train nothing


# commformer_tg with a communication budget (gatelab.comm.gating): gates open at first (the
# policy learns to use messages), then training gates tempered 1 -> 0.1 towards the execution
# threshold, and either the causal estimator (the gate classifies its observation on labels of
# the messages' effect on the policy; the label share adapts to meet the budget; gated from 30%
# of training) or the hybrid one (listening as a PPO action; the comm cost adapted by dual ascent;
# gated from half-way: earlier, its gates shut for good)
BUDGETED_GATES = {
    "causal": {
        "gate_estimator": "causal",
        "gate_warmup": 0.3,
        "gate_temp_min": 0.1,
        "budget_lr": 0.2,
        "comm_cost": 0.0,
    },
    "hybrid": {
        "gate_estimator": "hybrid",
        "gate_warmup": 0.5,
        "gate_temp_min": 0.1,
        "budget_lr": 0.01,
        "comm_cost": 0.0,
    },
}


def variant_config(
    base: TrainConfig,
    variant: str,
    seed: int,
    comm_cost: float,
    comm_budget: float = 0.0,
    gate_estimator: str = "causal",
) -> TrainConfig:
    """The training config of one (variant, seed); ``comm_budget > 0``: budgeted gates."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    changes: dict = {"seed": seed, "temporal_gate": False, "comm_cost": 0.0}
    if variant == "full":
        changes.update(graph="full", sparsity=1.0)
    elif variant == "commformer":
        changes.update(graph="learned")
    elif variant == "commformer_tg":
        changes.update(graph="learned", temporal_gate=True, comm_cost=comm_cost)
        if comm_budget > 0:
            changes.update(budgeted_gates(gate_estimator), comm_budget=comm_budget)
    else:
        changes.update(graph=variant)
    return replace(base, **changes)


def budgeted_gates(estimator: str) -> dict:
    """The :data:`BUDGETED_GATES` settings of ``estimator`` (one-line error if unknown)."""
    if estimator not in BUDGETED_GATES:
        raise ValueError(
            f"budgeted gates use one of {', '.join(BUDGETED_GATES)}, got {estimator!r}"
        )
    return BUDGETED_GATES[estimator]


def _run_one(job: tuple[dict, str, int, float, bool]) -> dict:
    """Train (or resume) and evaluate one run; returns its eval metrics and history.

    With ``eval_only`` an unevaluated run is evaluated from its last checkpoint (e.g. one cut by
    a time limit) and its scalars are cut back to that checkpoint's update.
    """
    cfg_dict, run_dir, eval_episodes, max_minutes, eval_only = job
    cfg = TrainConfig(**cfg_dict)
    run = Path(run_dir)
    done = run / "eval.json"
    if not done.exists():
        if not eval_only:
            train(cfg, run, resume=True, max_seconds=max_minutes * 60 or None)
        elif not (run / "model.safetensors").exists():
            raise FileNotFoundError(f"{run}: no checkpoint to evaluate (--eval-only)")
        model, train_cfg = load_model(run / "model.safetensors", cfg.device)
        history = _history(run)
        updates = checkpoint_update(run)
        history = [h for h in history if h["update"] <= updates]
        metrics = evaluate(model, train_cfg, eval_episodes, seed=10_000 + cfg.seed)
        metrics["updates"] = updates
        metrics["agent_steps"] = history[-1]["agent_steps"] if history else 0
        done.write_text(json.dumps(metrics, indent=2) + "\n")
    upto = json.loads(done.read_text())["updates"]
    history = [h for h in _history(run) if h["update"] <= upto]
    return {"eval": json.loads(done.read_text()), "history": history}


def _history(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compare(cfg: CompareConfig, out: str | Path, progress=None) -> dict:
    """Run all variants x seeds on ``cfg.base.env``; write results and figures under ``out/<env>``.

    Returns:
        ``{"table": {variant: {metric: [mean, std]}}, "runs": {variant: [eval dicts]}, ...}``.
    """
    env_dir = Path(out) / cfg.base.env
    env_dir.mkdir(parents=True, exist_ok=True)
    jobs, keys = [], []
    for variant in VARIANTS:
        for seed in cfg.seeds:
            run_cfg = variant_config(
                cfg.base, variant, seed, cfg.comm_cost, cfg.comm_budget, cfg.gate_estimator
            )
            run_dir = str(env_dir / variant / f"seed{seed}")
            jobs.append(
                (asdict(run_cfg), run_dir, cfg.eval_episodes, cfg.max_minutes, cfg.eval_only)
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
    env = cfg.base.env
    for key, name in (("train/success", "success"), ("train/return", "return")):
        path = env_dir / f"curves_{name}.png"
        plot_curves(curves, key, path, f"{env}: training {name}, mean +- std over seeds")
        figures.append(path)
    for variant in ("commformer", "commformer_tg", "random"):
        source = env_dir / variant / f"seed{cfg.seeds[0]}" / "graph.png"
        if source.exists():
            shutil.copyfile(source, env_dir / f"graph_{variant}.png")
            figures.append(env_dir / f"graph_{variant}.png")
    summary = {
        "env": env,
        "seeds": list(cfg.seeds),
        "base": asdict(cfg.base),
        "comm_cost": cfg.comm_cost,
        "comm_budget": cfg.comm_budget,
        "gate_estimator": cfg.gate_estimator if cfg.comm_budget > 0 else "st",
        "max_minutes": cfg.max_minutes,
        "eval_episodes": cfg.eval_episodes,
        "table": table,
        "targets": targets(table) if env in ("predator_prey", "predator_capture_prey") else None,
        "runs": runs,
        "figures": [str(f) for f in figures],
    }
    (env_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
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
