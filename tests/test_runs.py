"""Run-folder plumbing: atomic checkpoints that carry their config, optimizer state as tensors."""

import json
import warnings

import pytest
import torch

from gatelab import runs
from gatelab.threads import torch_threads


def _model_and_adam(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    return model, opt


def _steps(model, opt, n, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(8, 3, generator=generator)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_checkpoint_roundtrip_resumes_to_the_same_result(tmp_path):
    # reference: 6 uninterrupted steps
    ref_model, ref_opt = _model_and_adam(0)
    _steps(ref_model, ref_opt, 3, 1)
    _steps(ref_model, ref_opt, 3, 2)
    # run: 3 steps, checkpoint, fresh objects, load, 3 more
    model, opt = _model_and_adam(0)
    _steps(model, opt, 3, 1)
    path = runs.save_checkpoint(
        tmp_path / "ckpt.safetensors",
        config={"lr": 1e-2, "nested": {"a": (1, 2)}},
        step=3,
        modules={"model": model},
        optimizers={"adam": opt},
        tensors={"extra": torch.arange(3.0)},
        state={"controller": 0.25},
    )
    fresh, fresh_opt = _model_and_adam(99)
    ckpt = runs.load_checkpoint(path, modules={"model": fresh}, optimizers={"adam": fresh_opt})
    assert ckpt.step == 3
    assert ckpt.config == {"lr": 1e-2, "nested": {"a": [1, 2]}}
    assert ckpt.state == {"controller": 0.25}
    assert list(ckpt.tensors) == ["extra"]
    assert fresh_opt.param_groups[0]["betas"][0] == 0.8
    _steps(fresh, fresh_opt, 3, 2)
    for a, b in zip(ref_model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob("*.tmp"))


def test_truncated_or_foreign_checkpoint_is_a_one_line_error(tmp_path):
    model, opt = _model_and_adam(0)
    path = runs.save_checkpoint(tmp_path / "c.safetensors", config={}, step=1, modules={"m": model})
    data = path.read_bytes()
    (tmp_path / "torn.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="torn.safetensors"):
        runs.load_checkpoint(tmp_path / "torn.safetensors", modules={"m": model})
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="junk.safetensors"):
        runs.load_checkpoint(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="missing"):
        runs.load_checkpoint(tmp_path / "missing.safetensors")


def test_metrics_skip_a_torn_last_line_and_truncate_on_resume(tmp_path):
    for step in (1, 2, 3):
        runs.append_metrics(tmp_path, {"step": step, "loss": 1.0 / step})
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 4, "lo')  # killed mid-write
    assert [r["step"] for r in runs.read_metrics(tmp_path)] == [1, 2, 3]
    runs.truncate_metrics(tmp_path, 2)
    assert [r["step"] for r in runs.read_metrics(tmp_path)] == [1, 2]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        runs.read_metrics(tmp_path)


def test_atomic_json_and_config_match(tmp_path):
    path = runs.atomic_write_json(tmp_path / "config.json", {"x": float("nan"), "y": (1,)})
    assert json.loads(path.read_text()) == {"x": None, "y": [1]}
    assert runs.config_matches(
        {"a": 1, "t": {"steps": 5}}, {"a": 1, "t": {"steps": 9}}, ["t.steps"]
    )
    assert not runs.config_matches({"a": 1}, {"a": 2}, [])


def test_torch_threads_restores():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        with torch_threads(-1):
            pass


# --------------------------------------------------------------------------- torn checkpoints


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_corrupt_or_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path):
    path = tmp_path / "c.safetensors"
    model, opt = _model_and_adam(0)
    runs.save_checkpoint(path, config={"a": 1}, step=1, modules={"m": model}, optimizers={"o": opt})
    first = _weights(model)
    _steps(model, opt, 2, seed=1)
    runs.save_checkpoint(path, config={"a": 1}, step=2, modules={"m": model}, optimizers={"o": opt})
    assert runs.previous_path(path).name == "c.prev.safetensors"
    good = path.read_bytes()

    # one flipped bit in the last tensor byte: the header still parses, the checksum does not
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    fresh, fresh_opt = _model_and_adam(5)
    with pytest.warns(RuntimeWarning, match=r"checksum.*c\.prev\.safetensors"):
        ck = runs.load_checkpoint(path, modules={"m": fresh}, optimizers={"o": fresh_opt})
    assert ck.step == 1
    for key, value in first.items():
        assert torch.equal(fresh.state_dict()[key], value)

    # cut short (a disk that lost the tail): named as truncated, previous one used
    path.write_bytes(good[: len(good) - 7])
    with pytest.warns(RuntimeWarning, match="truncated"):
        assert runs.load_checkpoint(path, modules={"m": fresh}).step == 1

    # no previous one to fall back to: the error names the file
    runs.previous_path(path).unlink()
    with pytest.raises(ValueError, match=r"c\.safetensors: truncated"):
        runs.load_checkpoint(path, modules={"m": fresh})


_KILLED_SAVE = """
import sys, torch
from gatelab import runs
model = torch.nn.Linear(3, 2)
for step in (1, 2, 3):
    with torch.no_grad():
        model.weight.fill_(step)
    runs.save_checkpoint(sys.argv[1], config={}, step=step, modules={"m": model})
"""


@pytest.mark.parametrize(
    ("fault", "resumed_step"),
    [("checkpoint-write:3", 2), ("checkpoint-rotate:2", 2), ("checkpoint-write:1", None)],
)
def test_a_kill_inside_the_checkpoint_write_leaves_a_good_checkpoint(tmp_path, fault, resumed_step):
    import os
    import subprocess
    import sys

    path = tmp_path / "c.safetensors"
    env = {**os.environ, runs.FAULT_ENV: fault}
    done = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(path)], env=env, check=False)
    assert done.returncode == runs.FAULT_EXIT_CODE
    model = torch.nn.Linear(3, 2)
    if resumed_step is None:  # killed inside the very first write: nothing to resume from
        assert not runs.checkpoint_exists(path)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the rotate kill loads .prev, warning
        ck = runs.load_checkpoint(path, modules={"m": model})
    assert ck.step == resumed_step
    assert torch.equal(model.weight, torch.full((2, 3), float(resumed_step)))
    # the next write cleans the torn temporary file up
    runs.save_checkpoint(path, config={}, step=4, modules={"m": model})
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_fault_point_fires_only_at_its_count(monkeypatch):
    monkeypatch.setenv(runs.FAULT_ENV, "elsewhere:1")
    runs.fault_point("here")  # another name: no effect
    monkeypatch.setenv(runs.FAULT_ENV, "here:3")
    monkeypatch.setattr(runs, "_fault_hits", {})
    calls = []
    monkeypatch.setattr(runs.os, "_exit", calls.append)
    for _ in range(5):
        runs.fault_point("here")
    assert calls == [runs.FAULT_EXIT_CODE]


