r"""Predator-Prey and Predator-Capture-Prey grid worlds in numpy, a whole batch stepped at once.

**Predator-Prey** follows IC3Net (Singh et al., ICLR 2019, arXiv:1812.09755, §4 and its
``predator_prey_env.py``, "mixed" mode that CommFormer uses):

* a ``grid x grid`` world; ``A`` predators and one *stationary* prey start on distinct random cells;
* actions ``0 up, 1 right, 2 down, 3 left, 4 stay`` (moves off the grid are clipped);
* vision ``v``: a predator sees the ``(2v+1) x (2v+1)`` window around itself (prey, other predators,
  outside-of-grid), plus its own absolute position and whether it has reached the prey;
* reward ``-0.05`` per step for each predator not on the prey, ``0`` for one on it; a predator that
  reaches the prey stays there (its later actions are ignored, as in IC3Net);
* the episode ends when every predator is on the prey (**success**) or after ``episode_limit``
  steps.

With vision 1 on a 10 x 10 grid a predator rarely finds the prey alone within 40 steps; the ones
that do sit on it, so their own position *is* the prey's position, and the others can only learn it
by communication. That is what makes the task a test of the communication graph.

**Predator-Capture-Prey** follows HetNet (Seraj et al., AAMAS 2022, arXiv:2110.15146, §5, and
its ``predator_capture_env.py``, mixed mode): the first ``A - n_capture`` agents are *perception*
agents with vision ``v``; the last ``n_capture`` are *capture* agents that see nothing of the world
but their own position (no window channels). Actions add ``5 capture`` (``stay`` for perception
agents). A perception agent that reaches the prey stays on it, as a Predator-Prey predator; a
capture agent on the prey's cell can no longer move, only capture. Each agent pays ``-0.05`` per
step until it is done (perception: on the prey; capture: captured); success is every agent done
within the limit. A perception agent sitting on the prey is what lets a blind capture agent be told
where to go.
"""

from __future__ import annotations

import numpy as np

from gatelab.comm.envs.base import Step

STEP_PENALTY = -0.05  # IC3Net TIMESTEP_PENALTY
MOVES = np.array(
    [[-1, 0], [0, 1], [1, 0], [0, -1], [0, 0], [0, 0]]
)  # up right down left stay capture
CAPTURE = 5  # the capture action of Predator-Capture-Prey


def _check(n_envs: int, n_agents: int, grid: int, vision: int, episode_limit: int) -> None:
    if n_envs < 1:
        raise ValueError(f"n_envs must be >= 1, got {n_envs}")
    if n_agents < 2:
        raise ValueError(f"n_agents must be >= 2 (communication needs two agents), got {n_agents}")
    if grid < 2 or grid * grid < n_agents + 1:
        raise ValueError(f"grid must be >= 2 with room for {n_agents + 1} entities, got {grid}")
    if vision < 0:
        raise ValueError(f"vision must be >= 0, got {vision}")
    if episode_limit < 1:
        raise ValueError(f"episode_limit must be >= 1, got {episode_limit}")


