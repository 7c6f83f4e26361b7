"""``gatelab reproduce edge``: re-run the sweeps behind the tables of ``docs/edge.md``.

Three configurations (:data:`CONFIGS`), each one ``gatelab edge sweep`` over an answer cache:

- ``quick``: the quick set (108 questions, six experts) from the answer cache shipped in the
  package; ``gatelab edge sweep --quick``.
- ``full``: the full set (:func:`gatelab.edge.suites.full_questions`, 1351 questions), six
  experts; ``gatelab edge sweep`` on ``runs/edge/answers.jsonl``.
- ``full5``: the same questions, the five SmolLM2 experts only (the full cache without the Gemma
  answers); ``gatelab edge sweep --cache runs/edge/full5/answers.jsonl --out runs/edge/full5``.

The full cache ships in the package (``assets/answers_full.jsonl``, seeded into
``runs/edge/answers.jsonl``); :data:`COLLECT_COMMAND` regenerates or completes it (resumable).
While pairs are missing the quick tables and the per-category expert table
(:mod:`gatelab.edge.category_table`) are still written, then :func:`reproduce` refuses with a
one-line error naming that command. A sweep whose ``config.json`` matches is reused.

Each section has the per-expert table, accuracy per budget, AIQ, and MoE² minus the best single
expert, greedy, random and the per-query router with paired bootstrap 95% intervals (per budget
and averaged over budgets where at least two experts fit); ``tables.json`` holds the same
intervals, and each sweep folder its ``intervals.json``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gatelab import runs
from gatelab.edge.category_table import shipped_category_table
from gatelab.edge.collect import SHIPPED_FULL_CACHE, read_cache, seed_from_shipped
from gatelab.edge.eval import SweepConfig, questions_for
from gatelab.edge.experts import DEFAULT_POOL
from gatelab.edge.sweep import LABELS, interval_table, run_sweep
from gatelab.edge.train import TrainConfig

EXPECTED_TIME = (
    "about 3 min on 2 cores: the quick, full (1351 questions) and full5 sweeps from the shipped "
    "answer caches (completing a cache is `gatelab edge collect --in-process`, about 1 h of one "
    "core for all of it)"
)
COLLECT_COMMAND = "gatelab edge collect --in-process --cache runs/edge/answers.jsonl"
CONFIGS = {  # name: (quick question set, experts kept, sweep folder under runs/edge)
    "quick": (True, None, "quick"),
    "full": (False, None, "."),
    "full5": (False, "smollm2-", "full5"),
}
CATEGORIES = {"social_sciences": "social sci."}


def _missing_pairs(cache: Path, cfg: SweepConfig) -> int:
    """``(question, demo-pool expert)`` pairs of ``cfg``'s questions without an answer."""
    done = {key for key, record in read_cache(cache).items() if record["ok"]}
    return sum((q.qid, n) not in done for q in questions_for(cfg) for n, _ in DEFAULT_POOL)


def _sweep(cfg: SweepConfig, cache: Path, out: Path, progress) -> dict:
    """``run_sweep`` unless ``out`` already holds a sweep of the same configuration."""
    config, summary = out / "config.json", out / "summary.json"
    if config.is_file() and summary.is_file():
        saved = runs.read_json(config)
        wanted = {"sweep": dataclasses.asdict(cfg), "train": dataclasses.asdict(TrainConfig())}
        if runs.config_matches(saved, wanted, ignore=("gate", "experts", "n_questions",
                                                      "aggregate_s_measured")):  # fmt: skip
            return runs.read_json(summary)
    return run_sweep(cfg, cache, out, progress=progress)


def _filtered(cache: Path, prefix: str, out: Path) -> Path:
    """A copy of ``cache`` with the answers of experts named ``prefix...`` only."""
    out.mkdir(parents=True, exist_ok=True)
    kept = [
        line
        for line in cache.read_text().splitlines()
        if line and json.loads(line)["expert"].startswith(prefix)
    ]
    path = out / "answers.jsonl"
    text = "".join(line + "\n" for line in kept)
    if not path.is_file() or path.read_text() != text:
        runs.atomic_write_bytes(path, text.encode())
    return path


