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


class PettingZooVec:
    """A batch of PettingZoo ``ParallelEnv`` s with discrete actions and equal observation widths.

    Args:
        make: builds one parallel environment, e.g. ``lambda: simple_spread_v3.parallel_env(N=3,
            max_cycles=25, continuous_actions=False)``.
        n_envs: batch size ``B``.
        episode_limit: steps per episode (the environment's own ``max_cycles``).
        success_fn: optional ``info -> bool`` for tasks with a success notion (default: none).
    """

    def __init__(
        self,
        make: Callable[[], Any],
        n_envs: int,
        episode_limit: int,
        success_fn: Callable[[dict], bool] | None = None,
    ) -> None:
        if n_envs < 1:
            raise ValueError(f"n_envs must be >= 1, got {n_envs}")
        self.envs = [make() for _ in range(n_envs)]
        first = self.envs[0]
        self.agents = list(first.possible_agents)
        self.n_envs, self.n_agents, self.episode_limit = n_envs, len(self.agents), episode_limit
        widths = {first.observation_space(a).shape[0] for a in self.agents}
        if len(widths) != 1:
            raise ValueError(f"all agents need the same observation width, got {sorted(widths)}")
        self.obs_dim = widths.pop()
        self.n_actions = int(first.action_space(self.agents[0]).n)
        self.success_fn = success_fn
        self._obs = np.zeros((n_envs, self.n_agents, self.obs_dim), dtype=np.float32)
        self.done = np.zeros(n_envs, dtype=bool)
        self.success = np.zeros(n_envs, dtype=bool)

    def reset(self, seed: int) -> np.ndarray:
        """Reset environment ``i`` with ``seed + i``; obs ``(B, A, O)``."""
        for i, env in enumerate(self.envs):
            obs, _ = env.reset(seed=seed + i)
            self._obs[i] = np.stack([obs[a] for a in self.agents])
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
            reward[i] = [rew[a] for a in self.agents]
            if obs:
                self._obs[i] = np.stack([obs[a] for a in self.agents])
            if all(term.get(a, True) or trunc.get(a, True) for a in self.agents):
                self.done[i] = True
                self.success[i] = bool(self.success_fn(info)) if self.success_fn else False
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
