import json
import math
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from gatelab import runs
from gatelab.cli import app
from gatelab.edge import reproduce as reproduce_mod
from gatelab.edge.cli import default_out
from gatelab.edge.client import EdgeExpert
from gatelab.edge.costs import PROFILES
from gatelab.edge.eval import SweepConfig, questions_for
from gatelab.edge.router import ask, load_router, plan_subset
from gatelab.edge.served import load_served_models
from gatelab.edge.server import BackgroundServer, build_app
from gatelab.edge.sweep import run_sweep
from gatelab.edge.train import TrainConfig

EXPERTS = ["tiny-random", "tiny-random-l1-fewshot", "tiny-random-chat"]
ENERGY = [0.2, 0.05, 0.5]  # J per answer: constant, so realised cost equals the planned one
DELAY = [0.02, 0.01, 0.05]
GOOD_AT = {"tiny-random": {"sequences", "stem"}, "tiny-random-l1-fewshot": {"kinds"}}


def _write_cache(path, cfg):
    """Synthetic answers: each expert is sharp and right on its categories, noisy elsewhere.

    Embeddings are written too (category centre + noise), so the sweep skips MiniLM here; the
    encoder itself is tested in test_edge_data.py.
    """
    rng = np.random.default_rng(0)
    categories = sorted({q.category for q in questions_for(cfg)})
    centres = rng.normal(size=(len(categories), 384))
    emb = {}
    for q in questions_for(cfg):
        v = centres[categories.index(q.category)] + 0.5 * rng.normal(size=384)
        emb[q.qid] = v / np.linalg.norm(v)
    np.savez(path.parent / "embeddings.npz", **emb)
    with path.open("w") as f:
        for q in questions_for(cfg):
            for j, name in enumerate(EXPERTS):
                good = q.category in GOOD_AT.get(name, set()) or name == "tiny-random-chat"
                p = np.full(4, 0.05)
                p[q.answer if good and rng.random() < 0.9 else rng.integers(4)] = 0.85
                if name == "tiny-random-chat":  # the expensive generalist: right 60%
                    p = np.full(4, 0.2)
                    p[q.answer if rng.random() < 0.6 else rng.integers(4)] = 0.4
                record = {
                    "qid": q.qid, "expert": name, "ok": True, "probs": (p / p.sum()).tolist(),
                    "letters_found": 4, "measured_s": 0.01, "prompt_tokens": 40,
                    "completion_tokens": 1, "flops": 1e9, "modelled_delay_s": DELAY[j],
                    "modelled_energy_j": ENERGY[j],
                }  # fmt: skip
                f.write(json.dumps(record) + "\n")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("edge")
    cfg = SweepConfig(quick=True, n_budgets=5)
    _write_cache(out / "answers.jsonl", cfg)
    train = TrainConfig(max_steps=60, patience=30, lr=1e-2, d_hidden=16)
    summary = run_sweep(cfg, out / "answers.jsonl", out, train)
    return out, summary


def test_sweep_outputs_and_budgets_hold(swept):
    out, summary = swept
    for name in ("config.json", "sweep.json", "summary.json", "gate.safetensors", "table.md"):
        assert (out / name).exists()
    assert all((out / f).name.endswith(".png") and (out / f).exists() for f in summary["figures"])
    rows = json.loads((out / "sweep.json").read_text())
    for row in rows:
        limit = row["budget"] if row["axis"] == "energy" else math.inf
        for method in ("moe2", "best_single", "greedy_per_joule", "random_subset", "router"):
            assert row[method]["energy_j"] <= limit + 1e-9
            assert 0 <= row[method]["accuracy"] <= 1
        # the exact selector never does worse than the best single expert on its own objective
        assert row["selector"]["evaluations"] <= row["selector"]["feasible_subsets"]
    loose = [r for r in rows if r["axis"] == "energy"][-1]
    assert loose["moe2"]["accuracy"] >= loose["best_single"]["accuracy"] - 0.05
    assert set(summary["aiq"]["energy"]) >= {"moe2", "best_single", "router"}


def test_router_plans_within_budget(swept):
    out, _ = swept
    state = load_router(out)
    cheap = plan_subset(state, "kinds", energy_budget=0.06, delay_budget=math.inf)
    assert cheap == frozenset({1})
    assert plan_subset(state, "kinds", energy_budget=0.01, delay_budget=math.inf) == frozenset()
    with pytest.raises(ValueError, match="unknown category"):
        plan_subset(state, "cooking", 1.0, 1.0)