def expert_table(experts: dict) -> str:
    """Per-expert accuracy by category (all questions), test accuracy and mean costs."""
    names = list(experts)
    cats = sorted(experts[names[0]]["accuracy_by_category_all_questions"])
    head = [CATEGORIES.get(c, c) for c in cats] + ["all", "test", "J (modelled)"]
    head += ["delay ms (modelled)", "GFLOPs", "wall s (measured)"]
    lines = ["| expert | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name in names:
        e = experts[name]
        cells = [f"{e['accuracy_by_category_all_questions'][c]:.2f}" for c in cats]
        cells += [f"{e['accuracy_all_questions']:.3f}", f"{e['test_accuracy']:.3f}"]
        cells += [f"{e['modelled_energy_j_mean']:.3f}", f"{e['modelled_delay_s_mean'] * 1e3:.1f}"]
        cells += [f"{e['gflops_mean']:.1f}", f"{e['measured_s_mean']:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def budget_table(rows: list[dict], axis: str) -> str:
    """Test accuracy (and what MoE² and the best single expert spent) per budget of ``axis``."""
    unit, key, scale = ("J", "energy_j", 1.0) if axis == "energy" else ("ms", "delay_s", 1e3)
    lines = [
        f"| {axis} budget ({unit}) | MoE² acc | MoE² {unit}/query | best single acc "
        f"| best single {unit}/query | router | greedy | random | uniform |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["axis"] == axis):
        m, s, uni = r["moe2"], r["best_single"], r["all_uniform"]["accuracy"]
        cells = [f"{r['budget'] * scale:.3g}", f"{m['accuracy']:.3f}", f"{m[key] * scale:.3g}"]
        cells += [f"{s['accuracy']:.3f}", f"{s[key] * scale:.3g}"]
        cells += [f"{r[k]['accuracy']:.3f}" for k in ("router", "greedy_per_joule")]
        cells += [f"{r['random_subset']['accuracy']:.3f}"]
        cells += [f"{uni:.3f}" if np.isfinite(uni) else "over budget"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def aiq_table(summary: dict) -> str:
    """AIQ per method over energy and delay."""
    lines = ["| method | AIQ energy | AIQ delay |", "|---|---|---|"]
    for method, label in LABELS.items():
        energy, delay = summary["aiq"]["energy"][method], summary["aiq"]["delay"][method]
        lines.append(f"| {label} | {energy:.3f} | {delay:.3f} |")
    return "\n".join(lines)


def quality_line(summary: dict) -> str:
    """Which q(S) estimator the sweep used and the non-test fold errors behind the choice."""
    choice = summary["quality_estimator"]
    errors = ", ".join(f"{k} {v:.4f}" for k, v in choice["errors"].items())
    lam = f" (λ = {choice['lam']:g} questions)" if choice["chosen"] == "shrunk" else ""
    how = "given" if choice["forced"] else f"chosen on {choice['n_folds']} non-test folds"
    line = f"Subset quality q(S): {choice['chosen']}{lam}, {how}; fold errors {errors}."
    rule = summary.get("run_rule")
    if rule and rule["forced"]:
        line += f" Run rule: {rule['chosen']}, given."
    elif rule:  # sweeps before the run rule have none
        aiq = "; ".join(f"{r} {v['energy']:.4f} / {v['delay']:.4f}" for r, v in rule["aiq"].items())
        line += (
            f" Run rule: {rule['chosen']}, chosen on {rule['n_questions']} non-test questions"
            f" (validation AIQ energy / delay: {aiq})."
        )
    return line


def interval_section(summary: dict) -> str:
    """MoE² minus each baseline per budget and averaged, with paired bootstrap intervals."""
    return "\n\n".join([quality_line(summary), interval_table(summary["intervals"])])


def _section(name: str, out: Path, summary: dict) -> str:
    rows = runs.read_json(out / "sweep.json")
    gate = summary["gate_test"]
    return "\n\n".join([
        f"## {name}: {summary['n_questions']} questions, {summary['n_test']} test",
        expert_table(runs.read_json(out / "experts.json")),
        budget_table(rows, "energy"),
        budget_table(rows, "delay"),
        aiq_table(summary),
        interval_section(summary),
        f"Gate alone, test accuracy: dense {gate['dense']['accuracy']:.3f}, "
        f"top-k {next(v for k, v in gate.items() if k != 'dense')['accuracy']:.3f}. Selector: "
        f"{summary['selector_evaluations']} quality calls, {summary['feasible_subsets']} "
        "feasible subsets.",
    ])  # fmt: skip


def reproduce(
    runs_dir: Path, jobs: int = 1, progress: Callable[[int, int], None] | None = None
) -> Path:
    """Sweep every configuration of :data:`CONFIGS` and write ``reproduce/edge/tables.md``.

    ``jobs`` is accepted for the common interface; the sweeps run one after another (each is
    single-threaded and short).

    Raises:
        FileNotFoundError: the full answer cache is incomplete (after writing the quick tables);
            the message names :data:`COLLECT_COMMAND`.
    """
    edge = Path(runs_dir) / "edge"
    cache = edge / "answers.jsonl"
    target = Path(runs_dir) / "reproduce" / "edge"
    sections, results = [], {}
    quick = SweepConfig(quick=True)
    seed_from_shipped(cache, questions_for(quick))
    seed_from_shipped(cache, questions_for(SweepConfig()), SHIPPED_FULL_CACHE)
    missing = _missing_pairs(cache, SweepConfig())
    command = f"gatelab edge collect --in-process --cache {cache}"  # COLLECT_COMMAND, this dir
    table, n_test = shipped_category_table(cache)
    sections.append(f"## Expert accuracy per category: {n_test} test questions of the full set "
                    f"answered by all experts (best in bold)\n\n{table}")  # fmt: skip
    for name, (is_quick, prefix, folder) in CONFIGS.items():
        cfg = SweepConfig(quick=is_quick)
        if not is_quick and missing:
            sections.append(f"## {name}: not run\n\nThe answer cache lacks {missing} pairs: "
                            f"run `{command}` first.")  # fmt: skip
            continue
        out = edge / folder
        source = _filtered(cache, prefix, out) if prefix else cache
        summary = _sweep(cfg, source, out, progress)
        keys = (
            "n_questions",
            "n_test",
            "aiq",
            "gate_test",
            "quality_estimator",
            "run_rule",
            "intervals",
        )
        results[name] = {k: summary[k] for k in keys}
        sections.append(_section(name, out, summary))
    target.mkdir(parents=True, exist_ok=True)
    tables = target / "tables.md"
    tables.write_text("# edge (MoE²)\n\n" + "\n\n".join(sections) + "\n")
    runs.atomic_write_json(target / "tables.json", results)
    if missing:
        raise FileNotFoundError(
            f"full-set tables need the full answer cache ({missing} pairs missing): run "
            f"`{command}` first (quick tables written to {tables})"
        )
    return tables
