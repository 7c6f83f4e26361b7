import json

import numpy as np
from typer.testing import CliRunner

from gatelab.cli import app

runner = CliRunner()


def test_help():
    for args in (["gmoe", "--help"], ["gmoe", "rates", "--help"], ["gmoe", "fit", "--help"]):
        assert runner.invoke(app, args).exit_code == 0


def test_bad_option_and_missing_file_exit_2(tmp_path):
    result = runner.invoke(app, ["gmoe", "rates", "--workers", "0", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert runner.invoke(app, ["gmoe", "fit", str(tmp_path / "missing.csv")]).exit_code == 2
    assert runner.invoke(app, ["gmoe", "select", "--n", "3"]).exit_code == 2


def test_fit_csv(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 300)
    y = np.where(x > 0, 2 * x, -x) + 0.1 * rng.standard_normal(300)
    csv = tmp_path / "data.csv"
    np.savetxt(csv, np.column_stack([x, y]), delimiter=",", header="x,y", comments="")
    out = tmp_path / "fit"
    result = runner.invoke(app, ["gmoe", "fit", str(csv), "--n-experts", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    params = json.loads((out / "params.json").read_text())
    assert len(params["var"]) == 2 and params["converged"]
    bad = tmp_path / "bad.csv"
    bad.write_text("y\n1\n2\n")
    assert runner.invoke(app, ["gmoe", "fit", str(bad)]).exit_code == 2


def test_quick_never_overrides_an_explicit_flag(tmp_path, monkeypatch):
    import gatelab.gmoe.rates_report as report

    seen = {}

    def fake_study(cfg, out, workers, progress, fresh):
        seen.update(cfg=cfg, workers=workers, fresh=fresh)
        return {}, None

    monkeypatch.setattr(report, "rate_study", fake_study)
    monkeypatch.setattr(report, "table", lambda summary: "")
    args = ["gmoe", "rates", "--quick", "--runs-dir", str(tmp_path)]
    assert runner.invoke(app, [*args, "--n-reps", "3", "--workers", "1"]).exit_code == 0
    assert seen["cfg"].n_reps == 3 and seen["workers"] == 1 and not seen["fresh"]
    assert seen["cfg"].sample_sizes == (500, 1000, 2000, 4000)  # quick's default kept
    assert runner.invoke(app, args).exit_code == 0
    assert seen["cfg"].n_reps == 6
    bad = runner.invoke(app, [*args, "--n-reps", "1"])
    assert bad.exit_code == 2
    assert runner.invoke(app, [*args, "--fresh"]).exit_code == 0 and seen["fresh"]
