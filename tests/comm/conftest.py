"""Shared fixtures for gatelab.comm tests."""

import pytest

from gatelab.comm.train import train


class _Killed(Exception):
    """Raised by the progress callback: the run "dies" after an update (its checkpoint written)."""


def _strip(history: list[dict]) -> list[dict]:
    # wall-clock speed differs between a run and its resumption
    skip = ("perf/steps_per_s",)
    return [{k: v for k, v in row.items() if k not in skip} for row in history]


@pytest.fixture
def assert_resumes_exactly():
    """``check(cfg, run_dir, kill_after, history)``: a run of ``cfg`` killed after ``kill_after``
    updates and resumed from its checkpoint logs exactly ``history`` (an uninterrupted run's),
    and its metrics.jsonl holds each update once."""

    def check(cfg, run_dir, kill_after: int, history: list[dict]) -> None:
        from gatelab.runs import read_metrics

        def kill(done, _total):
            if done == kill_after:
                raise _Killed

        with pytest.raises(_Killed):
            train(cfg, run_dir, progress=kill)
        assert _strip(train(cfg, run_dir).history) == _strip(history)
        steps = [r["step"] for r in read_metrics(run_dir)]
        assert steps == list(range(1, cfg.ppo.updates + 1))

    return check
