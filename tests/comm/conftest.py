"""Shared test helpers for gatelab.comm."""

from dataclasses import fields, replace

import pytest

from gatelab.comm.config import EnvConfig, GateConfig, ModelConfig, PPOConfig, TrainConfig
from gatelab.comm.train import train

# flat names of the sections' fields (a few renamed so that they read alone)
_RENAMED = {
    "env": ("env", "name"),
    "gate_estimator": ("gate", "estimator"),
    "gate_warmup": ("gate", "warmup"),
    "gate_temp_min": ("gate", "temp_min"),
    "gate_anneal": ("gate", "anneal"),
}
_SECTIONS = {"env": EnvConfig, "model": ModelConfig, "ppo": PPOConfig, "gate": GateConfig}
_WHERE = {f.name: (s, f.name) for s, cls in _SECTIONS.items() for f in fields(cls)}
_WHERE.pop("name")
_WHERE.update(_RENAMED)


def config(base: TrainConfig | None = None, **flat) -> TrainConfig:
    """``base`` (default ``TrainConfig()``) with fields changed by flat names, e.g. ``agents=3``."""
    base = base or TrainConfig()
    sections: dict[str, dict] = {}
    top = {}
    for key, value in flat.items():
        if key in _WHERE:
            section, name = _WHERE[key]
            sections.setdefault(section, {})[name] = value
        else:
            top[key] = value
    changed = {s: replace(getattr(base, s), **c) for s, c in sections.items()}
    return replace(base, **changed, **top)


class _Killed(Exception):
    """Raised by the progress callback: the run "dies" after an update (its checkpoint written)."""


def _strip(history: list[dict]) -> list[dict]:
    # speed, and alpha_drift (measured from the alpha a process started with), differ on resume
    skip = ("perf/steps_per_s", "graph/alpha_drift")
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
        assert _strip(train(cfg, run_dir, resume=True).history) == _strip(history)
        steps = [r["step"] for r in read_metrics(run_dir)]
        assert steps == list(range(1, cfg.ppo.updates + 1))

    return check