# --------------------------------------------------------------------------- run folders


def test_start_run_resumes_the_same_config_and_refuses_another(tmp_path):
    run = tmp_path / "run"
    config = {"model": {"d": 8}, "train": {"steps": 10, "lr": 0.1}}
    assert runs.start_run(run, config) is False
    assert runs.read_json(run / runs.CONFIG) == config
    assert runs.start_run(run, config) is True
    more_steps = {"model": {"d": 8}, "train": {"steps": 20, "lr": 0.1}}
    assert runs.start_run(run, more_steps, ignore=["train.steps"]) is True
    assert runs.read_json(run / runs.CONFIG)["train"]["steps"] == 20
    other = {"model": {"d": 16}, "train": {"steps": 20, "lr": 0.2}}
    with pytest.raises(ValueError, match=r"differs in: model\.d, train\.lr.*--fresh"):
        runs.start_run(run, other, ignore=["train.steps"])
    runs.append_metrics(run, {"step": 1})
    assert runs.start_run(run, other, fresh=True) is False
    assert runs.read_json(run / runs.CONFIG) == other
    assert runs.read_metrics(run) == []


def test_start_run_refuses_a_folder_of_files_that_are_no_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no config.json; rerun with --fresh"):
        runs.start_run(tmp_path, {"a": 1})
    assert (tmp_path / "notes.txt").read_text() == "mine"
