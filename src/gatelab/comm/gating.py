"""The temporal gates' training schedule: warm-up, cost ramp or budget, temperature.

Used by :func:`gatelab.comm.train.train`; the estimators themselves are in
:mod:`gatelab.comm.ppo`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gatelab.comm.graph import comm_rate, gate_graph

if TYPE_CHECKING:
    from gatelab.comm.model import CommFormer
    from gatelab.comm.ppo import Rollout
    from gatelab.comm.train import TrainConfig


def gate_schedule(cfg: TrainConfig, update: int, budget_cost: float | None = None):
    """Whether update ``update`` samples temporal gates, and its communication-cost coefficient.

    For the first ``gate_warmup * updates`` updates every gate is open (the model runs as without
    gates and the gate gets no gradient), so the policy learns to use messages before listening
    costs anything. Then, with a fixed cost, it rises linearly from 0 to ``comm_cost`` over
    ``cost_ramp * updates`` updates (0: at once); with a ``comm_budget`` it is ``budget_cost``
    (:func:`next_budget_cost`, starting from ``comm_cost``).

    Returns:
        ``(gates_on, cost)``.
    """
    start = round(cfg.gate_warmup * cfg.updates)
    if update < start:
        return False, 0.0
    if cfg.comm_budget > 0:
        return True, cfg.comm_cost if budget_cost is None else budget_cost
    ramp = cfg.cost_ramp * cfg.updates
    scale = 1.0 if ramp <= 0 else min(1.0, (update - start + 1) / ramp)
    return True, cfg.comm_cost * scale


def gate_temperature(cfg: TrainConfig, update: int) -> float:
    """Training-gate temperature of update ``update`` (hybrid estimator).

    1 up to the end of the warm-up, then linearly to ``gate_temp_min`` at the last update
    (``gate_temp_min = 1``: always 1).
    """
    start = round(cfg.gate_warmup * cfg.updates)
    span = max(1, cfg.updates - 1 - start)
    return 1.0 - (1.0 - cfg.gate_temp_min) * min(1.0, max(0.0, (update - start) / span))


def next_budget_cost(cfg: TrainConfig, row: dict) -> float | None:
    r"""Dual ascent on the communication budget after an update's scalars ``row``.

    The cost is a Lagrange multiplier of the constraint "comm rate <= ``comm_budget``":
    :math:`\lambda \leftarrow \max(0, \lambda + \eta\,(r - b))` with :math:`r` the rate the
    *execution* (threshold) gates give on the rollout's states (``train/comm_rate_threshold``),
    :math:`\eta` = ``budget_lr``. The gate then decides *where* to stop listening, the multiplier
    only how much. ``None`` while the gates are still in their warm-up (or without a budget).
    """
    if cfg.comm_budget <= 0 or row["update"] <= round(cfg.gate_warmup * cfg.updates):
        return None
    excess = row["train/comm_rate_threshold"] - cfg.comm_budget
    return max(0.0, row["train/comm_cost"] + cfg.budget_lr * excess)


def threshold_rate(model: CommFormer, ro: Rollout, alive, cost: float, temp: float) -> dict:
    """Gated runs: the comm rate the threshold gates (p > 1/2) would give on the rollout's states.

    Execution uses the thresholded gates; with sampled training gates this is the closer signal.
    """
    if model.gate is None:
        return {}
    with torch.no_grad():
        det = (model.gate(ro.obs) > 0.5).to(ro.obs.dtype)  # (T, B, A)
        rate = comm_rate(gate_graph(ro.graph[None].to(det.dtype), det)).flatten()[alive]
    return {
        "train/comm_rate_threshold": float(rate.mean()),
        "train/comm_cost": cost,
        "train/gate_temp": temp,
    }
