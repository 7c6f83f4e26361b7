import json

import pytest
import torch
from test_exits_data import fake_fashion_mnist

from gatelab.exits import SplitConfig, ViTConfig
from gatelab.exits.backbones import load_backbone
from gatelab.exits.pretrain import CHECKPOINT, PretrainConfig, augment, draw_epoch, lr_at, pretrain
from gatelab.runs import read_checkpoint_metadata

TINY = ViTConfig(patch_size=7, d_model=8, n_heads=2, n_blocks=2, mlp_ratio=2)
SPLITS = SplitConfig(n_exits=40, n_val=20, n_calib=20)


def _cfg(epochs):
    return PretrainConfig(epochs=epochs, batch_size=32, ckpt_every=3, eval_batch=50)


def test_pretrain_resumes_and_extends_the_schedule(tmp_path):
    data = fake_fashion_mnist(tmp_path / "data", n_train=208, n_test=50)
    out = tmp_path / "run"
    first = pretrain(out, data, TINY, _cfg(1), SPLITS)
    assert first["steps"] == 4 and first["kind"] == "gatelab.exits.vit-backbone"
    second = pretrain(out, data, TINY, _cfg(2), SPLITS)  # resumes at step 4, runs to 8
    assert second["steps"] == 8
    assert second["schedule_history"] == [{"epochs": 1, "until_step": 4}]
    model, meta = load_backbone(out / "backbone.safetensors")
    assert meta["test_accuracy"] == second["test_accuracy"]
    assert json.loads((out / "backbone.json").read_text())["steps"] == 8
    fresh = pretrain(tmp_path / "again", data, TINY, _cfg(2), SPLITS)
    assert fresh["steps"] == 8


class Killed(Exception):
    pass


def _kill_at(step):
    def progress(done, total):
        if done == step:
            raise Killed

    return progress


def test_a_kill_loses_nothing_and_resume_gives_the_same_backbone(tmp_path):
    data = fake_fashion_mnist(tmp_path / "data", n_train=208, n_test=50)
    pretrain(tmp_path / "whole", data, TINY, _cfg(2), SPLITS)
    out = tmp_path / "killed"
    with pytest.raises(Killed):  # killed at step 5: the checkpoint of step 3 survives
        pretrain(out, data, TINY, _cfg(2), SPLITS, progress=_kill_at(5))
    assert int(read_checkpoint_metadata(out / CHECKPOINT)["step"]) == 3
    assert not list(out.glob(".*.tmp")) and not (out / "backbone.safetensors").exists()
    resumed = pretrain(out, data, TINY, _cfg(2), SPLITS)
    assert resumed["steps"] == 8 and resumed["schedule_history"] == [{"epochs": 2, "until_step": 3}]
    a, _ = load_backbone(tmp_path / "whole" / "backbone.safetensors")
    b, _ = load_backbone(out / "backbone.safetensors")
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y)


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
