import dataclasses
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_exits_data import fake_fashion_mnist

import gatelab
from gatelab.exits import SplitConfig, ViTConfig
from gatelab.exits.backbones import load_backbone
from gatelab.exits.pretrain import (
    CHECKPOINT,
    RUN_DIR,
    PretrainConfig,
    augment,
    draw_epoch,
    lr_at,
    pretrain,
)
from gatelab.runs import (
    FAULT_ENV,
    FAULT_EXIT_CODE,
    load_checkpoint,
    read_checkpoint_metadata,
    read_json,
    read_metrics,
)

TINY = ViTConfig(patch_size=7, d_model=8, n_heads=2, n_blocks=2, mlp_ratio=2)
SPLITS = SplitConfig(n_exits=40, n_val=20, n_calib=20)


def _cfg(epochs):
    return PretrainConfig(epochs=epochs, batch_size=32, ckpt_every=3, eval_batch=50, threads=1)


def test_pretrain_resumes_and_extends_the_schedule(tmp_path):
    data = fake_fashion_mnist(tmp_path / "data", n_train=208, n_test=50)
    out = tmp_path / "run"
    first = pretrain(out, data, TINY, _cfg(1), SPLITS)
    assert first["steps"] == 4 and first["kind"] == "gatelab.exits.vit-backbone"
    assert first["schedule_history"] == []
    second = pretrain(out, data, TINY, _cfg(2), SPLITS)  # resumes at step 4, runs to 8
    assert second["steps"] == 8
    assert second["schedule_history"] == [{"epochs": 1, "until_step": 4}]
    model, meta = load_backbone(out / "backbone.safetensors")
    assert meta["test_accuracy"] == second["test_accuracy"]
    assert json.loads((out / "backbone.json").read_text())["steps"] == 8
    assert [r["step"] for r in read_metrics(out / RUN_DIR)] == [3, 4, 6, 8]
    with pytest.raises(ValueError, match="past the 4 steps of epochs=1.*--fresh"):
        pretrain(out, data, TINY, _cfg(1), SPLITS)  # a schedule cannot shrink under its run
    fresh = pretrain(tmp_path / "again", data, TINY, _cfg(2), SPLITS)
    assert fresh["steps"] == 8


def test_another_configuration_is_refused_naming_fresh(tmp_path):
    data = fake_fashion_mnist(tmp_path / "data", n_train=208, n_test=50)
    out = tmp_path / "run"
    pretrain(out, data, TINY, _cfg(1), SPLITS)
    other = dataclasses.replace(_cfg(1), lr=1e-3)
    with pytest.raises(ValueError, match=r"differs in: pretrain\.lr.*--fresh"):
        pretrain(out, data, TINY, other, SPLITS)
    before = (out / "backbone.safetensors").read_bytes()
    assert pretrain(out, data, TINY, other, SPLITS, fresh=True)["steps"] == 4
    assert (out / "backbone.safetensors").read_bytes() != before  # trained again, at lr 1e-3
    assert read_json(out / RUN_DIR / "config.json")["pretrain"]["lr"] == 1e-3


class Killed(Exception):
    pass


def _kill_at(step):
    def progress(done, total):
        if done == step:
            raise Killed

    return progress


def test_an_exception_mid_run_loses_nothing(tmp_path):
    data = fake_fashion_mnist(tmp_path / "data", n_train=208, n_test=50)
    out = tmp_path / "killed"
    with pytest.raises(Killed):  # killed at step 5: the checkpoint of step 3 survives
        pretrain(out, data, TINY, _cfg(2), SPLITS, progress=_kill_at(5))
    assert int(read_checkpoint_metadata(out / RUN_DIR / CHECKPOINT)["step"]) == 3
    assert not list(out.rglob(".*.tmp")) and not (out / "backbone.safetensors").exists()
    resumed = pretrain(out, data, TINY, _cfg(2), SPLITS)
    assert resumed["steps"] == 8 and resumed["schedule_history"] == []


# --------------------------------------------------------------------------- kill anywhere

KILLED_RUN = """
import sys
from pathlib import Path
from gatelab.exits import SplitConfig, ViTConfig
from gatelab.exits.pretrain import PretrainConfig, pretrain
model = ViTConfig(patch_size=7, d_model=8, n_heads=2, n_blocks=2, mlp_ratio=2)
cfg = PretrainConfig(epochs=2, batch_size=32, ckpt_every=3, eval_batch=50, threads=1)
pretrain(Path(sys.argv[1]), Path(sys.argv[2]), model, cfg, SplitConfig(40, 20, 20))
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Data and one uninterrupted run (8 steps, checkpoints at 3, 6 and 8) to compare with."""
    root = tmp_path_factory.mktemp("pretrain")
    data = fake_fashion_mnist(root / "data", n_train=208, n_test=50)
    pretrain(root / "whole", data, TINY, _cfg(2), SPLITS)
    return data, root / "whole"


