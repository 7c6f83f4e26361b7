import json

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


def test_reproduce_runs_the_docs_command(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    from gatelab.comm import reproduce
    from gatelab.comm.compare import CompareConfig, compare_configs

    doc = (Path(__file__).parents[2] / "docs" / "comm.md").read_text()
    command = re.search(r"`gatelab reproduce comm` runs `gatelab comm compare ([^`]*)`", doc)
    args = command.group(1).split()
    assert args == "--env predator_prey --seeds 6 --updates 200 --comm-budget 0.22 --memory".split()
    from_docs = compare_configs(False, ["predator_prey"], 6, 200, comm_budget=0.22, memory=True)
    assert reproduce.configs() == from_docs
    assert "min" in reproduce.EXPECTED_TIME
    # the same path end to end on a tiny configuration (2 updates, 1 seed)
    from comm_config import config

    tiny = config(agents=2, grid=3, episode_limit=4, n_envs=4, updates=2, d_model=16)
    small = [CompareConfig(base=tiny, seeds=(0,), eval_episodes=4, comm_budget=0.22)]
    monkeypatch.setattr(reproduce, "configs", lambda jobs=1: small)
    path = reproduce.reproduce(tmp_path, jobs=1)
    assert path == tmp_path / "reproduce" / "comm" / "tables.md"
    assert "| commformer_tg |" in path.read_text() and (path.parent / "tables.json").exists()
    stamp = (tmp_path / "comm" / "predator_prey" / "full" / "seed0" / "eval.json").stat().st_mtime
    reproduce.reproduce(tmp_path)  # resumable: finished runs are reused, not retrained
    assert (tmp_path / "comm/predator_prey/full/seed0/eval.json").stat().st_mtime == stamp
