import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from test_exits_data import fake_fashion_mnist
from typer.testing import CliRunner

from gatelab.cli import app
from gatelab.exits import SplitConfig
from gatelab.exits.backbones import HEAD_FILE, load_exits
from gatelab.exits.data import load_fashion_mnist, make_splits
from gatelab.exits.efficientnet import efficientnet_early_exit, fmnist_to_effnet
from gatelab.exits.effnet_run import EffNetConfig, run_efficientnet
from gatelab.exits.inference import GatePolicy, exit_flops, run_early_exit
from gatelab.exits.sweep import checkpoint_name

SPLITS = SplitConfig(n_exits=80, n_val=40, n_calib=40)


def tiny_config(sweep) -> EffNetConfig:
    return EffNetConfig(
        resolution=32,
        n_head=100,
        n_exits=80,
        n_val=40,
        n_calib=40,
        n_test=50,
        head_steps=5,
        splits=SPLITS,
        sweep=sweep,
    )


def test_effnet_run_writes_the_sweep_and_its_checkpoints_reproduce_it(tmp_path, tiny_sweep):
    data = fake_fashion_mnist(tmp_path / "data")
    out = tmp_path / "effnet"
    cfg = tiny_config(tiny_sweep())
    summary = run_efficientnet(out, data, cfg)

    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["area_under_tradeoff"]) >= {"jei-dnn", "max-prob", "entropy", "oracle"}
    assert (out / "accuracy_vs_flops.png").stat().st_size > 0
    jei = summary["curves"]["jei-dnn"]
    assert len(jei) == 2 * 2 and {p["tau"] for p in jei} == {0.3, 0.6}

    # a fresh model with the saved head and exits, run with real early exit on the test
    # images, reproduces the recorded test point
    point = next(p for p in jei if p["selected_on_val"])
    model = efficientnet_early_exit(32).eval()
    model.head.fc.load_state_dict(load_file(out / HEAD_FILE))
    load_exits(model, out / checkpoint_name("jei-dnn", point["lam"]))
    test = make_splits(load_fashion_mnist(data), SPLITS)["test"]
    x = fmnist_to_effnet(test.images, 32)
    with torch.no_grad():
        result = run_early_exit(model, x, GatePolicy(model.gates, point["tau"]))
    cost = exit_flops(model, x[:1]).fraction.double()
    accuracy = float((result.logits.argmax(-1) == test.labels).double().mean())
    assert accuracy == pytest.approx(point["accuracy"], abs=1e-12)
    assert float(cost[result.exit_index].mean()) == pytest.approx(point["flops_fraction"])

    # and so does `gatelab exits eval` on that checkpoint (the issue's flat JSON)
    checkpoint = out / checkpoint_name("jei-dnn", point["lam"])
    args = ["exits", "eval", "--checkpoint", str(checkpoint), "--data", str(data)]
    args += ["--gate-threshold", str(point["tau"]), "--repeats", "0"]
    args += ["--json", str(tmp_path / "e.json")]
    assert CliRunner().invoke(app, args).exit_code == 0
    flat = json.loads((tmp_path / "e.json").read_text())
    assert flat["accuracy"] == pytest.approx(point["accuracy"], abs=1e-12)
    assert flat["coverage"] == pytest.approx(point["coverage"], abs=1e-12)


def test_effnet_config_refuses_subsets_larger_than_their_split():
    with pytest.raises(ValueError, match="n_val"):
        EffNetConfig(n_exits=80, n_val=50, n_calib=40, splits=SPLITS)


def test_effnet_rerun_reports_the_finished_run_refuses_another_config_and_fresh_restarts(
    tmp_path, tiny_sweep
):
    data = fake_fashion_mnist(tmp_path / "data")
    out = tmp_path / "effnet"
    cfg = tiny_config(tiny_sweep())
    first = run_efficientnet(out, data, cfg)
    metrics = out / "metrics.json"
    written = metrics.stat().st_mtime_ns
    again = run_efficientnet(out, data, cfg)  # the finished run, not a second one
    assert metrics.stat().st_mtime_ns == written
    assert again["area_under_tradeoff"] == first["area_under_tradeoff"]
    other = dataclasses.replace(cfg, head_steps=6)
    with pytest.raises(ValueError, match="--fresh"):
        run_efficientnet(out, data, other)
    assert metrics.stat().st_mtime_ns == written  # nothing overwritten
    restarted = run_efficientnet(out, data, other, fresh=True)
    assert json.loads((out / "config.json").read_text())["head_steps"] == 6
    assert metrics.stat().st_mtime_ns != written and "area_under_tradeoff" in restarted
