"""Kill anywhere, rerun, get the uninterrupted run's weights and metrics bit for bit (CPU).

The run is killed (``os._exit``, as ``kill -9``) by :func:`gatelab.runs.fault_point` before an
update, after an update was logged but not checkpointed, half-way through writing a checkpoint,
and between moving the old checkpoint aside and putting the new one in place; rerunning the same
command resumes from the last good checkpoint.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from comm_config import config
from safetensors.torch import load_file

from gatelab.comm.train import train
from gatelab.runs import FAULT_ENV, FAULT_EXIT_CODE, read_metrics

CFG = config(
    agents=3, grid=4, episode_limit=6, n_envs=6, updates=4, d_model=16, ppo_epochs=2,
    alpha_warmup_updates=1, checkpoint_every=2, temporal_gate=True, comm_budget=0.25,
    gate_warmup=0.25, gate_temp_min=0.5, memory=True,
)  # fmt: skip
SRC = Path(__file__).resolve().parents[2] / "src"
RUN = "import json, sys; from gatelab.comm.config import TrainConfig; from gatelab.comm.train import train; train(TrainConfig.from_dict(json.loads(sys.argv[1])), sys.argv[2])"  # noqa: E501


def _run(run_dir: Path, fault: str | None) -> int:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    cmd = [sys.executable, "-c", RUN, json.dumps(CFG.to_dict()), str(run_dir)]
    return subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode


def _records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "perf/steps_per_s"} for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("straight")
    train(CFG, run)  # uninterrupted, in this process
    return load_file(run / "model.safetensors"), _records(run)


# checkpoints at updates 2 and 4; the first has no older file to move aside (rotate:1 is the 2nd)
FAULTS = ["comm-update:3", "comm-metrics:3", "checkpoint-write:2", "checkpoint-rotate:1"]


@pytest.mark.parametrize(
    "fault", [pytest.param(f, marks=() if f == "checkpoint-rotate:1" else pytest.mark.slow)
              for f in FAULTS],
)  # fmt: skip
def test_killed_run_resumes_bit_identical(tmp_path, reference, fault):
    run = tmp_path / "run"
    assert _run(run, fault) == FAULT_EXIT_CODE  # died where it was told to
    assert _run(run, None) == 0  # the same command again: resumes
    weights, records = reference
    final = load_file(run / "model.safetensors")
    assert final.keys() == weights.keys()  # model, value normaliser and both Adam states
    for key, tensor in weights.items():
        assert torch.equal(final[key], tensor), key
    assert _records(run) == records  # every update once, alpha_drift included
    assert not list(run.glob(".*.tmp"))  # no torn temporary file left behind