def test_live_ask_with_a_failing_expert(swept):
    out, _ = swept
    state = load_router(out)
    models = load_served_models(EXPERTS[:2])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    with BackgroundServer(build_app(models)) as server:
        experts = [EdgeExpert(n, server.url, PROFILES["cpu"]) for n in EXPERTS[:2]]
        experts.append(
            EdgeExpert(EXPERTS[2], f"http://127.0.0.1:{dead_port}", PROFILES["cpu"], backoff_s=0.01)
        )
        plans = {c: plan_subset(state, c, 10.0, 10.0) for c in state.categories}
        mixed = [c for c, p in sorted(plans.items()) if 2 in p and len(p) > 1]
        assert mixed, plans  # some category combines the (dead) generalist with another expert
        result = ask("What is 2 + 3?", ["4", "5", "6", "7"], experts, state, 10.0, 10.0, mixed[0])
    assert result.answer in "ABCD"
    assert sum(result.probs) == pytest.approx(1.0)
    answered = [n for n, v in result.per_expert.items() if v["status"] == "ok"]
    assert sum(result.weights[n] for n in answered) == pytest.approx(1.0)
    assert EXPERTS[2] in result.subset and len(answered) >= 1
    assert any("renormalised" in note for note in result.notes)
    assert result.weights[EXPERTS[2]] == 0


def test_cli(swept, tmp_path):
    out, _ = swept
    runner = CliRunner()
    assert runner.invoke(app, ["edge", "--help"]).exit_code == 0
    missing = runner.invoke(app, ["edge", "sweep", "--cache", str(tmp_path / "none.jsonl")])
    assert missing.exit_code == 2 and "not found" in missing.output
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yaml_path = tmp_path / "experts.yaml"
    yaml_path.write_text(
        "".join(
            f"- {{name: {n}, base_url: 'http://127.0.0.1:{port}', device: cpu, backoff_s: 0.01}}\n"
            for n in EXPERTS
        )
    )
    args = ["edge", "ask", "What is 2 + 3?", "--option", "4", "--option", "5", "--option", "6"]
    args += [
        "--option",
        "7",
        "--run-dir",
        str(out),
        "--experts",
        str(yaml_path),
        "--category",
        "kinds",
    ]
    dead = runner.invoke(app, args)
    assert dead.exit_code == 1 and "all selected experts failed" in dead.output
    assert "Traceback" not in dead.output
    bad = runner.invoke(app, [*args[:-4], "--run-dir", str(tmp_path / "nothing")])
    assert bad.exit_code == 2
    assert runner.invoke(app, ["edge", "serve", "--model", "gpt-5"]).exit_code == 2


def test_gate_checkpoint_carries_its_config(swept):
    out, _ = swept
    config = json.loads(runs.read_checkpoint_metadata(out / "gate.safetensors")["config"])
    assert config["gate"]["n_experts"] == len(EXPERTS)
    assert config["sweep"]["quick"] is True
    assert runs.read_json(out / "config.json") == config


def test_quick_never_overrides_explicit_flags(swept, tmp_path):
    out, _ = swept
    assert default_out(None, quick=True) == Path("runs/edge/quick")
    assert default_out(tmp_path, quick=True) == tmp_path
    target = tmp_path / "mine"
    target.mkdir()
    shutil.copy(out / "embeddings.npz", target / "embeddings.npz")  # skip MiniLM
    args = ["edge", "sweep", "--quick", "--cache", str(out / "answers.jsonl"), "--out", str(target)]
    result = CliRunner().invoke(app, [*args, "--n-budgets", "2", "--top-k", "1"])
    assert result.exit_code == 0, result.output
    config = runs.read_json(target / "config.json")["sweep"]
    assert config["n_budgets"] == 2 and config["top_k"] == 1 and config["quick"] is True
    bad = CliRunner().invoke(app, ["edge", "collect", "--method", "vibes"])
    assert bad.exit_code == 2


def test_reproduce_writes_quick_tables_and_refuses_without_the_full_cache(
    swept, tmp_path, monkeypatch
):
    out, summary = swept
    calls = []

    def fake_sweep(cfg, cache, target, progress):  # the real sweep's outputs, copied
        calls.append((cfg.quick, target.name))
        shutil.copytree(out, target, dirs_exist_ok=True)
        return summary

    monkeypatch.setattr(reproduce_mod, "_sweep", fake_sweep)
    monkeypatch.setattr(reproduce_mod, "SHIPPED_FULL_CACHE", tmp_path / "none.jsonl")  # no full
    with pytest.raises(FileNotFoundError, match="gatelab edge collect"):
        reproduce_mod.reproduce(tmp_path)
    assert calls == [(True, "quick")]  # the full-set sweeps are refused, not run on partial data
    tables = (tmp_path / "reproduce" / "edge" / "tables.md").read_text()
    assert "## quick" in tables and "| energy budget (J) |" in tables
    assert tables.count("run `gatelab edge collect") == 2
    assert set(json.loads((tmp_path / "reproduce/edge/tables.json").read_text())) == {"quick"}


def test_reproduce_configurations_are_the_documented_commands():
    doc = (Path(__file__).parents[2] / "docs" / "edge.md").read_text()
    assert set(reproduce_mod.CONFIGS) == {"quick", "full", "full5"}
    for command in (
        "gatelab edge sweep --quick",
        reproduce_mod.COLLECT_COMMAND,
        "gatelab edge sweep --cache runs/edge/full5/answers.jsonl --out runs/edge/full5",
    ):
        assert command in doc


