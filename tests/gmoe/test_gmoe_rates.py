import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import gatelab
from gatelab.gmoe.rates import RateConfig, run_study, sample_inputs, start_near_truth, true_model
from gatelab.gmoe.rates_report import rate_study, summarise, table
from gatelab.runs import FAULT_ENV, FAULT_EXIT_CODE, read_json


def test_truth_visits_several_regions_and_split_atom_is_always_selected():
    true = true_model()
    X = sample_inputs(2000, np.random.default_rng(0))
    regions = {tuple(r) for r in true.regions(X)}
    assert len(regions) >= 2
    assert all(0 in r for r in regions)  # why K̄ = 3 can represent the truth exactly


def test_start_near_truth_splits_atom_zero():
    cfg = RateConfig.preset(True)
    start = start_near_truth("over", cfg, np.random.default_rng(0))
    assert start.n_experts == 4 and start.top_k == 3
    assert np.exp(start.beta0[:2]).sum() == pytest.approx(np.exp(0.5), rel=0.5)


def test_slopes_from_known_power_laws():
    cfg = RateConfig(sample_sizes=(100, 1000, 10000), n_reps=2, settings=("exact",))
    records = [
        {"setting": "exact", "n": n, "rep": r, "converged": True, "n_iter": 1}
        | {
            m: 3.0 * n**-0.5 * (1 + 0.1 * r)
            for m in ("hellinger", "tv", "voronoi", "beta1", "a", "b", "var")
        }
        for n in cfg.sample_sizes
        for r in range(2)
    ]
    summary = summarise(records, cfg)
    assert summary["exact"]["hellinger"]["slope"] == pytest.approx(-0.5, abs=1e-12)
    assert summary["exact"]["voronoi"]["theory"] == -0.5
    assert "-0.50 (-0.5)" in table(summary)


def test_tiny_study_writes_outputs_and_resumes(tmp_path):
    cfg = RateConfig(sample_sizes=(200, 400), n_reps=2, n_eval=50, max_iter=50, settings=("exact",))
    summary, figures = rate_study(cfg, tmp_path, workers=1)
    for name in ("rates.json", "config.json", "report.md"):
        assert (tmp_path / name).is_file()
    assert all(f.is_file() for f in figures)
    saved = json.loads((tmp_path / "rates.json").read_text())
    assert saved["exact"]["hellinger"]["theory"] == -0.5
    assert len(list((tmp_path / "reps").glob("*.json"))) == 4
    calls = []
    records = run_study(cfg, tmp_path, workers=1, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(4, 4)]  # everything came from the cache
    assert sorted(r["n"] for r in records) == [200, 200, 400, 400]


def test_bad_config():
    with pytest.raises(ValueError, match="unknown settings"):
        RateConfig(settings=("nope",))
    with pytest.raises(ValueError, match="need sample_sizes"):
        RateConfig(n_reps=1)


@pytest.mark.slow
def test_quick_study_exact_slopes_near_minus_half(tmp_path):
    """The acceptance check of the quick study (about 1 minute of CPU)."""
    summary, _ = rate_study(RateConfig.preset(True), tmp_path, workers=2)
    for metric in ("hellinger", "tv", "voronoi"):
        assert summary["exact"][metric]["slope"] == pytest.approx(-0.5, abs=0.15)


TINY = RateConfig(sample_sizes=(200, 400), n_reps=2, n_eval=50, max_iter=50, settings=("exact",))


def test_quick_and_full_share_a_folder_but_another_configuration_is_refused(tmp_path):
    one = RateConfig(sample_sizes=(200,), n_reps=2, n_eval=50, max_iter=50, settings=("exact",))
    rate_study(one, tmp_path, workers=1)
    calls = []
    rate_study(TINY, tmp_path, workers=1, progress=lambda d, t: calls.append((d, t)))
    assert calls[0] == (2, 4)  # more sizes: the n = 200 replications came from the cache
    with pytest.raises(ValueError, match=r"differs in: max_iter.*--fresh"):
        rate_study(RateConfig(**{**TINY.__dict__, "max_iter": 60}), tmp_path, workers=1)
    assert len(list((tmp_path / "reps").glob("*.json"))) == 4  # nothing deleted
    rate_study(RateConfig(**{**TINY.__dict__, "max_iter": 60}), tmp_path, workers=1, fresh=True)
    assert {r["n_iter"] <= 60 for r in map(read_json, (tmp_path / "reps").glob("*.json"))} == {True}


KILLED_RUN = """
import sys
from pathlib import Path
from gatelab.gmoe.rates import RateConfig
from gatelab.gmoe.rates_report import rate_study
cfg = RateConfig(sample_sizes=(200, 400), n_reps=2, n_eval=50, max_iter=50, settings=("exact",))
rate_study(cfg, Path(sys.argv[1]), workers=1)
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("rates") / "whole"
    rate_study(TINY, out, workers=1)
    return out


@pytest.mark.parametrize(
    ("fault", "cached"),
    [
        ("gmoe-rep-write:2", 1),  # half of the second record written
        pytest.param("gmoe-rep-done:3", 3, marks=pytest.mark.slow),  # between two replications
    ],
)
def test_a_kill_anywhere_resumes_to_the_same_records(fault, cached, uninterrupted, tmp_path):
    """Killed (``os._exit``) at a fault point, rerun: the same records and rates, byte for byte."""
    out = tmp_path / "killed"
    env = os.environ | {FAULT_ENV: fault, "PYTHONPATH": str(Path(gatelab.__file__).parents[1])}
    argv = [sys.executable, "-c", KILLED_RUN, str(out)]
    killed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == FAULT_EXIT_CODE, killed.stderr
    assert not (out / "rates.json").exists()
    calls = []
    rate_study(TINY, out, workers=1, progress=lambda d, t: calls.append(d))
    assert calls[0] == cached  # resumed: only the missing replications ran
    names = sorted(p.name for p in (uninterrupted / "reps").iterdir())
    assert sorted(p.name for p in (out / "reps").iterdir()) == names  # no temporary file left
    for name in names:
        assert (out / "reps" / name).read_bytes() == (uninterrupted / "reps" / name).read_bytes()
    assert (out / "rates.json").read_bytes() == (uninterrupted / "rates.json").read_bytes()


def _processes_naming(token: str) -> list[int]:
    """Pids of the processes whose command line contains ``token`` (Linux /proc)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if token.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:  # the process ended meanwhile
            continue
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")
def test_a_killed_pool_leaves_no_worker_behind_and_resumes(uninterrupted, tmp_path):
    """The main process killed mid-write: its two workers exit too, and a rerun completes."""
    out = tmp_path / "pool"
    script = KILLED_RUN.replace("workers=1", "workers=2")
    env = os.environ | {FAULT_ENV: "gmoe-rep-write:2"}
    env["PYTHONPATH"] = str(Path(gatelab.__file__).parents[1])
    killed = subprocess.run(
        [sys.executable, "-c", script, str(out)], env=env, capture_output=True, timeout=120
    )
    assert killed.returncode == FAULT_EXIT_CODE, killed.stderr
    for _ in range(50):  # the workers notice within a second or two
        if not _processes_naming(str(out)):
            break
        time.sleep(0.2)
    assert _processes_naming(str(out)) == []
    rate_study(TINY, out, workers=2)
    for name in sorted(p.name for p in (uninterrupted / "reps").iterdir()):
        assert (out / "reps" / name).read_bytes() == (uninterrupted / "reps" / name).read_bytes()
