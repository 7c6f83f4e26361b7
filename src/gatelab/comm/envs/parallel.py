r"""Predator-Prey and Predator-Capture-Prey as PettingZoo ``ParallelEnv`` s, one agent at a time.

The standard multi-agent API (PettingZoo, Terry et al., NeurIPS 2021, arXiv:2009.14471), so the
tasks run in any MARL library that speaks it: ``possible_agents`` / ``agents``, per-agent
``observation_space`` (``Box(0, 1, (4 + 3 (2v+1)^2,))``) and ``action_space`` (``Discrete(5)``,
Predator-Capture-Prey ``Discrete(6)``), ``reset(seed, options) -> (observations, infos)``,
``step(actions) -> (observations, rewards, terminations, truncations, infos)``, ``render()``
in ``ansi`` mode. Both pass ``pettingzoo.test.parallel_api_test`` and ``parallel_seed_test``.

The rules are those of :mod:`gatelab.comm.envs.predator_prey` (read there), written here as a
plain loop over agents: the readable reference of the numpy batch that training steps. The
same seed places the entities as environment 0 of a batch reset with it, and the same actions
then give the same observations, rewards and ends (tested side by side). A success ends the
episode as a *termination* of every agent, the step limit as a *truncation*; an agent that is
done (on the prey; a capture agent: captured) stays in ``agents`` with its actions ignored, and
its info says ``acting=False``. The episode's info carries ``success``.
``predator_capture_prey_v1``: HetNet's rules (v0, gatelab's earlier simplification, let
perception agents roam and counted captures only; docs/notes/comm.md).
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from gatelab.comm.envs.predator_prey import CAPTURE, MOVES, STEP_PENALTY, _check


class PredatorPreyEnv(ParallelEnv):
    """IC3Net Predator-Prey (mixed mode) with ``n_agents`` predators and a stationary prey.

    Args:
        n_agents: predators ``A >= 2``.
        grid: side of the square grid.
        vision: view radius ``v``.
        episode_limit: step limit (IC3Net medium: 40 on a 10 x 10 grid).
        render_mode: ``None`` or ``"ansi"`` (``render()`` returns the grid as text).
    """

    metadata = {"name": "predator_prey_v0", "render_modes": ["ansi"], "is_parallelizable": True}
    n_actions = 5

    def __init__(
        self,
        n_agents: int = 5,
        grid: int = 10,
        vision: int = 1,
        episode_limit: int = 40,
        render_mode: str | None = None,
    ) -> None:
        _check(1, n_agents, grid, vision, episode_limit)
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.n_agents, self.grid, self.vision = n_agents, grid, vision
        self.episode_limit, self.render_mode = episode_limit, render_mode
        self.possible_agents = self._names()
        self.agents: list[str] = []
        side = 2 * vision + 1
        self.obs_dim = 4 + 3 * side * side
        box = spaces.Box(0.0, 1.0, (self.obs_dim,), dtype=np.float32)
        self._observation_spaces = {a: box for a in self.possible_agents}
        self._action_spaces = {a: spaces.Discrete(self.n_actions) for a in self.possible_agents}

    def _names(self) -> list[str]:
        return [f"predator_{i}" for i in range(self.n_agents)]

    def observation_space(self, agent: str) -> spaces.Box:
        """The agent's observation space (the same object on every call, as the API asks)."""
        return self._observation_spaces[agent]

    def action_space(self, agent: str) -> spaces.Discrete:
        """The agent's action space (the same object on every call)."""
        return self._action_spaces[agent]

    # ---- dynamics, one agent at a time
    def _sees(self, i: int) -> bool:
        return True

    def _kind(self, i: int) -> float:
        return 0.0

    def reset(self, seed: int | None = None, options: dict | None = None):
        """Predators and prey on distinct random cells (as environment 0 of a batch)."""
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1)[0])
        rng = np.random.default_rng(seed)
        cells = rng.random((1, self.grid * self.grid)).argsort(axis=1)[0, : self.n_agents + 1]
        self.pos = [(int(c) // self.grid, int(c) % self.grid) for c in cells[:-1]]
        self.prey = (int(cells[-1]) // self.grid, int(cells[-1]) % self.grid)
        self.reached = [self._starts_reached(p) for p in self.pos]
        self.t, self.agents = 0, list(self.possible_agents)
        return self._observations(), self._infos(False)

    def _starts_reached(self, position: tuple[int, int]) -> bool:
        return position == self.prey  # a predator placed on the prey has reached it

    def _move(self, i: int, action: int) -> None:
        dr, dc = MOVES[action]
        r, c = self.pos[i]
        self.pos[i] = (min(max(r + dr, 0), self.grid - 1), min(max(c + dc, 0), self.grid - 1))

    def _act(self, actions: dict) -> list[float]:
        """Apply the actions; the rewards of this step."""
        for i, name in enumerate(self.possible_agents):
            if not self.reached[i]:
                self._move(i, int(actions[name]))
        rewards = []
        for i in range(self.n_agents):
            self.reached[i] = self.reached[i] or self.pos[i] == self.prey
            rewards.append(0.0 if self.reached[i] else STEP_PENALTY)
        return rewards

    def _success(self) -> bool:
        return all(self.reached)

    def step(self, actions: dict):
        """One step of every agent; ``actions`` must name every live agent."""
        if not self.agents:
            raise ValueError("step() after the episode ended; call reset()")
        missing = [a for a in self.agents if a not in actions]
        if missing:
            raise ValueError(f"actions must name every live agent; missing {missing}")
        for name in self.agents:
            if not self.action_space(name).contains(actions[name]):
                raise ValueError(f"action of {name} must be in [0, {self.n_actions}), got "
                                 f"{actions[name]!r}")  # fmt: skip
        rewards = self._act(actions)
        self.t += 1
        success = self._success()
        truncated = not success and self.t >= self.episode_limit
        observations, infos = self._observations(), self._infos(success)
        names = self.possible_agents
        terminations = dict.fromkeys(names, success)
        truncations = dict.fromkeys(names, truncated)
        if success or truncated:
            self.agents = []
        return (
            observations,
            dict(zip(names, rewards, strict=True)),
            terminations,
            truncations,
            infos,
        )

    def _observations(self) -> dict[str, np.ndarray]:
        out = {}
        for i, name in enumerate(self.possible_agents):
            r, c = self.pos[i]
            scale = max(self.grid - 1, 1)
            own = [r / scale, c / scale, float(self.reached[i]), self._kind(i)]
            window = []
            for dr in range(-self.vision, self.vision + 1):
                for dc in range(-self.vision, self.vision + 1):
                    cell = (r + dr, c + dc)
                    inside = 0 <= cell[0] < self.grid and 0 <= cell[1] < self.grid
                    others = sum(p == cell for j, p in enumerate(self.pos) if j != i)
                    seen = [float(cell == self.prey), others / self.n_agents, float(not inside)]
                    window += seen if self._sees(i) else [0.0, 0.0, 0.0]
            out[name] = np.asarray(own + window, dtype=np.float32)
        return out

    def _infos(self, success: bool) -> dict[str, dict]:
        return {
            name: {"acting": not self.reached[i], "success": success}
            for i, name in enumerate(self.possible_agents)
        }

    def render(self) -> str | None:
        """The grid as text (``ansi``): ``P`` prey, digits predators, ``*`` on the prey."""
        if self.render_mode is None:
            return None
        rows = [["." for _ in range(self.grid)] for _ in range(self.grid)]
        rows[self.prey[0]][self.prey[1]] = "P"
        for i, (r, c) in enumerate(self.pos):
            rows[r][c] = "*" if (r, c) == self.prey else str(i % 10)
        return "\n".join("".join(row) for row in rows)

    def close(self) -> None:
        """Nothing to release."""


class PredatorCapturePreyEnv(PredatorPreyEnv):
    """HetNet's Predator-Capture-Prey: perception agents find the prey, capture agents capture.

    Args:
        n_capture: capture agents (the last ones; default ``A // 2``); the others perceive.
        (the rest as :class:`PredatorPreyEnv`)
    """

    metadata = {"name": "predator_capture_prey_v1", "render_modes": ["ansi"],
                "is_parallelizable": True}  # fmt: skip
    n_actions = 6

    def __init__(
        self,
        n_agents: int = 5,
        grid: int = 10,
        vision: int = 1,
        episode_limit: int = 40,
        render_mode: str | None = None,
        n_capture: int | None = None,
    ) -> None:
        self.n_capture = n_agents // 2 if n_capture is None else n_capture
        if not 1 <= self.n_capture < n_agents:
            raise ValueError(f"n_capture must be in [1, A-1={n_agents - 1}], got {self.n_capture}")
        super().__init__(n_agents, grid, vision, episode_limit, render_mode)

    def _names(self) -> list[str]:
        perceive = self.n_agents - self.n_capture
        return [f"perception_{i}" for i in range(perceive)] + [
            f"capture_{i}" for i in range(self.n_capture)
        ]

    def _is_capture(self, i: int) -> bool:
        return i >= self.n_agents - self.n_capture

    def _sees(self, i: int) -> bool:
        return not self._is_capture(i)  # capture agents are blind

    def _kind(self, i: int) -> float:
        return float(self._is_capture(i))

    def _starts_reached(self, position: tuple[int, int]) -> bool:
        return False  # nobody has captured yet

    def _act(self, actions: dict) -> list[float]:
        for i, name in enumerate(self.possible_agents):
            action = int(actions[name])
            if self.pos[i] != self.prey:  # an agent on the prey stays there
                self._move(i, action)  # capture moves nobody (as stay)
            elif self._is_capture(i) and action == CAPTURE:
                self.reached[i] = True  # captured
            if not self._is_capture(i) and self.pos[i] == self.prey:
                self.reached[i] = True  # a perception agent on the prey is done
        return [0.0 if done else STEP_PENALTY for done in self.reached]
