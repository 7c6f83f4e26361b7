"""Environments behind one vectorised interface (:class:`VecEnv`), and :func:`make_env`.

Native: the numpy grid worlds (Predator-Prey, Predator-Capture-Prey; their PettingZoo
``ParallelEnv`` versions are in :mod:`gatelab.comm.envs.parallel`), ``simple_spread`` (mpe2) and
``lbforaging``. Any other PettingZoo parallel environment is named by its module and runs
through :class:`PettingZooVec`, which says in one line what an environment lacks.
"""

from __future__ import annotations

import importlib
from typing import Any

from gatelab.comm.envs.adapters import LBForagingVec, PettingZooVec
from gatelab.comm.envs.base import Step, VecEnv
from gatelab.comm.envs.parallel import PredatorCapturePreyEnv, PredatorPreyEnv
from gatelab.comm.envs.predator_prey import PredatorCapturePrey, PredatorPrey

ENVS = ("predator_prey", "predator_capture_prey", "simple_spread", "lbforaging")
SIMPLE_SPREAD_CYCLES = 25  # MPE default max_cycles


def make_env(
    name: str,
    n_envs: int,
    n_agents: int,
    grid: int = 10,
    vision: int = 1,
    episode_limit: int | None = None,
    env_kwargs: dict[str, Any] | None = None,
) -> VecEnv:
    """Build a batch of ``n_envs`` environments by name (one of :data:`ENVS`, or a module).

    ``grid``/``vision`` apply to the grid worlds (and ``grid`` is lbforaging's side);
    ``episode_limit=None`` takes each environment's default (grid worlds: 40 on a 10x10 grid as
    IC3Net's medium setting, else ``4 * grid``; simple_spread: 25; lbforaging: 50; a PettingZoo
    module's: its ``max_cycles``). Any other name is a module whose
    ``parallel_env(**env_kwargs)`` builds a PettingZoo parallel environment (its own agents).
    """
    if name in ENVS and env_kwargs:
        raise ValueError(f"env_kwargs are for PettingZoo modules; {name} takes agents/grid/vision")
    if n_agents < 2:
        raise ValueError(f"agents must be >= 2, got {n_agents}")
    if name in ("predator_prey", "predator_capture_prey"):
        limit = episode_limit or 4 * grid
        cls = PredatorPrey if name == "predator_prey" else PredatorCapturePrey
        return cls(n_envs, n_agents, grid, vision, limit)
    if name == "simple_spread":
        from mpe2 import simple_spread_v3

        limit = episode_limit or SIMPLE_SPREAD_CYCLES

        def make():
            return simple_spread_v3.parallel_env(
                N=n_agents, max_cycles=limit, continuous_actions=False
            )

        return PettingZooVec(make, n_envs, limit, name=name)
    if name == "lbforaging":
        return LBForagingVec(f"Foraging-{grid}x{grid}-{n_agents}p-1f-coop-v3", n_envs)
    return PettingZooVec(_module_factory(name, env_kwargs or {}), n_envs, episode_limit, name=name)


def env_for(env_cfg, n_envs: int) -> VecEnv:
    """:func:`make_env` for an :class:`~gatelab.comm.config.EnvConfig` (a run's environment)."""
    e = env_cfg
    return make_env(
        e.name, n_envs, e.agents, e.grid, e.vision, e.episode_limit or None, e.env_kwargs
    )


def _module_factory(name: str, kwargs: dict[str, Any]):
    """``() -> ParallelEnv`` from module ``name``'s ``parallel_env(**kwargs)``."""
    try:
        module = importlib.import_module(name)
    except ImportError as error:
        raise ValueError(
            f"unknown env {name!r}: not one of {', '.join(ENVS)} and cannot import it as a "
            f"PettingZoo module ({error})"
        ) from None
    factory = getattr(module, "parallel_env", None)
    if not callable(factory):
        raise ValueError(f"env {name!r}: the module has no parallel_env() (not a PettingZoo env)")

    def make():
        try:
            return factory(**kwargs)
        except TypeError as error:  # an unknown keyword argument
            raise ValueError(f"env {name!r}: parallel_env({kwargs}) failed: {error}") from None

    return make


__all__ = [
    "ENVS",
    "LBForagingVec",
    "PettingZooVec",
    "PredatorCapturePrey",
    "PredatorCapturePreyEnv",
    "PredatorPrey",
    "PredatorPreyEnv",
    "Step",
    "VecEnv",
    "env_for",
    "make_env",
]
