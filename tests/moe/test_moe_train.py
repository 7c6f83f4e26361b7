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


def _no_perf(metrics):
    return {k: v for k, v in metrics.items() if not k.startswith("perf/")}


def test_same_seed_same_metrics(tmp_path):
    cfg = _cfg(tmp_path, steps=6, eval_every=6, log_every=3)
    a = train(TINY, cfg, tmp_path / "a")
    b = train(TINY, cfg, tmp_path / "b")
    assert _no_perf(a) == _no_perf(b)
    assert a["perf/tokens_per_s"] > 0 and a["perf/step_cpu_ms"] > 0


def test_rerun_resumes_refuses_another_config_naming_fresh_and_fresh_starts_over(tmp_path):
    cfg = _cfg(tmp_path, steps=5)
    first = train(TINY, cfg, tmp_path / "run")
    again = train(TINY, cfg, tmp_path / "run")  # finished run: resumes at step 5, trains nothing
    assert _no_perf(again) == _no_perf(first) and "perf/tokens_per_s" not in again
    other = dataclasses.replace(TINY, top_k=1)
    with pytest.raises(ValueError, match=r"differs in: model\.top_k.*--fresh"):
        train(other, cfg, tmp_path / "run")
    redone = train(other, cfg, tmp_path / "run", fresh=True)
    assert redone["params/active"] < first["params/active"]
    assert max(r["step"] for r in read_metrics(tmp_path / "run")) == 5


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
    return [_no_perf(r) for r in read_metrics(run_dir)]


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
    assert _no_perf(resumed) == _no_perf(full)
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

    def fake_pair(model_cfg, cfg, run_dir, progress, fresh):
        seen.update(model=model_cfg, train=cfg, fresh=fresh)
        metrics = {"eval/loss": 1.0, "params/active": 1, "params/total": 1}
        return {"moe": metrics, "dense": metrics, "step_time_ratio": 1.2, "figures": []}

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
    assert seen["fresh"] is False
    result = runner.invoke(app, [*args, "--fresh"])
    assert result.exit_code == 0 and seen["fresh"] is True
    assert "MoE step / dense step (CPU time): 1.20" in result.output


def test_cli_rerun_with_another_config_is_refused_in_one_line_naming_fresh(tmp_path):
    cfg = _cfg(tmp_path, steps=2, eval_every=2, checkpoint_every=2)
    train(dataclasses.replace(TINY, ffn="moe"), cfg, tmp_path / "run" / "moe")
    runner = CliRunner()
    result = runner.invoke(app, ["moe", "train", "--quick", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "--fresh" in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------- kill tests

KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_moe_train import TINY, kill_config
from gatelab.moe.train import train
train(TINY, kill_config({corpus!r}), {run!r})
"""


def kill_config(corpus):
    return TrainConfig(
        steps=12, batch_size=4, lr=1e-2, warmup=2, eval_every=4, eval_batches=1, log_every=2,
        checkpoint_every=4, corpus_dir=corpus, threads=1,
    )  # fmt: skip


def _run(run_dir, corpus, fault=None):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "GATELAB_FAULT"}
    if fault:
        env["GATELAB_FAULT"] = fault
    code = KILL_SCRIPT.format(
        tests=str(Path(__file__).parent), corpus=str(corpus), run=str(run_dir)
    )
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    corpus = _corpus(root)
    train(TINY, kill_config(str(corpus)), root / "full")
    return corpus, root / "full"


@pytest.mark.slow  # a subprocess and two short trainings: ~7 s of CPU each
@pytest.mark.parametrize(
    "fault",
    [
        "checkpoint-write:2",  # inside the second checkpoint's write: half its bytes on disk
        "checkpoint-rotate:2",  # old checkpoint moved to .prev, the new one not yet in place
        "moe-step:7",  # between two steps, three past the last checkpoint
    ],
)
def test_killed_anywhere_then_rerun_ends_bit_identical(fault, uninterrupted, tmp_path):
    from safetensors.torch import load_file

    corpus, full = uninterrupted
    killed = _run(tmp_path / "run", corpus, fault)
    assert killed.returncode == 77, killed.stderr[-2000:]
    if fault.startswith("checkpoint-rotate"):  # only checkpoint.prev is left: used, with a warning
        with pytest.warns(RuntimeWarning, match="previous checkpoint"):
            train(TINY, kill_config(str(corpus)), tmp_path / "run")  # the rerun, in-process
    else:
        train(TINY, kill_config(str(corpus)), tmp_path / "run")
    a = load_file(tmp_path / "run" / "checkpoint.safetensors")
    b = load_file(full / "checkpoint.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _records(tmp_path / "run") == _records(full)