def test_intervals_come_from_the_per_question_outcomes(swept):
    out, summary = swept
    rows = json.loads((out / "sweep.json").read_text())
    outcomes = np.load(out / "outcomes.npz")
    assert len(outcomes["test_qids"]) == summary["n_test"]
    assert not set(outcomes["test_qids"]) & set(_non_test_qids(out))
    for k, row in enumerate(rows):  # the stored scores are the reported accuracies
        assert "correct" not in row["moe2"]
        for method in ("moe2", "best_single", "greedy_per_joule", "random_subset", "router"):
            assert outcomes[method][k].mean() == pytest.approx(row[method]["accuracy"])
    intervals = json.loads((out / "intervals.json").read_text())
    assert intervals == summary["intervals"]
    for axis in ("energy", "delay"):
        entry = intervals[axis]
        kept = [r for r in rows if r["axis"] == axis and r["selector"]["min_affordable"] >= 2]
        assert entry["budgets"] == [r["budget"] for r in kept]
        assert kept, axis
        for method, diff in entry["difference"].items():
            gaps = [r["moe2"]["accuracy"] - r[method]["accuracy"] for r in kept]
            for gap, interval in zip(gaps, diff["per_budget"], strict=True):
                assert interval["mean"] == pytest.approx(gap)
                assert interval["low"] - 1e-12 <= interval["mean"] <= interval["high"] + 1e-12
            assert diff["average"]["mean"] == pytest.approx(np.mean(gaps))
    assert "average of" in summary["table"] and "−" in (out / "table.md").read_text()
    choice = summary["quality_estimator"]
    assert choice["chosen"] in ("holdout", "crossfit", "shrunk") and not choice["forced"]
    assert set(choice["errors"]) == {"holdout", "crossfit", "shrunk"}
    rule = summary["run_rule"]
    assert rule["chosen"] in ("hull_argmax", "selected_set") and not rule["forced"]
    assert set(rule["aiq"]) == {"hull_argmax", "selected_set"}
    assert json.loads((out / "router.json").read_text())["run_rule"] == rule["chosen"]


def _non_test_qids(out):
    from gatelab.edge.data import split_questions

    cfg = SweepConfig(quick=True, n_budgets=5)
    splits = split_questions(questions_for(cfg), seed=cfg.seed)
    return [q.qid for name in ("train", "val") for q in splits[name]]


def test_subset_quality_reads_no_test_question(swept):
    """Scramble every test question (embedding, answers, gold): q(S) and the choices stay put."""
    import dataclasses

    from gatelab.edge.eval import budget_grids, build_pool, category_models, subset_quality
    from gatelab.edge.run_rule import choose_run_rule
    from gatelab.edge.select import RUN_RULES

    out, _ = swept
    cfg = SweepConfig(quick=True, n_budgets=5)
    train = TrainConfig(max_steps=20, patience=20, lr=1e-2, d_hidden=8)
    pool = build_pool(cfg, out / "answers.jsonl", out)
    logits = np.random.default_rng(0).normal(size=(len(pool.questions), len(EXPERTS)))
    table, choice, data = subset_quality(pool, logits, cfg, train)
    test = pool.split == "test"
    rng = np.random.default_rng(1)
    x = pool.x.copy()
    x[test] = rng.normal(size=x[test].shape)
    probs = pool.table.probs.copy()
    probs[test] = rng.dirichlet(np.ones(4), size=probs[test].shape[:2])
    answer = pool.table.answer.copy()
    answer[test] = (answer[test] + 1) % 4
    scrambled_table = dataclasses.replace(pool.table, probs=probs, answer=answer)
    scrambled = dataclasses.replace(pool, x=x, table=scrambled_table)
    logits2 = logits.copy()
    logits2[test] = rng.normal(size=logits2[test].shape)
    table2, choice2, data2 = subset_quality(scrambled, logits2, cfg, train)
    assert choice2 == choice
    assert table2 == table
    # the run rule's nested comparison reads no test question either
    models = category_models(pool, logits, cfg.top_k, table)
    e_grid, d_grid = budget_grids(models, 1e-3, cfg.n_budgets)
    grids = {"energy": e_grid, "delay": d_grid}
    rule = choose_run_rule(pool, data, choice, grids, 1e-3, cfg.top_k)
    rule2 = choose_run_rule(scrambled, data2, choice2, grids, 1e-3, cfg.top_k)
    assert rule == rule2 and rule.chosen in RUN_RULES
    assert rule.n_questions == int((pool.split != "test").sum())
    assert all(0 <= v <= 1 for axes in rule.aiq.values() for v in axes.values())
    assert set(table) == set(pool.category) and len(table["kinds"]) == 2 ** len(EXPERTS) - 1
