import inspect
import json

from gatelab.gmoe import cli, reproduce
from gatelab.gmoe.rates import RateConfig


def test_configurations_are_the_documented_commands():
    configs = reproduce.configurations()
    assert list(configs["rates"]["sample_sizes"]) == [1000, 2000, 5000, 10000, 20000, 50000, 100000]
    assert configs["rates"]["n_reps"] == 20 and RateConfig.preset(False) == RateConfig()
    defaults = inspect.signature(cli.select).parameters
    assert configs["select"] == {"n": defaults["n"].default, "seed": defaults["seed"].default}
    assert list(configs["rates_quick"]["sample_sizes"]) == [500, 1000, 2000, 4000]
    assert configs["rates_quick"]["n_reps"] == 6


def test_reproduce_on_a_tiny_config_writes_tables_and_resumes(tmp_path, monkeypatch):
    tiny = RateConfig(sample_sizes=(60, 120), n_reps=2, n_eval=10, max_iter=20, settings=("exact",))
    monkeypatch.setattr(RateConfig, "preset", classmethod(lambda cls, quick: tiny))
    monkeypatch.setattr(reproduce, "SELECTION", {"n": 200, "seed": 0})
    path = reproduce.reproduce(tmp_path, jobs=1)
    assert path == tmp_path / "reproduce" / "gmoe" / "tables.md"
    text = path.read_text()
    assert "| exact |" in text and "BIC picks" in text
    assert set(json.loads((path.parent / "tables.json").read_text())) == {
        "rates",
        "rates_quick",
        "select",
    }
    reps = sorted((tmp_path / "gmoe-rates" / "reps").iterdir())
    stamps = [p.stat().st_mtime_ns for p in reps]
    calls = []
    monkeypatch.setattr("gatelab.gmoe.rates.run_replication", lambda *a: calls.append(a) or {})
    assert reproduce.reproduce(tmp_path, jobs=1).read_text() == text
    assert not calls and [p.stat().st_mtime_ns for p in reps] == stamps