@pytest.mark.parametrize(
    ("fault", "resumes_from"),
    [
        ("checkpoint-write:2", 3),  # half of step 6's checkpoint written
        ("checkpoint-rotate:1", 3),  # step 3's moved to .prev, step 6's not yet in its place
        pytest.param("checkpoint-rotate:2", 6, marks=pytest.mark.slow),  # the last one (step 8)
        pytest.param("exits-pretrain-step:5", 3, marks=pytest.mark.slow),  # between two steps
    ],
)
def test_a_kill_anywhere_resumes_to_the_uninterrupted_run(
    fault, resumes_from, uninterrupted, tmp_path
):
    """Killed (``os._exit``) at a fault point, rerun: the same weights and metrics, bit for bit."""
    data, whole = uninterrupted
    out = tmp_path / "killed"
    killed = run_killed(KILLED_RUN, fault, out, data)
    assert killed.returncode == FAULT_EXIT_CODE, killed.stderr
    assert not (out / "backbone.safetensors").exists()
    kept = load_checkpoint(out / RUN_DIR / CHECKPOINT) if "rotate" not in fault else None
    if kept is not None:
        assert kept.step == resumes_from
    steps = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the rerun, without the fault:
        resumed = pretrain(out, data, TINY, _cfg(2), SPLITS, lambda done, _: steps.append(done))
    fell_back = [w for w in caught if "previous checkpoint" in str(w.message)]
    assert bool(fell_back) == ("rotate" in fault)  # a missing checkpoint falls back, warned
    assert steps == list(range(resumes_from + 1, 9)) and resumed["steps"] == 8  # resumed
    assert_same_tensors(out / "backbone.safetensors", whole / "backbone.safetensors")
    assert read_metrics(out / RUN_DIR) == read_metrics(whole / RUN_DIR)  # no step twice
    assert not list(out.rglob("*.tmp"))


def run_killed(script: str, fault: str, *args) -> subprocess.CompletedProcess:
    """``python -c script *args`` with ``GATELAB_FAULT=fault``, on this checkout's gatelab."""
    env = os.environ | {FAULT_ENV: fault, "PYTHONPATH": str(Path(gatelab.__file__).parents[1])}
    argv = [sys.executable, "-c", script, *map(str, args)]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)


def assert_same_tensors(a: Path, b: Path) -> None:
    """Every tensor of two safetensors files equal, bit for bit (metadata may differ: timings)."""
    left, right = load_file(a), load_file(b)
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def test_a_backbone_moved_alone_still_loads(tmp_path):
    data = fake_fashion_mnist(tmp_path / "data", n_train=208, n_test=50)
    pretrain(tmp_path / "run", data, TINY, _cfg(1), SPLITS)
    alone = tmp_path / "elsewhere" / "bb.safetensors"
    alone.parent.mkdir()
    alone.write_bytes((tmp_path / "run" / "backbone.safetensors").read_bytes())
    model, meta = load_backbone(alone)
    assert meta["steps"] == 4 and model.cfg == TINY


def test_same_seed_same_backbone(tmp_path):
    data = fake_fashion_mnist(tmp_path / "data", n_train=208, n_test=50)
    pretrain(tmp_path / "a", data, TINY, _cfg(1), SPLITS)
    pretrain(tmp_path / "b", data, TINY, _cfg(1), SPLITS)
    a, _ = load_backbone(tmp_path / "a" / "backbone.safetensors")
    b, _ = load_backbone(tmp_path / "b" / "backbone.safetensors")
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y)


def test_lr_schedule():
    cfg = PretrainConfig(lr=1.0, warmup_frac=0.1)
    assert lr_at(0, 100, cfg) == 0.1 and lr_at(9, 100, cfg) == 1.0
    assert abs(lr_at(99, 100, cfg)) < 1e-3


def test_augment_matches_a_pixel_loop():
    x = torch.randint(1, 256, (3, 1, 6, 6), dtype=torch.uint8)
    shifts = torch.tensor([[1, 1], [0, 2], [2, 1]])  # identity, down-left, up
    flips = torch.tensor([False, True, False])
    out = augment(x, shifts, flips, shift=1)
    expected = torch.zeros_like(x)
    for i in range(3):
        dy, dx = (shifts[i] - 1).tolist()
        for r in range(6):
            for c in range(6):
                if 0 <= r + dy < 6 and 0 <= c + dx < 6:
                    expected[i, 0, r, c] = x[i, 0, r + dy, c + dx]
    expected[1] = expected[1].flip(-1)
    assert torch.equal(out, expected)
    assert torch.equal(augment(x, shifts, torch.zeros(3, dtype=torch.bool), 0), x)
    draws = draw_epoch(50, 2, True, torch.Generator().manual_seed(0))
    assert sorted(draws.order.tolist()) == list(range(50))
    assert draws.shifts.min() >= 0 and draws.shifts.max() <= 4 and draws.flips.dtype == torch.bool


def test_label_smoothing_is_validated():
    with pytest.raises(ValueError, match="label_smoothing"):
        PretrainConfig(label_smoothing=1.0)
