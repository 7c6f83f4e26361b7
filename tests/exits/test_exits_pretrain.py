import json

import torch
from test_exits_data import fake_fashion_mnist

from gatelab.exits import SplitConfig, ViTConfig
from gatelab.exits.pretrain import PretrainConfig, augment, load_backbone, lr_at, pretrain

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


def test_same_seed_same_backbone(tmp_path):
    data = fake_fashion_mnist(tmp_path / "data", n_train=208, n_test=50)
    pretrain(tmp_path / "a", data, TINY, _cfg(1), SPLITS)
    pretrain(tmp_path / "b", data, TINY, _cfg(1), SPLITS)
    a, _ = load_backbone(tmp_path / "a" / "backbone.safetensors")
    b, _ = load_backbone(tmp_path / "b" / "backbone.safetensors")
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y)


def test_lr_schedule_and_augment_shapes():
    cfg = PretrainConfig(lr=1.0, warmup_frac=0.1)
    assert lr_at(0, 100, cfg) == 0.1 and lr_at(9, 100, cfg) == 1.0
    assert abs(lr_at(99, 100, cfg)) < 1e-3
    x = torch.arange(2 * 28 * 28, dtype=torch.float32).view(2, 1, 28, 28)
    out = augment(x, 0, False, torch.Generator().manual_seed(0))
    assert torch.equal(out, x)
    shifted = augment(x, 2, True, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
