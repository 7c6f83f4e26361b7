import dataclasses
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from gatelab.cli import app
from gatelab.moe.eval import evaluate_checkpoint
from gatelab.moe.lm import MoEConfig, TinyLM, load_corpus
from gatelab.moe.train import TrainConfig, train
from gatelab.runs import read_metrics

TINY = MoEConfig(d_model=16, n_layers=1, n_heads=2, seq_len=16, n_experts=4, top_k=2, d_hidden=8)


def _corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(12):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(40))
        (folder / f"m{i:02d}.py").write_text(body)
    return folder


def _cfg(tmp_path, **kw):
    base = dict(
        steps=20, batch_size=8, lr=1e-2, warmup=5, eval_every=10, eval_batches=2,
        log_every=5, checkpoint_every=10, corpus_dir=str(_corpus(tmp_path)), threads=1,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_corpus_split_is_by_file_and_deterministic(tmp_path):
    folder = _corpus(tmp_path)
    train_a, held_a = load_corpus(folder, 100_000)
    train_b, held_b = load_corpus(folder, 100_000)
    assert torch.equal(train_a, train_b) and torch.equal(held_a, held_b)
    held_text = bytes(held_a.tolist()).decode()
    assert "def f0_0" in held_text and "def f10_0" in held_text and "def f1_0" not in held_text


def test_dense_model_has_the_same_active_parameters_up_to_the_router():
    moe, dense = TinyLM(TINY), TinyLM(dataclasses.replace(TINY, ffn="dense"))
    router = TINY.n_layers * TINY.n_experts * TINY.d_model
    assert moe.active_parameters() == dense.active_parameters() + router
    assert moe(torch.zeros(1, 16, dtype=torch.long)).shape == (1, 16, 256)


def test_train_smoke_loss_falls_and_checkpoint_resumes(tmp_path):
    cfg = _cfg(tmp_path)
    final = train(TINY, cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0] - 0.5
    assert abs(sum(final["eval/load_l0"]) - 1) < 1e-6
    # resume: a longer budget continues from step 30, same config otherwise
    longer = dataclasses.replace(cfg, steps=24)
    train(TINY, longer, tmp_path / "run")
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert steps.count(20) >= 1 and max(steps) == 24 and steps.count(5) == 1
    again = evaluate_checkpoint(tmp_path / "run")
    assert again["eval/loss"] == pytest.approx(
        [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()][-1]["eval/loss"]
    )


def test_same_seed_same_metrics(tmp_path):
    cfg = _cfg(tmp_path, steps=6, eval_every=6, log_every=3)
    a = train(TINY, cfg, tmp_path / "a")
    b = train(TINY, cfg, tmp_path / "b")
    assert a == b


def test_resume_refuses_a_different_config(tmp_path):
    cfg = _cfg(tmp_path, steps=5)
    train(TINY, cfg, tmp_path / "run")
    with pytest.raises(ValueError, match="different config"):
        train(dataclasses.replace(TINY, top_k=1), cfg, tmp_path / "run")


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="n_heads"):
        MoEConfig(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(n_experts=4, top_k=5)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)


def test_cli_help_bad_option_and_missing_input(tmp_path):
    runner = CliRunner()
    assert runner.invoke(app, ["moe", "--help"]).exit_code == 0
    assert runner.invoke(app, ["moe", "train", "--help"]).exit_code == 0
    bad = runner.invoke(app, ["moe", "train", "--router", "hash", "--run-dir", str(tmp_path)])
    assert bad.exit_code == 2
    missing = runner.invoke(app, ["moe", "eval", "--run-dir", str(tmp_path / "nothing")])
    assert missing.exit_code == 2
    nodir = runner.invoke(app, ["moe", "train", "--corpus-dir", str(tmp_path / "nope")])
    assert nodir.exit_code == 2


def _records(run_dir):
    return [{k: v for k, v in r.items() if k != "perf/steps_per_s"} for r in read_metrics(run_dir)]


def test_interrupted_run_resumes_bit_identically_without_duplicate_steps(tmp_path):
    cfg = _cfg(tmp_path, steps=20, checkpoint_every=10)
    full = train(TINY, cfg, tmp_path / "full")

    class Interrupt(Exception):
        pass

    def interrupt(step, total):
        if step == 13:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(TINY, cfg, tmp_path / "cut", interrupt)
    assert max(r["step"] for r in read_metrics(tmp_path / "cut")) == 10
    resumed = train(TINY, cfg, tmp_path / "cut")
    assert resumed == full
    assert _records(tmp_path / "cut") == _records(tmp_path / "full")
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == [
        "checkpoint.prev.safetensors", "checkpoint.safetensors", "config.json", "metrics.jsonl",
    ]  # fmt: skip


def test_a_checkpoint_moved_alone_still_evaluates(tmp_path):
    cfg = _cfg(tmp_path, steps=5)
    final = train(TINY, cfg, tmp_path / "run")
    moved = tmp_path / "elsewhere" / "moe.safetensors"
    moved.parent.mkdir()
    shutil.copy(tmp_path / "run" / "checkpoint.safetensors", moved)
    assert evaluate_checkpoint(moved)["eval/loss"] == pytest.approx(final["eval/loss"])


def test_cli_quick_never_overrides_an_explicit_flag(tmp_path, monkeypatch):
    import gatelab.moe.train as moe_train

    seen = {}

    def fake_pair(model_cfg, cfg, run_dir, progress):
        seen.update(model=model_cfg, train=cfg)
        metrics = {"eval/loss": 1.0, "params/active": 1, "params/total": 1}
        return {"moe": metrics, "dense": metrics, "figures": []}

    monkeypatch.setattr(moe_train, "train_pair", fake_pair)
    runner = CliRunner()
    args = ["moe", "train", "--quick", "--run-dir", str(tmp_path)]
    explicit = ["--steps", "3", "--threads", "2", "--top-k", "1", "--router", "sigmoid"]
    assert runner.invoke(app, [*args, *explicit]).exit_code == 0
    assert (seen["train"].steps, seen["train"].threads) == (3, 2)
    assert (seen["model"].top_k, seen["model"].router) == (1, "sigmoid")
    assert seen["model"].d_model == 64  # the quick default of a flag not given
    assert runner.invoke(app, args).exit_code == 0
    assert (seen["train"].steps, seen["model"].top_k, seen["model"].router) == (600, 2, "softmax")
