"""Evaluate a trained policy with the deterministic graph and deterministic temporal gates.

Metrics (flat, JSON-ready): ``success_rate`` (share of episodes solved within the limit),
``mean_steps`` (episode length, the limit for failures), ``mean_return`` (sum of rewards per agent
and episode, averaged), ``comm_rate`` (active edges over ``A(A-1)`` per live step).
"""

from __future__ import annotations

import numpy as np
import torch

from gatelab.comm.config import EnvConfig
from gatelab.comm.envs import env_for
from gatelab.comm.model import CommFormer
from gatelab.comm.ppo import collect


def evaluate(
    model: CommFormer,
    env_cfg: EnvConfig,
    episodes: int = 100,
    seed: int = 0,
    batch: int = 100,
    greedy: bool = False,
) -> dict[str, float]:
    """Run ``episodes`` evaluation episodes (actions sampled unless ``greedy``).

    ``env_cfg``: the run's environment (``TrainConfig.env``; :func:`load_model` returns it).
    Episodes run in batches of ``batch``; the batch starting at episode ``j`` resets with seed
    ``seed * 1000003 + j``.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    torch.manual_seed(seed)
    model.eval()
    success, steps, returns, comm = [], [], [], []
    done = 0
    while done < episodes:
        n = min(batch, episodes - done)
        e = env_cfg
        env = env_for(e, n)
        env_seed = seed * 1_000_003 + done  # episode j of the evaluation uses seed*1000003 + j
        generator = torch.Generator().manual_seed(env_seed)
        ro = collect(model, env, env_seed, 0, generator, False, greedy, memory=env_cfg.memory)
        env.close()
        success.append(ro.success)
        steps.append(ro.steps)
        returns.append(ro.rewards.sum(0).mean(-1).cpu().numpy())
        comm.append(ro.comm.flatten()[ro.alive.flatten()].cpu().numpy())
        done += n
    return {
        "success_rate": float(np.concatenate(success).mean()),
        "mean_steps": float(np.concatenate(steps).mean()),
        "mean_return": float(np.concatenate(returns).mean()),
        "comm_rate": float(np.concatenate(comm).mean()),
        "episodes": episodes,
    }
