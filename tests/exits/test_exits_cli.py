import json

from safetensors.torch import save_file
from typer.testing import CliRunner

from gatelab.cli import app

runner = CliRunner()


def test_help():
    result = runner.invoke(app, ["exits", "--help"])
    assert result.exit_code == 0 and "sweep" in result.output


def test_eval_bad_alpha_exits_2(tmp_path):
    result = runner.invoke(
        app, ["exits", "eval", "--checkpoint", "x.safetensors", "--alpha", "1.5"]
    )
    assert result.exit_code == 2 and "alpha" in result.output


def test_eval_unknown_dataset_exits_2():
    result = runner.invoke(
        app, ["exits", "eval", "--checkpoint", "x.safetensors", "--dataset", "cifar10"]
    )
    assert result.exit_code == 2 and "fashion-mnist" in result.output


def test_eval_checkpoint_of_another_kind_or_arch_exits_2(tmp_path):
    path = tmp_path / "backbone.safetensors"
    save_file({"w": __import__("torch").zeros(1)}, path)
    path.with_suffix(".json").write_text(json.dumps({"kind": "gatelab.exits.vit-backbone"}))
    result = runner.invoke(app, ["exits", "eval", "--checkpoint", str(path)])
    assert result.exit_code == 2 and "not a JEI-DNN" in result.output
    path.with_suffix(".json").write_text(
        json.dumps({"kind": "gatelab.exits.jei-dnn", "arch": "resnet50"})
    )
    result = runner.invoke(app, ["exits", "eval", "--checkpoint", str(path)])
    assert result.exit_code == 2 and "arch='resnet50'" in result.output


def test_eval_efficientnet_checkpoint_without_its_run_folder_exits_2(tmp_path):
    path = tmp_path / "jei_lam1.safetensors"
    save_file({"w": __import__("torch").zeros(1)}, path)
    path.with_suffix(".json").write_text(
        json.dumps({"kind": "gatelab.exits.jei-dnn", "arch": "efficientnet-lite0"})
    )
    result = runner.invoke(app, ["exits", "eval", "--checkpoint", str(path)])
    assert result.exit_code == 2 and "config.json not found" in result.output


def test_missing_checkpoint_and_missing_data_exit_2(tmp_path):
    result = runner.invoke(app, ["exits", "eval", "--checkpoint", str(tmp_path / "no.safetensors")])
    assert result.exit_code == 2 and "not found" in result.output
    result = runner.invoke(
        app, ["exits", "pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "dataset-fashion-mnist" in result.output


def test_eval_bad_gate_threshold_exits_2():
    result = runner.invoke(
        app, ["exits", "eval", "--checkpoint", "x.safetensors", "--gate-threshold", "1.5"]
    )
    assert result.exit_code == 2 and "gate-threshold" in result.output


def test_sweep_quick_keeps_the_flags_given(monkeypatch):
    """--quick changes the defaults of the flags not given, never an explicit one."""
    from gatelab.exits import operating_point

    seen = {}

    def fake(out, backbone, data, cfg, quick, device, progress):
        seen.update(cfg=cfg, quick=quick)
        return {"area_under_tradeoff": {}, "jei_vs_best_baseline": {}}

    monkeypatch.setattr(operating_point, "sweep_and_report", fake)
    args = ["exits", "sweep", "--quick", "--lams", "0.1,0.7", "--repeats", "3"]
    result = runner.invoke(app, [*args, "--variant", "jei-dnn+ctx"])
    assert result.exit_code == 0, result.output
    quick = operating_point.sweep_config(True)
    assert seen["cfg"].lams == (0.1, 0.7) and seen["cfg"].repeats == 3
    assert seen["cfg"].n_timed == quick.n_timed and seen["cfg"].train == quick.train
    assert seen["cfg"].variants == ("jei-dnn+ctx",) and seen["quick"]
    result = runner.invoke(app, ["exits", "sweep", "--variant", "typo"])
    assert result.exit_code == 2
