"""Adapters that put PettingZoo parallel environments and lbforaging behind :class:`VecEnv`.

Both step ``n_envs`` Python environments one after another and stack the results, so they are far
slower than the numpy grid worlds; they exist so the same trainer runs on standard benchmarks.
Environment ``i`` of a batch is reset with ``seed + i``. After an environment's episode ends it is
not stepped again until ``reset``: it repeats its last observation with zero reward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from gatelab.comm.envs.base import Step


def check_parallel_env(env: Any, name: str) -> tuple[list[str], list[int], int]:
    """What gatelab.comm needs of a PettingZoo parallel environment, or a one-line ValueError.

    Needs: the ParallelEnv API (``possible_agents``, ``observation_space``, ``action_space``),
    at least two agents, discrete actions with one count for all, array (Box) observations.

    Returns:
        The agents, each agent's flattened observation width, and the number of actions.
    """
    from gymnasium import spaces

    missing = [a for a in ("possible_agents", "observation_space", "action_space", "reset", "step")
               if not hasattr(env, a)]  # fmt: skip
    if missing:
        raise ValueError(f"env {name!r}: not a PettingZoo ParallelEnv (no {', '.join(missing)})")
    agents = list(env.possible_agents)
    if len(agents) < 2:
        raise ValueError(f"env {name!r}: has {len(agents)} agent(s); communication needs two")
    counts = set()
    for agent in agents:
        space = env.action_space(agent)
        if not isinstance(space, spaces.Discrete):
            raise ValueError(
                f"env {name!r}: agent {agent!r} acts in {space}; gatelab.comm needs discrete "
                "actions (Discrete; MPE: --env-arg continuous_actions=false)"
            )
        counts.add(int(space.n))
    if len(counts) != 1:
        raise ValueError(f"env {name!r}: agents have {sorted(counts)} actions; one count needed")
    widths = []
    for agent in agents:
        space = env.observation_space(agent)
        if not isinstance(space, spaces.Box):
            raise ValueError(
                f"env {name!r}: agent {agent!r} observes {type(space).__name__}; gatelab.comm "
                "needs array observations (Box)"
            )
        widths.append(int(np.prod(space.shape)))
    return agents, widths, counts.pop()


class PettingZooVec:
    """A batch of PettingZoo ``ParallelEnv`` s with discrete actions and a fixed team.

    Observations are flattened; agents whose observations are narrower than the widest are
    padded with zeros. An episode ends when every agent is terminated or truncated, or after
    ``episode_limit`` steps; an agent leaving while others play is an error (gatelab.comm's
    graph is over a fixed set of agents).

    Args:
        make: builds one parallel environment, e.g. ``lambda: simple_spread_v3.parallel_env(N=3,
            max_cycles=25, continuous_actions=False)``.
        n_envs: batch size ``B``.
        episode_limit: steps per episode (``None``: the environment's ``max_cycles``).
        success_fn: optional ``info -> bool`` for tasks with a success notion (default: none).
        name: the environment's name in error messages.
    """

    def __init__(
        self,
        make: Callable[[], Any],
        n_envs: int,
        episode_limit: int | None = None,
        success_fn: Callable[[dict], bool] | None = None,
        name: str = "environment",
    ) -> None:
        if n_envs < 1:
            raise ValueError(f"n_envs must be >= 1, got {n_envs}")
        self.envs = [make() for _ in range(n_envs)]
        self.name = name
        self.agents, widths, self.n_actions = check_parallel_env(self.envs[0], name)
        limit = episode_limit or getattr(self.envs[0].unwrapped, "max_cycles", None)
        if not limit:
            raise ValueError(f"env {name!r}: has no max_cycles; give an episode limit")
        self.n_envs, self.n_agents, self.episode_limit = n_envs, len(self.agents), int(limit)
        self.obs_dim = max(widths)
        self.success_fn = success_fn
        self._obs = np.zeros((n_envs, self.n_agents, self.obs_dim), dtype=np.float32)
        self.t = np.zeros(n_envs, dtype=np.int64)
        self.done = np.zeros(n_envs, dtype=bool)
        self.success = np.zeros(n_envs, dtype=bool)

    def _store(self, i: int, obs: dict, when: str) -> None:
        absent = [a for a in self.agents if a not in obs]
        if absent:
            raise ValueError(
                f"env {self.name!r}: agent {absent[0]!r} is missing {when} while others play; "
                "gatelab.comm needs a fixed agent count"
            )
        for j, agent in enumerate(self.agents):
            flat = np.asarray(obs[agent], dtype=np.float32).ravel()
            self._obs[i, j, : flat.size] = flat

    def reset(self, seed: int) -> np.ndarray:
        """Reset environment ``i`` with ``seed + i``; obs ``(B, A, O)``."""
        for i, env in enumerate(self.envs):
            obs, _ = env.reset(seed=seed + i)
            self._store(i, obs, "after reset")
        self.t[:] = 0
        self.done[:] = False
        self.success[:] = False
        return self._obs.copy()

    def step(self, actions: np.ndarray) -> Step:
        """Step every live environment with ``actions (B, A)``."""
        reward = np.zeros((self.n_envs, self.n_agents), dtype=np.float32)
        for i, env in enumerate(self.envs):
            if self.done[i]:
                continue
            act = {a: int(actions[i, j]) for j, a in enumerate(self.agents)}
            obs, rew, term, trunc, info = env.step(act)
            reward[i] = [rew.get(a, 0.0) for a in self.agents]
            self.t[i] += 1
            ended = [a for a in self.agents if term.get(a, False) or trunc.get(a, False)]
            if len(ended) == self.n_agents or self.t[i] >= self.episode_limit:
                self.done[i] = True
                self.success[i] = bool(self.success_fn(info)) if self.success_fn else False
            elif ended:
                raise ValueError(
                    f"env {self.name!r}: agent {ended[0]!r} left the episode at step "
                    f"{self.t[i]} while others play; gatelab.comm needs a fixed agent count"
                )
            if obs and (not self.done[i] or all(a in obs for a in self.agents)):
                self._store(i, obs, f"at step {self.t[i]}")
        return Step(self._obs.copy(), reward, self.done.copy(), self.success.copy())

    def close(self) -> None:
        """Close every environment."""
        for env in self.envs:
            env.close()


class LBForagingVec:
    """A batch of level-based foraging environments (``lbforaging`` 2.x, gymnasium API).

    Success: all food collected before the step limit (the environment terminates).

    Args:
        env_id: a registered id such as ``Foraging-8x8-3p-1f-coop-v3``.
        n_envs: batch size ``B``.
    """

    def __init__(self, env_id: str, n_envs: int) -> None:
        import gymnasium as gym
        import lbforaging  # noqa: F401  (registers the Foraging-* ids)

        if env_id not in gym.registry:
            raise ValueError(f"unknown lbforaging id {env_id!r}; e.g. Foraging-8x8-3p-1f-coop-v3")
        self.envs = [gym.make(env_id) for _ in range(n_envs)]
        space = self.envs[0].observation_space
        self.n_envs, self.n_agents = n_envs, len(space)
        self.obs_dim = space[0].shape[0]
        self.n_actions = int(self.envs[0].action_space[0].n)
        self.episode_limit = int(self.envs[0].unwrapped._max_episode_steps)
        self._obs = np.zeros((n_envs, self.n_agents, self.obs_dim), dtype=np.float32)
        self.done = np.zeros(n_envs, dtype=bool)
        self.success = np.zeros(n_envs, dtype=bool)

    def reset(self, seed: int) -> np.ndarray:
        """Reset environment ``i`` with ``seed + i``; obs ``(B, A, O)``."""
        for i, env in enumerate(self.envs):
            obs, _ = env.reset(seed=seed + i)
            self._obs[i] = np.stack(obs)
        self.done[:] = False
        self.success[:] = False
        return self._obs.copy()

    def step(self, actions: np.ndarray) -> Step:
        """Step every live environment with ``actions (B, A)``."""
        reward = np.zeros((self.n_envs, self.n_agents), dtype=np.float32)
        for i, env in enumerate(self.envs):
            if self.done[i]:
                continue
            obs, rew, term, trunc, _ = env.step(tuple(int(a) for a in actions[i]))
            self._obs[i], reward[i] = np.stack(obs), rew
            if term or trunc:
                # lbforaging also terminates at its step limit: success is "no food left"
                self.done[i] = True
                self.success[i] = bool(env.unwrapped.field.sum() == 0)
        return Step(self._obs.copy(), reward, self.done.copy(), self.success.copy())

    def close(self) -> None:
        """Close every environment."""
        for env in self.envs:
            env.close()
