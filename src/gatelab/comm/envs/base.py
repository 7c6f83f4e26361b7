"""The one vectorised interface every gatelab.comm environment speaks.

A *batch* of ``B`` environments with ``A`` agents each is stepped as arrays. Episodes of one batch
start together (``reset``) and run for at most ``episode_limit`` steps; an environment whose episode
is over keeps returning ``done=True``, zero reward and its last observation until the next
``reset``. The trainer therefore collects fixed-length rollouts of ``episode_limit`` steps and masks
the steps after ``done`` (no auto-reset, so no episode is ever cut or spliced).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np


class Step(NamedTuple):
    """What ``step`` returns.

    Attributes:
        obs: ``(B, A, O)`` float32 observations after the step.
        reward: ``(B, A)`` float32 rewards of this step (zero for finished environments).
        done: ``(B,)`` bool, the episode is over (success or limit).
        success: ``(B,)`` bool, the episode's task is solved (always False where undefined).
    """

    obs: np.ndarray
    reward: np.ndarray
    done: np.ndarray
    success: np.ndarray


class VecEnv(Protocol):
    """Batch of ``n_envs`` multi-agent environments stepped as arrays."""

    n_envs: int
    n_agents: int
    obs_dim: int
    n_actions: int
    episode_limit: int

    def reset(self, seed: int) -> np.ndarray:
        """Start new episodes everywhere, deterministic in ``seed``; obs ``(B, A, O)``."""
        ...

    def step(self, actions: np.ndarray) -> Step:
        """Apply integer ``actions`` of shape ``(B, A)``."""
        ...

    def close(self) -> None:
        """Release resources (no-op for the numpy environments)."""
        ...
