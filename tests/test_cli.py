"""The root command: help, version, demo, and one-line errors with exit code 2."""

import json

import pytest
import torch
from typer.testing import CliRunner

from gatelab.cli import app, main

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("demo", "reproduce", "version", "gmoe", "moe", "exits", "edge", "comm"):
        assert command in result.output


def test_version():
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0 and result.output.startswith("gatelab ")


def test_demo_gates_writes_report(tmp_path):
    result = runner.invoke(app, ["demo", "--only", "gates", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "gates__topk_regions.png" in report
    assert (tmp_path / "demo" / "gates__topk_regions.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["quick"] is True  # the tour is the default
    assert summary["systems"]["gates"]["exit_probability_sum"] == 1.0
    # top-1 of 5 experts on a circle: every expert owns one region
    assert summary["systems"]["gates"]["regions_top1"] == 5


def test_bad_flag_is_one_line_exit_2(capsys):
    assert main(["demo", "--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gatelab: error:") and "--no-such-flag" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_unknown_system_is_exit_2(capsys):
    assert main(["demo", "--only", "nope"]) == 2
    err = capsys.readouterr().err
    assert "'nope' is not one of" in err and "gmoe" in err
    assert main(["reproduce", "gates"]) == 2  # the gates have no tables to reproduce
    assert main(["reproduce", "moe", "--jobs", "0"]) == 2


def test_report_keeps_same_named_figures_apart(tmp_path):
    from gatelab.report import DemoResult, write_report

    figures = []
    for env in ("a", "b"):
        folder = tmp_path / "sys" / env
        folder.mkdir(parents=True)
        (folder / "curve.png").write_bytes(env.encode())
        figures.append(folder / "curve.png")
    report = write_report([DemoResult("sys", "S", figures=figures)], tmp_path / "demo").read_text()
    assert "files in runs/sys/a/, runs/sys/b/" in report
    assert (tmp_path / "demo" / "sys__a__curve.png").read_bytes() == b"a"
    assert (tmp_path / "demo" / "sys__b__curve.png").read_bytes() == b"b"


def test_reproduce_names_each_systems_module_and_expected_time():
    from gatelab.cli import ReproducibleSystem, _reproducer

    for system in ReproducibleSystem:
        module = _reproducer(system.value)
        assert module.__name__ == f"gatelab.{system.value}.reproduce"
        assert isinstance(module.EXPECTED_TIME, str) and "min" in module.EXPECTED_TIME
        assert callable(module.reproduce)


@pytest.mark.parametrize(
    "argv",
    [
        ["moe", "train"],
        ["gmoe", "fit"],
        ["exits", "pretrain"],
        ["comm", "train"],
        ["edge", "serve", "--model", "smollm2-135m"],
    ],
)
def test_a_device_this_machine_lacks_is_one_line_exit_2(argv, capsys):
    assert main([*argv, "--device", "nonsense"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'nonsense' is not a torch device" in err and len(err.splitlines()) == 1
    if not torch.cuda.is_available():
        assert main([*argv, "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip()
        assert "CUDA is not available" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["comm", "compare", "--jobs", "0"], "--jobs"),
        (["comm", "compare", "--max-minutes", "-1"], "--max-minutes"),
        (["exits", "pretrain", "--d-model", "0"], "--d-model"),
        (["exits", "pretrain", "--epochs", "0"], "--epochs"),
        (["exits", "train", "--n-rounds", "0"], "--n-rounds"),
        (["exits", "train", "--phase-steps", "0"], "--phase-steps"),
    ],
)
def test_out_of_range_options_are_refused_before_any_work(argv, flag, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gatelab: error:") and flag in err and len(err.splitlines()) == 1
