import json
from pathlib import Path

import pytest

from gatelab.cli import main


def test_help(capsys):
    assert main(["comm", "--help"]) == 0
    assert "compare" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--sparsity", "1.5"], "sparsity must be in [0, 1]"),
        (["--sparsity", "-0.1"], "sparsity must be in [0, 1]"),
        (["--agents", "1"], "agents must be >= 2"),
        (["--temporal-gate", "--comm-budget", "1.5"], "comm_budget must be in [0, 1]"),
        (["--temporal-gate", "--comm-budget", "0.2", "--comm-cost", "0.1"], "--comm-cost"),
        (["--temporal-gate", "--comm-cost", "nan"], "comm_cost must be a finite number"),
        (["--temporal-gate", "--comm-cost", "inf"], "comm_cost must be a finite number"),
        (["--comm-cost", "0.1"], "add --temporal-gate"),
        (["--comm-budget", "0.2"], "add --temporal-gate"),
        (["--grid", "1"], "grid must be >= 2"),
        (["--episode-limit", "-3"], "episode_limit must be >= 0"),
        (["--env-arg", "N=3"], "env_kwargs are for PettingZoo modules"),
        (["--env", "mpe2.simple_spread_v3", "--agents", "3"], "--agents: mpe2.simple_spread_v3"),
        (
            ["--env", "mpe2.simple_spread_v3", "--env-arg", "continuous_actions=true"],
            "needs discrete actions",
        ),
        (["--env", "mpe2.simple_spread_v3", "--env-arg", "N"], "--env-arg must be KEY=VALUE"),
    ],
)
def test_bad_train_config_is_one_line_exit_2(args, match, capsys, tmp_path):
    code = main(["comm", "train", *args, "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert match in err and len(err.splitlines()) == 1 and err.startswith("gatelab: error:")


def test_unknown_env_is_a_usage_error_exit_2(capsys):
    assert main(["comm", "train", "--env", "starcraft"]) == 2
    assert "starcraft" in capsys.readouterr().err


def test_train_a_pettingzoo_module_from_the_cli(tmp_path):
    from gatelab.comm.train import load_model

    run = tmp_path / "mpe"
    args = ["--env", "mpe2.simple_spread_v3", "--env-arg", "N=2", "--env-arg", "max_cycles=4"]
    assert main(["comm", "train", *args, "--updates", "1", "--n-envs", "2",
                 "--run-dir", str(run)]) == 0  # fmt: skip
    model, cfg = load_model(run / "model.safetensors")
    assert cfg.env.name == "mpe2.simple_spread_v3" and cfg.env.env_kwargs == {
        "N": 2,
        "max_cycles": 4,
    }
    assert model.cfg.n_agents == 2


def test_rerun_resumes_or_refuses_naming_fresh(tmp_path, capsys):
    run = str(tmp_path / "r")
    tiny = ["--agents", "2", "--grid", "3", "--episode-limit", "4", "--n-envs", "2"]
    args = ["comm", "train", *tiny, "--updates", "1", "--run-dir", run]
    assert main(args) == 0
    before = (tmp_path / "r" / "model.safetensors").read_bytes()
    assert main(args) == 0  # the same run: nothing to do, nothing overwritten
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == before
    capsys.readouterr()
    assert main([*args, "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "another configuration (differs in:" in err and "train.seed" in err and "--fresh" in err
    assert len(err.splitlines()) == 1
    assert main([*args, "--seed", "1", "--fresh"]) == 0


def test_eval_loads_a_checkpoint_moved_on_its_own(tmp_path):
    run = tmp_path / "r"
    tiny = ["--agents", "2", "--grid", "3", "--episode-limit", "4", "--n-envs", "2"]
    assert main(["comm", "train", *tiny, "--updates", "1", "--run-dir", str(run)]) == 0
    alone = tmp_path / "elsewhere" / "ckpt.safetensors"
    alone.parent.mkdir()
    (run / "model.safetensors").rename(alone)
    import shutil

    shutil.rmtree(run)  # no config.json, no metrics: the file carries its configuration
    out = tmp_path / "m.json"
    assert main(["comm", "eval", "--checkpoint", str(alone), "--episodes", "3",
                 "--json", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["episodes"] == 3


def test_quick_never_overrides_explicit_flags(tmp_path):
    from gatelab.comm.train import load_model
    from gatelab.runs import read_metrics

    run = tmp_path / "q"
    assert main(["comm", "train", "--quick", "--updates", "2", "--run-dir", str(run)]) == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2]  # not the preset's 25
    _, cfg = load_model(run / "model.safetensors")
    assert (cfg.ppo.updates, cfg.ppo.n_envs, cfg.env.agents, cfg.env.grid) == (2, 32, 3, 5)
    run = tmp_path / "q2"
    args = ["--quick", "--updates", "1", "--agents", "4", "--n-envs", "5", "--grid", "6"]
    assert main(["comm", "train", *args, "--run-dir", str(run)]) == 0
    _, cfg = load_model(run / "model.safetensors")
    assert (cfg.ppo.updates, cfg.ppo.n_envs, cfg.env.agents, cfg.env.grid) == (1, 5, 4, 6)
    assert cfg.env.episode_limit == 20  # a flag not given: the quick preset's


def test_compare_quick_keeps_explicit_seeds():
    from gatelab.comm.compare import compare_configs

    assert compare_configs(True)[0].seeds == (0,)
    assert compare_configs(True, seeds=2)[0].seeds == (0, 1)
    assert compare_configs(True, updates=3)[0].base.ppo.updates == 3
    assert compare_configs(False)[0].seeds == (0, 1, 2)


def test_eval_missing_checkpoint_exit_2(capsys, tmp_path):
    assert main(["comm", "eval", "--checkpoint", str(tmp_path / "none.safetensors")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_train_then_eval_json(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["comm", "train", "--agents", "2", "--grid", "3", "--episode-limit", "5"]
    args += ["--updates", "1", "--n-envs", "4", "--temporal-gate", "--comm-cost", "0.1"]
    assert main([*args, "--run-dir", str(run)]) == 0
    causal = tmp_path / "causal"
    budget = ["--comm-budget", "0.2", "--memory", "--updates", "2"]
    assert main([*args[:-2], *budget, "--run-dir", str(causal)]) == 0
    saved = json.loads((causal / "config.json").read_text())["train"]
    assert saved["gate"]["comm_budget"] == 0.2 and saved["gate"]["warmup"] == 0.3
    out = tmp_path / "out.json"
    ckpt = str(run / "model.safetensors")
    assert main(["comm", "eval", "--checkpoint", ckpt, "--episodes", "7", "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert {"success_rate", "mean_steps", "mean_return", "comm_rate"} <= set(metrics)
    assert all(isinstance(metrics[k], float) for k in ("success_rate", "mean_steps"))
    assert 0.0 <= metrics["comm_rate"] <= 1.0 and 1.0 <= metrics["mean_steps"] <= 5.0


def test_compare_eval_only_reevaluates_without_training(tmp_path):
    from comm_config import config

    from gatelab.comm.compare import CompareConfig, compare

    base = config(agents=2, grid=3, episode_limit=4, n_envs=4, updates=2, d_model=16)
    cfg = CompareConfig(base=base, seeds=(0,), eval_episodes=5)
    first = compare(cfg, tmp_path)
    run = tmp_path / "predator_prey" / "full" / "seed0"
    (run / "eval.json").unlink()
    lines = (run / "metrics.jsonl").read_text()
    again = compare(CompareConfig(base=base, seeds=(0,), eval_episodes=5, eval_only=True), tmp_path)
    assert again["runs"]["full"] == first["runs"]["full"]  # same checkpoint, same evaluation
    assert (run / "metrics.jsonl").read_text() == lines  # nothing was trained
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        compare(CompareConfig(base=base, seeds=(1,), eval_only=True), tmp_path)


def test_targets_from_a_hand_built_table():
    from gatelab.comm.compare import targets

    def row(success, rate):
        return {"success_rate": [success, 0.0], "comm_rate": [rate, 0.0]}

    table = {
        "full": row(0.80, 1.0),
        "commformer": row(0.78, 0.5),
        "commformer_tg": row(0.74, 0.2),
        "random": row(0.70, 0.5),
        "none": row(0.40, 0.0),
    }
    t = targets(table)
    assert t["cf_over_full"] == pytest.approx(0.975)
    assert t["cf_minus_none"] == pytest.approx(0.38) and t["cf_minus_random"] == pytest.approx(0.08)
    assert t["tg_rate_cut"] == pytest.approx(0.6) and t["tg_success_loss"] == pytest.approx(0.04)
    assert all(t["met"].values())
    table["commformer_tg"] = row(0.70, 0.2)  # 8 points lost: that target fails
    assert not targets(table)["met"]["tg_cuts_50pct_losing_le_5pts"]


def test_reproduce_configs_use_table_seeds():
    from gatelab.comm import reproduce

    full = reproduce.configs(seeds=10)
    assert [name for name, _ in full] == [  # Predator-Prey first
        "predator_prey-memory", "predator_prey-memoryless",
        "predator_capture_prey-memory", "predator_capture_prey-memoryless",
    ]  # fmt: skip
    for _, cfg in full:  # the table's seeds are not the screening seeds 0 and 1
        assert cfg.seeds == tuple(range(10, 20)) and cfg.base.ppo.updates == 200
        assert cfg.comm_budget == 0.22 and cfg.base.env.agents == 5 and cfg.base.env.grid == 10
    for name, cfg in reproduce.configs(seeds=10, small=True):  # the reduced grid
        assert name.endswith("-small") and cfg.base.env.grid == 5 and cfg.base.ppo.updates == 50
        assert cfg.seeds == tuple(range(10, 20))
    with pytest.raises(ValueError, match="seeds"):
        reproduce.configs(seeds=0)


@pytest.mark.slow
def test_reproduce_writes_interval_tables_and_resumes(tmp_path, monkeypatch):
    from dataclasses import replace

    from comm_config import config

    from gatelab.comm import plots, reproduce

    for name in ("plot_graph", "plot_comm_rate", "plot_curves"):  # figures: not under test
        monkeypatch.setattr(plots, name, lambda *a, **k: None)

    full = reproduce.configs(seeds=10)
    # the path end to end on one tiny task (2 updates, 2 seeds)
    tiny = config(agents=2, grid=3, episode_limit=4, n_envs=4, updates=2, d_model=16)
    small_cfg = replace(full[0][1], base=tiny, seeds=(10, 11), eval_episodes=4)
    monkeypatch.setattr(reproduce, "configs", lambda *args: [("tiny", small_cfg)])
    monkeypatch.setattr(reproduce, "REPS", 200)
    path = reproduce.reproduce(tmp_path, jobs=1, seeds=2)
    assert path == tmp_path / "reproduce" / "comm" / "tables.md"
    text = path.read_text()
    assert "| commformer_tg |" in text and "P(learned > random)" in text and "Holds:" in text
    tables = json.loads((path.parent / "tables.json").read_text())["tiny"]
    assert tables["seeds"] == [10, 11] and len(tables["runs"]["none"]) == 2
    run = path.parent / "runs" / "tiny" / "predator_prey" / "full" / "seed10" / "eval.json"
    stamp = run.stat().st_mtime
    reproduce.reproduce(tmp_path, seeds=2)  # resumable: finished runs are reused, not retrained
    assert run.stat().st_mtime == stamp


def test_reproduce_tasks_one_at_a_time_add_up_to_the_table(tmp_path, monkeypatch):
    import numpy as np

    from gatelab.comm import reproduce
    from gatelab.comm.compare import VARIANTS

    ran = []

    def fake_compare(cfg, out, progress=None):  # per-seed scores; no training
        ran.append(Path(out).name)
        rng = np.random.default_rng(len(ran))
        runs = {v: [{"success_rate": float(x), "comm_rate": 0.5} for x in rng.uniform(size=3)]
                for v in VARIANTS}  # fmt: skip
        return {"runs": runs}

    monkeypatch.setattr(reproduce, "compare", fake_compare)
    monkeypatch.setattr(reproduce, "REPS", 200)
    names = reproduce.TASK_NAMES
    assert [n for n, _ in reproduce.configs(seeds=3, tasks=(names[3], names[0]))] == [
        names[0], names[3]
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown task 'prey'.*predator_prey-memory"):
        reproduce.configs(tasks=("prey",))
    assert main(["reproduce", "comm", "--runs-dir", str(tmp_path), "--task", "prey"]) == 2
    assert ran == []  # refused before any run

    path = reproduce.reproduce(tmp_path, seeds=3, tasks=(names[2],))
    first = json.loads((path.parent / "tables.json").read_text())
    assert list(first) == [names[2]] and ran == [names[2]]
    reproduce.reproduce(tmp_path, seeds=3, tasks=(names[0],))  # joins the earlier table
    both = json.loads((path.parent / "tables.json").read_text())
    assert list(both) == [names[0], names[2]] and ran == [names[2], names[0]]
    assert both[names[2]] == first[names[2]]
    text = path.read_text()
    assert text.index(f"**{names[0]}**") < text.index(f"**{names[2]}**")
    reproduce.reproduce(tmp_path, seeds=3)  # the whole table starts from its own runs
    assert list(json.loads((path.parent / "tables.json").read_text())) == list(names)

    (path.parent / "tables.json").write_text("{not json")
    with pytest.raises(ValueError, match="tables.json: not valid JSON"):
        reproduce.reproduce(tmp_path, seeds=3, tasks=(names[0],))
    (path.parent / "tables.json").write_text('{"x": {"seeds": [1]}}')
    with pytest.raises(ValueError, match="tables.json: not a tables file"):
        reproduce.reproduce(tmp_path, seeds=3, tasks=(names[0],))


def test_interval_table_against_scipy_and_a_pairwise_count():
    import numpy as np
    from scipy.stats import trim_mean

    from gatelab.comm.compare import VARIANTS
    from gatelab.comm.reproduce import interval_table

    rng = np.random.default_rng(0)
    scores = {v: rng.uniform(0.2 + 0.1 * i, 0.6 + 0.1 * i, 12) for i, v in enumerate(VARIANTS)}
    scores["commformer"] = rng.uniform(0.80, 0.82, 12)  # narrow: the gap's interval is tight
    scores["commformer_tg"] = scores["commformer"] - 0.01  # 1 point below learned
    runs = {v: [{"success_rate": float(x), "comm_rate": 0.5} for x in xs]
            for v, xs in scores.items()}  # fmt: skip
    runs["commformer_tg"] = [{**r, "comm_rate": 0.2} for r in runs["commformer_tg"]]
    out = interval_table(runs, reps=500)
    for v, xs in scores.items():
        iqm, mean = out["table"][v]["iqm"], out["table"][v]["mean"]
        assert iqm[0] == pytest.approx(trim_mean(xs, 0.25))  # IQM: the 25% trimmed mean
        assert mean[0] == pytest.approx(xs.mean())
        assert iqm[1] <= iqm[0] <= iqm[2] and mean[1] <= mean[0] <= mean[2]
    x, y = scores["commformer"], scores["random"]
    naive = np.mean([(a > b) + 0.5 * (a == b) for a in x for b in y])  # P(X > Y), ties half
    claims = out["claims"]
    assert claims["p_learned_beats_random"][0] == pytest.approx(naive)
    assert claims["learned_minus_full"][0] == pytest.approx(x.mean() - scores["full"].mean())
    assert claims["gated_rate_cut"] == pytest.approx(0.6)
    assert claims["holds"]["gates cut >= 50% of messages within 5 points"]
    # the intervals are a function of the runs and the seed alone (rliable resamples with
    # numpy's global generator; the caller's state is left as it was)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    assert interval_table(runs, reps=500) == out
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    assert interval_table(runs, reps=500, seed=1) != out


def test_reproduce_small_flag_reaches_the_reduced_grid(tmp_path, monkeypatch, capsys):
    from gatelab.cli import main
    from gatelab.comm import reproduce

    calls = []

    def fake(runs_dir, jobs=1, progress=None, seeds=10, small=False, tasks=None):
        calls.append({"jobs": jobs, "seeds": seeds, "small": small, "tasks": tasks})
        (tmp_path / "tables.md").write_text("table\n")
        return tmp_path / "tables.md"

    monkeypatch.setattr(reproduce, "reproduce", fake)
    monkeypatch.setattr(reproduce.os, "cpu_count", lambda: 2)  # the 2-core machine
    args = ["reproduce", "comm", "--runs-dir", str(tmp_path), "--jobs", "2", "--seeds", "3"]
    assert main([*args, "--small"]) == 0
    assert main(args) == 0
    task = ["--task", "predator_prey-memory", "--task", "predator_capture_prey-memory"]
    assert main([*args, *task]) == 0
    assert calls == [
        {"jobs": 2, "seeds": 3, "small": True, "tasks": None},
        {"jobs": 2, "seeds": 3, "small": False, "tasks": None},
        {"jobs": 2, "seeds": 3, "small": False,
         "tasks": ("predator_prey-memory", "predator_capture_prey-memory")},
    ]  # fmt: skip
    assert main(["reproduce", "gmoe", "--task", "predator_prey-memory"]) == 2
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    # each run says what it will take: tasks x seeds x 5 variants, two at a time on 2 cores
    assert "about 25 s per run: 60 runs, about 12 min with 2 at a time" in err
    assert "about 5 min per run: 60 runs, about 2.5 h with 2 at a time" in err
    assert "about 5 min per run: 30 runs, about 75 min with 2 at a time" in err


def test_reproduce_expected_time_leaves_out_the_runs_already_evaluated(tmp_path):
    from gatelab.comm import reproduce

    task = tmp_path / "reproduce/comm/runs/predator_prey-memory/predator_prey"
    for variant in ("full", "commformer", "random"):  # 6 of the task's 15 runs (3 seeds)
        for seed in (10, 12):
            (task / variant / f"seed{seed}").mkdir(parents=True)
            (task / variant / f"seed{seed}" / "eval.json").write_text("{}")
    (task / "none" / "seed11").mkdir(parents=True)  # a cut run (no eval.json) still counts
    one_task = {"seeds": 3, "jobs": 2, "tasks": ("predator_prey-memory",), "cores": 2}
    assert reproduce.expected_time(**one_task, runs_dir=tmp_path) == (
        "about 5 min per run: 15 runs (6 already evaluated), about 22 min with 2 at a time"
    )  # (15 - 6) x 5 min / 2
    both = {**one_task, "tasks": ("predator_prey-memory", "predator_prey-memoryless")}
    assert reproduce.expected_time(**both, runs_dir=tmp_path).endswith(
        "30 runs (6 already evaluated), about 60 min with 2 at a time"
    )
    assert "already" not in reproduce.expected_time(**one_task, runs_dir=tmp_path / "empty")
