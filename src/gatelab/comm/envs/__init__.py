"""Environments behind one vectorised interface (:class:`VecEnv`), and :func:`make_env`."""

from __future__ import annotations

from gatelab.comm.envs.adapters import LBForagingVec, PettingZooVec
from gatelab.comm.envs.base import Step, VecEnv
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
) -> VecEnv:
    """Build a batch of ``n_envs`` environments by name (one of :data:`ENVS`).

    ``grid``/``vision`` apply to the grid worlds (and ``grid`` is lbforaging's side);
    ``episode_limit=None`` takes each environment's default (grid worlds: 40 on a 10x10 grid as
    IC3Net's medium setting, else ``4 * grid``; simple_spread: 25; lbforaging: 50).
    """
    if name not in ENVS:
        raise ValueError(f"unknown env {name!r}; choose from {', '.join(ENVS)}")
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

        return PettingZooVec(make, n_envs, limit)
    return LBForagingVec(f"Foraging-{grid}x{grid}-{n_agents}p-1f-coop-v3", n_envs)


__all__ = [
    "ENVS",
    "LBForagingVec",
    "PettingZooVec",
    "PredatorCapturePrey",
    "PredatorPrey",
    "Step",
    "VecEnv",
    "make_env",
]
