"""``config(**flat)``: a TrainConfig with fields changed by flat names (shared by comm tests).

A plain module, not conftest.py: another test folder has a conftest of its own, and
``from conftest import ...`` would pick whichever was imported first.
"""

from dataclasses import fields, replace

from gatelab.comm.config import EnvConfig, GateConfig, ModelConfig, PPOConfig, TrainConfig

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
