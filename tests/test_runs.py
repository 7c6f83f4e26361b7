"""Run-folder plumbing: atomic checkpoints that carry their config, optimizer state as tensors."""

import json

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