class PredatorPrey:
    """IC3Net Predator-Prey (mixed mode), vectorised over ``n_envs`` environments.

    Args:
        n_envs: batch size ``B``.
        n_agents: predators ``A >= 2``.
        grid: side of the square grid.
        vision: view radius ``v`` (IC3Net medium: 1).
        episode_limit: step limit (IC3Net medium: 40).

    State (public, so tests can build states by hand): ``pos (B, A, 2)`` row/col of each predator,
    ``prey (B, 2)``, ``reached (B, A)``, ``t (B,)``, ``done (B,)``, ``success (B,)``.
    """

    n_actions = 5

    def __init__(
        self, n_envs: int, n_agents: int, grid: int = 10, vision: int = 1, episode_limit: int = 40
    ) -> None:
        _check(n_envs, n_agents, grid, vision, episode_limit)
        self.n_envs, self.n_agents, self.grid = n_envs, n_agents, grid
        self.vision, self.episode_limit = vision, episode_limit
        side = 2 * vision + 1
        self.offsets = np.stack(
            np.meshgrid(
                np.arange(-vision, vision + 1), np.arange(-vision, vision + 1), indexing="ij"
            ),
            -1,
        ).reshape(side * side, 2)  # (W, 2) window offsets, row-major
        self.obs_dim = 4 + 3 * side * side
        self.pos = np.zeros((n_envs, n_agents, 2), dtype=np.int64)
        self.prey = np.zeros((n_envs, 2), dtype=np.int64)
        self.reached = np.zeros((n_envs, n_agents), dtype=bool)
        self.t = np.zeros(n_envs, dtype=np.int64)
        self.done = np.zeros(n_envs, dtype=bool)
        self.success = np.zeros(n_envs, dtype=bool)

    def reset(self, seed: int) -> np.ndarray:
        """Place predators and prey on distinct random cells; returns obs ``(B, A, O)``."""
        rng = np.random.default_rng(seed)
        cells = rng.random((self.n_envs, self.grid * self.grid)).argsort(axis=1)
        cells = cells[:, : self.n_agents + 1]  # (B, A+1) distinct cells
        rc = np.stack([cells // self.grid, cells % self.grid], -1)  # (B, A+1, 2)
        self.pos, self.prey = rc[:, :-1].copy(), rc[:, -1].copy()
        self.reached = (self.pos == self.prey[:, None]).all(-1)
        self.t[:] = 0
        self.done[:] = False
        self.success[:] = False
        return self.observe()

    def _move(self, actions: np.ndarray, frozen: np.ndarray) -> None:
        actions = np.asarray(actions)
        if actions.shape != (self.n_envs, self.n_agents):
            raise ValueError(
                f"actions must have shape (B={self.n_envs}, A={self.n_agents}), got {actions.shape}"
            )
        if actions.min() < 0 or actions.max() >= self.n_actions:
            raise ValueError(f"actions must be in [0, {self.n_actions}), got {actions.min()}..")
        step = MOVES[actions] * ~frozen[..., None]  # (B, A, 2)
        self.pos = np.clip(self.pos + step, 0, self.grid - 1)

    def step(self, actions: np.ndarray) -> Step:
        """Move, update who reached the prey, pay ``-0.05`` to each predator not on it."""
        live = ~self.done  # (B,)
        self._move(actions, self.reached | self.done[:, None])
        self.reached |= (self.pos == self.prey[:, None]).all(-1)
        reward = np.where(self.reached, 0.0, STEP_PENALTY) * live[:, None]  # (B, A)
        self.t += live
        self.success |= live & self.reached.all(-1)
        self.done |= self.success | (self.t >= self.episode_limit)
        return Step(
            self.observe(), reward.astype(np.float32), self.done.copy(), self.success.copy()
        )

    def acting(self) -> np.ndarray:
        """``(B, A)`` bool: the next action moves the agent (not frozen on the prey, not done)."""
        return ~self.reached & ~self.done[:, None]

    def _window(self, sees: np.ndarray) -> np.ndarray:
        """Window channels (prey, other predators / A, outside) for agents who ``sees (A,)``."""
        cells = self.pos[:, :, None, :] + self.offsets  # (B, A, W, 2)
        outside = ((cells < 0) | (cells >= self.grid)).any(-1)  # (B, A, W)
        prey = (cells == self.prey[:, None, None, :]).all(-1)  # (B, A, W)
        same = (cells[:, :, :, None, :] == self.pos[:, None, None, :, :]).all(-1)  # (B, A, W, A)
        others = same.sum(-1) - (self.offsets == 0).all(-1)  # (B, A, W) minus self at centre
        chans = np.stack([prey, others / self.n_agents, outside], -1) * sees[:, None, None]
        return chans.reshape(self.n_envs, self.n_agents, -1)  # (B, A, 3W)

    def _observe(self, sees: np.ndarray, kind: np.ndarray) -> np.ndarray:
        own = self.pos / max(self.grid - 1, 1)  # (B, A, 2)
        flags = np.stack([self.reached, np.broadcast_to(kind, self.reached.shape)], -1)
        return np.concatenate([own, flags, self._window(sees)], -1).astype(np.float32)

    def observe(self) -> np.ndarray:
        """Observations ``(B, A, 4 + 3 (2v+1)^2)``: position, reached, kind 0, window channels."""
        return self._observe(np.ones(self.n_agents), np.zeros(self.n_agents))

    def close(self) -> None:
        """Nothing to release."""


class PredatorCapturePrey(PredatorPrey):
    """HetNet's Predator-Capture-Prey: perception agents find the prey, capture agents capture.

    Args:
        n_capture: number of capture agents (the last ones); default ``A // 2``.

    ``reached`` marks the agents that are done: perception agents on the prey, capture agents that
    have captured. Observation kind flag: 0 perception, 1 capture.
    """

    n_actions = 6

    def __init__(
        self,
        n_envs: int,
        n_agents: int,
        grid: int = 10,
        vision: int = 1,
        episode_limit: int = 40,
        n_capture: int | None = None,
    ) -> None:
        super().__init__(n_envs, n_agents, grid, vision, episode_limit)
        self.n_capture = n_agents // 2 if n_capture is None else n_capture
        if not 1 <= self.n_capture < n_agents:
            raise ValueError(f"n_capture must be in [1, A-1={n_agents - 1}], got {self.n_capture}")
        self.is_capture = np.arange(n_agents) >= n_agents - self.n_capture  # (A,)

    def reset(self, seed: int) -> np.ndarray:
        """Random distinct cells; nobody has captured yet."""
        obs = super().reset(seed)
        self.reached[:] = False
        return obs if not self.reached.any() else self.observe()

    def step(self, actions: np.ndarray) -> Step:
        """Move (capture = stay; nobody leaves the prey), register arrivals and captures, pay."""
        live = ~self.done
        on_prey = (self.pos == self.prey[:, None]).all(-1)  # (B, A) before the move: frozen
        self._move(actions, on_prey | self.done[:, None])
        on_prey = (self.pos == self.prey[:, None]).all(-1)
        captured = on_prey & (np.asarray(actions) == CAPTURE) & self.is_capture & live[:, None]
        self.reached |= (on_prey & ~self.is_capture) | captured
        reward = np.where(self.reached, 0.0, STEP_PENALTY) * live[:, None]  # (B, A)
        self.t += live
        self.success |= live & self.reached.all(-1)
        self.done |= self.success | (self.t >= self.episode_limit)
        return Step(
            self.observe(), reward.astype(np.float32), self.done.copy(), self.success.copy()
        )

    def observe(self) -> np.ndarray:
        """Like Predator-Prey, but capture agents' window channels are all zero (they are blind)."""
        return self._observe(~self.is_capture, self.is_capture.astype(float))
