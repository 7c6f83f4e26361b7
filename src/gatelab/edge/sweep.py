"""``gatelab edge sweep``: train the gate once, then sweep energy and delay budgets.

Writes to ``out_dir`` (default ``runs/edge/``): ``config.json``, ``metrics.jsonl`` (gate training),
``gate.safetensors`` + ``router.json`` (what ``gatelab edge ask`` loads), ``experts.json``
(per-expert accuracy and costs), ``sweep.json`` (every method at every budget), ``summary.json``
(AIQ per method, selector call counts, the q(S) estimator chosen and why), ``outcomes.npz``
(every method's per-test-question score at every budget), ``intervals.json`` (MoE² minus each
baseline with paired bootstrap 95% intervals, per budget and averaged over budgets where at least
two experts fit), ``table.md`` and three PNG plots. Delay and energy are
*modelled* (see :class:`gatelab.edge.client.DeviceProfile`); measured wall-clock is reported
beside them in ``experts.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from gatelab import runs
from gatelab.cost import area_under_tradeoff, plot_tradeoff
from gatelab.edge.bootstrap import Interval, paired_bootstrap_budgets
from gatelab.edge.eval import (
    METHODS,
    Pool,
    SweepConfig,
    budget_grids,
    build_pool,
    category_models,
    evaluate_budget,
    gate_outputs,
    subset_quality,
)
from gatelab.edge.model import mixture, subset_mask
from gatelab.edge.run_rule import RunRuleChoice, choose_run_rule
from gatelab.edge.train import TrainConfig, evaluate_gate, train_gate
from gatelab.threads import torch_threads

LABELS = {
    "moe2": "MoE² (selector + gate)",
    "best_single": "best single expert",
    "greedy_per_joule": "greedy by accuracy/J",
    "random_subset": "random feasible subset",
    "all_uniform": "all experts, uniform",
    "router": "per-query router (gate argmax)",
}
COMPARED = ("best_single", "greedy_per_joule", "random_subset", "router")  # MoE² minus each
MIN_AFFORDABLE = 2  # budgets counted in the intervals: at least this many experts fit alone


def _aggregate_seconds(gate: torch.nn.Module, pool: Pool, top_k: int, repeats: int = 50) -> float:
    """Measured time to gate and combine one query (median of ``repeats``)."""
    x = torch.as_tensor(pool.x[:1])
    probs = torch.as_tensor(pool.table.probs[:1])
    allowed = subset_mask(range(probs.shape[1]), probs.shape[1])
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            mixture(gate(x), probs, allowed, top_k)
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def _expert_report(pool: Pool) -> dict:
    t, test = pool.table, pool.split == "test"
    report = {}
    for j, name in enumerate(t.experts):
        correct = t.probs[:, j].argmax(-1) == t.answer
        per_cat = {
            c: float(correct[test & (pool.category == c)].mean())
            for c in sorted(set(pool.category))
        }
        every = {  # the experts are not trained on any split: all questions measure them
            c: float(correct[pool.category == c].mean()) for c in sorted(set(pool.category))
        }
        report[name] = {
            "test_accuracy": float(correct[test].mean()),
            "test_accuracy_by_category": per_cat,
            "accuracy_all_questions": float(correct.mean()),
            "accuracy_by_category_all_questions": every,
            "answered": int(t.available[:, j].sum()),
            "missing": int((~t.available[:, j]).sum()),
            "modelled_energy_j_mean": float(np.nanmean(t.energy_j[:, j])),
            "modelled_delay_s_mean": float(np.nanmean(t.delay_s[:, j])),
            "measured_s_mean": float(np.nanmean(t.measured_s[:, j])),
            "prompt_tokens_mean": float(np.nanmean(t.prompt_tokens[:, j])),
            "gflops_mean": float(np.nanmean(t.flops[:, j]) / 1e9),
            "val_accuracy_by_normalization": _normalization_accuracy(pool, j),
        }
    return report


def _normalization_accuracy(pool: Pool, j: int) -> dict[str, float]:
    """Validation accuracy of expert ``j`` under each continuation length normalisation."""
    t, val = pool.table, pool.split == "val"
    if t.option_logprobs is None or np.isnan(t.option_logprobs[val, j]).any():
        return {}
    sums, tokens = t.option_logprobs[val, j], t.option_tokens[val, j]  # (V, 4)
    options = [q.options for q, v in zip(pool.questions, val, strict=True) if v]
    chars = np.array([[len(" " + o.strip()) for o in opts] for opts in options], dtype=float)
    scores = {"none": sums, "tokens": sums / np.maximum(tokens, 1), "chars": sums / chars}
    return {k: float((v.argmax(-1) == t.answer[val]).mean()) for k, v in scores.items()}


@torch_threads(1)  # tiny tensors: one thread is fastest (see gatelab.edge.model)
def run_sweep(
    cfg: SweepConfig,
    cache: str | Path,
    out_dir: str | Path,
    train_cfg: TrainConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Train the gate on the cached answers and sweep budgets; returns the summary dict."""
    # setup
    cache, out_dir = Path(cache), Path(out_dir)
    train_cfg = train_cfg or TrainConfig(seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    pool = build_pool(cfg, cache, out_dir)
    gate, history = train_gate(
        pool.data(pool.split == "train"), pool.data(pool.split == "val"), train_cfg
    )
    runs.truncate_metrics(out_dir, -1)  # the gate is retrained from scratch on every sweep
    for record in history:
        runs.append_metrics(out_dir, record)
    test = pool.data(pool.split == "test")
    gate_test = {
        "dense": evaluate_gate(gate, test),
        f"top{cfg.top_k}": evaluate_gate(gate, test, top_k=cfg.top_k),
    }
    logits = gate_outputs(gate, pool)
    aggregate_s = _aggregate_seconds(gate, pool, cfg.top_k)
    quality, choice, quality_data = subset_quality(pool, logits, cfg, train_cfg)
    models = category_models(pool, logits, cfg.top_k, quality)
    e_grid, d_grid = budget_grids(models, aggregate_s, cfg.n_budgets)
    grids = {"energy": e_grid, "delay": d_grid}
    if cfg.run_rule == "auto":
        rule = choose_run_rule(pool, quality_data, choice, grids, aggregate_s, cfg.top_k)
    else:
        rule = RunRuleChoice(cfg.run_rule, {}, 0, forced=True)
    # sweep
    rows, total = [], len(e_grid) + len(d_grid)
    for axis, grid in grids.items():
        for budget in grid:
            e_b, d_b = (budget, math.inf) if axis == "energy" else (math.inf, budget)
            result = evaluate_budget(
                pool, logits, models, e_b, d_b, aggregate_s, cfg, rng, rule.chosen
            )
            rows.append({"axis": axis, "budget": float(budget), **result})
            if progress:
                progress(len(rows), total)
    preserving = _optimality_check(gate, pool, train_cfg, cfg.top_k)
    # report
    outcomes = _pop_outcomes(rows)
    np.savez(
        out_dir / "outcomes.npz",
        test_qids=np.array([q.qid for q, s in zip(pool.questions, pool.split, strict=True)
                            if s == "test"]),
        axis=np.array([r["axis"] for r in rows]),
        budget=np.array([r["budget"] for r in rows]),
        **outcomes,
    )  # fmt: skip
    intervals = budget_intervals(rows, outcomes, cfg.seed, cfg.resamples)
    runs.atomic_write_json(out_dir / "intervals.json", intervals)
    summary = _write_outputs(
        cfg, train_cfg, pool, gate, models, rows, aggregate_s, rule.chosen, out_dir
    )
    summary["quality_estimator"] = dataclasses.asdict(choice)
    summary["run_rule"] = dataclasses.asdict(rule)
    summary["intervals"] = intervals
    summary["table"] += "\n\n" + interval_table(intervals)
    (out_dir / "table.md").write_text(summary["table"] + "\n")
    runs.save_checkpoint(
        out_dir / "gate.safetensors",
        config=_run_config(cfg, train_cfg, pool, gate, aggregate_s),
        step=len(history),
        modules={"gate": gate},
    )
    summary["gate_test"] = gate_test
    summary["optimality_preserving"] = preserving
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary


def _pop_outcomes(rows: list[dict]) -> dict[str, np.ndarray]:
    """Move each method's per-question ``correct`` out of ``rows``: method -> ``(rows, n_test)``."""
    return {m: np.array([r[m].pop("correct") for r in rows], dtype=np.float64) for m in METHODS}


def budget_intervals(
    rows: list[dict], outcomes: dict[str, np.ndarray], seed: int, resamples: int
) -> dict:
    """MoE² minus each of :data:`COMPARED`, per budget and averaged, with bootstrap intervals.

    Per axis, only budgets where at least :data:`MIN_AFFORDABLE` experts fit alone in every
    category are kept. Every comparison draws the same question resamples (seeded by ``seed``),
    shared by all budgets (:func:`gatelab.edge.bootstrap.paired_bootstrap_budgets`).
    """
    report = {"min_affordable": MIN_AFFORDABLE, "resamples": resamples, "confidence": 0.95}
    for axis in ("energy", "delay"):
        kept = [
            i
            for i, r in enumerate(rows)
            if r["axis"] == axis and r["selector"]["min_affordable"] >= MIN_AFFORDABLE
        ]
        entry = {
            "budgets": [rows[i]["budget"] for i in kept],
            "accuracy": {m: [rows[i][m]["accuracy"] for i in kept] for m in ("moe2", *COMPARED)},
            "difference": {},
        }
        for method in COMPARED if kept else ():
            per_budget, average = paired_bootstrap_budgets(
                outcomes["moe2"][kept],
                outcomes[method][kept],
                np.random.default_rng(seed),
                resamples,
            )
            entry["difference"][method] = {
                "per_budget": [i.to_dict() for i in per_budget],
                "average": average.to_dict(),
            }
        report[axis] = entry
    return report


def interval_table(intervals: dict) -> str:
    """Markdown: MoE² accuracy and its difference to each baseline (points, 95% interval)."""
    blocks = []
    for axis, unit, scale in (("energy", "J", 1.0), ("delay", "ms", 1e3)):
        entry = intervals[axis]
        head = f"| {axis} budget ({unit}) | MoE² acc | " + " | ".join(
            f"− {LABELS[m]}" for m in COMPARED
        )
        lines = [head + " |", "|---" * (len(COMPARED) + 2) + "|"]
        if not entry["budgets"]:
            blocks.append(f"No {axis} budget lets {intervals['min_affordable']} experts fit.")
            continue
        for k, budget in enumerate(entry["budgets"]):
            cells = [f"{budget * scale:.3g}", f"{entry['accuracy']['moe2'][k]:.3f}"]
            cells += [_points(entry["difference"][m]["per_budget"][k]) for m in COMPARED]
            lines.append("| " + " | ".join(cells) + " |")
        moe2 = float(np.mean(entry["accuracy"]["moe2"]))
        cells = [f"**average of {len(entry['budgets'])}**", f"{moe2:.3f}"]
        cells += [_points(entry["difference"][m]["average"]) for m in COMPARED]
        lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    n = intervals["energy"]["difference"] or intervals["delay"]["difference"]
    n_test = next(iter(n.values()))["average"]["n"] if n else 0
    note = (
        f"Differences in accuracy points, MoE² minus the method, with paired bootstrap 95% "
        f"intervals over the {n_test} test questions ({intervals['resamples']} resamples, shared "
        f"by all budgets); budgets where at least {intervals['min_affordable']} experts fit alone."
    )
    return "\n\n".join([*blocks, note])


def _points(interval: dict) -> str:
    return Interval(**interval).describe()


def _optimality_check(gate, pool: Pool, train_cfg: TrainConfig, top_k: int) -> list[dict]:
    """Test NLL of the full gate restricted to a subset vs a gate retrained on that subset."""
    n = len(pool.table.experts)
    subsets = [frozenset(range(i, i + 2)) for i in range(0, n - 1, 2)] + [frozenset(range(n - 1))]
    train, val = pool.data(pool.split == "train"), pool.data(pool.split == "val")
    test = pool.data(pool.split == "test")
    rows = []
    for subset in subsets:
        retrained, _ = train_gate(train, val, train_cfg, subset=subset)
        rows.append({
            "subset": [pool.table.experts[i] for i in sorted(subset)],
            "restricted_nll": evaluate_gate(gate, test, subset, top_k)["nll"],
            "retrained_nll": evaluate_gate(retrained, test, subset, top_k)["nll"],
        })  # fmt: skip
    return rows


def _curve(rows: list[dict], axis: str, method: str, x: str) -> np.ndarray:
    points = [
        (r["budget"] if x == "budget" else r[method][x], r[method]["accuracy"])
        for r in rows
        if r["axis"] == axis
    ]
    return np.array([p for p in points if np.isfinite(p[1])] or [(0.0, 0.0)])


def _run_config(cfg, train_cfg, pool, gate, aggregate_s: float) -> dict:
    """What a sweep ran with: ``config.json`` and the metadata of ``gate.safetensors``."""
    return {
        "sweep": dataclasses.asdict(cfg),
        "train": dataclasses.asdict(train_cfg),
        "gate": dataclasses.asdict(gate.config),
        "experts": pool.table.experts,
        "n_questions": len(pool.questions),
        "aggregate_s_measured": aggregate_s,
    }


def _write_outputs(
    cfg, train_cfg, pool, gate, models, rows, aggregate_s, run_rule: str, out_dir: Path
) -> dict:
    experts = pool.table.experts
    runs.atomic_write_json(
        out_dir / "config.json", _run_config(cfg, train_cfg, pool, gate, aggregate_s)
    )
    centroids = {
        c: pool.x[(pool.category == c) & (pool.split == "train")].mean(0).tolist() for c in models
    }
    router = {
        "experts": experts,
        "top_k": cfg.top_k,
        "aggregate_s": aggregate_s,
        "run_rule": run_rule,
        "categories": {
            c: {
                "energy_j": m.energy_j.tolist(),
                "delay_s": m.delay_s.tolist(),
                "base_quality": {
                    ",".join(map(str, sorted(s))): m.base_quality(s)
                    for s in _all_subsets(len(experts))
                },
                "centroid": centroids[c],
            }
            for c, m in models.items()
        },
    }
    (out_dir / "router.json").write_text(json.dumps(router) + "\n")
    (out_dir / "experts.json").write_text(json.dumps(_expert_report(pool), indent=2) + "\n")
    (out_dir / "sweep.json").write_text(json.dumps(rows, indent=2, default=float) + "\n")
    figures = []
    for axis, unit in (("energy", "J"), ("delay", "s")):
        curves = {LABELS[m]: _curve(rows, axis, m, "budget") for m in METHODS}
        figures.append(
            plot_tradeoff(
                curves,
                out_dir / f"accuracy_vs_{axis}_budget.png",
                xlabel=f"{axis} budget per query ({unit}, modelled)",
                ylabel="test accuracy",
                title=f"MoE² on {len(pool.questions)} questions: {axis} budget",
            )
        )
    aiq = {}
    for axis, key in (("energy", "energy_j"), ("delay", "delay_s")):
        curves = {m: _curve(rows, axis, m, key) for m in METHODS}
        costs = np.concatenate([c[:, 0] for c in curves.values()])
        span = (float(costs.min()), float(costs.max()))
        aiq[axis] = {m: area_under_tradeoff(c, span) for m, c in curves.items()}
    figures.append(
        plot_tradeoff(
            {LABELS[m]: _curve(rows, "energy", m, "energy_j") for m in METHODS},
            out_dir / "tradeoff_energy.png",
            xlabel="realised energy per query (J, modelled)",
            ylabel="test accuracy",
            title="Accuracy vs realised energy",
            hull=True,
        )
    )
    evaluations = sum(r["selector"]["evaluations"] for r in rows)
    feasible = sum(r["selector"]["feasible_subsets"] for r in rows)
    table = _table(rows)
    (out_dir / "table.md").write_text(table + "\n")
    return {
        "n_questions": len(pool.questions),
        "n_test": int((pool.split == "test").sum()),
        "experts": experts,
        "aiq": aiq,
        "selector_evaluations": evaluations,
        "feasible_subsets": feasible,
        "aggregate_s_measured": aggregate_s,
        "figures": [str(f) for f in figures],
        "table": table,
    }


def _all_subsets(n: int) -> list[frozenset[int]]:
    return [frozenset(i for i in range(n) if m >> i & 1) for m in range(1, 1 << n)]


def _table(rows: list[dict]) -> str:
    lines = [
        "| energy budget (J, modelled) | MoE² acc | MoE² J/query | best single acc "
        "| best single J/query | router acc | all-uniform acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["axis"] != "energy":
            continue
        m, s = r["moe2"], r["best_single"]
        uni = r["all_uniform"]["accuracy"]
        uni_text = f"{uni:.3f}" if np.isfinite(uni) else "over budget"
        lines.append(
            f"| {r['budget']:.3g} | {m['accuracy']:.3f} | {m['energy_j']:.3g} "
            f"| {s['accuracy']:.3f} | "
            f"{s['energy_j']:.3g} | {r['router']['accuracy']:.3f} | {uni_text} |"
        )
    return "\n".join(lines)
