r"""Training the temporal gates: their schedule and the causal estimator's targets.

The schedule: warm-up, cost, temperature.

**Causal gates** (``GateConfig(comm_budget=b)``, after I2C: Ding, Huang, Lu, "Learning
Individually Inferred Communication for Multi-Agent Cooperation", NeurIPS 2020,
arXiv:2006.06455). The worth of agent :math:`i` listening at a step is the causal effect of the
messages on its policy,

.. math:: \Delta_i = \mathrm{KL}\big(\pi_\theta(\cdot \mid o, z_i = 1)\,\big\|\,
          \pi_\theta(\cdot \mid o, z_i = 0)\big),

the other agents' gates as the rollout drew them (:func:`causal_effect`; zero for an agent whose
action the environment ignores). The gate is a classifier of its own observation trained by binary
cross-entropy on :math:`y_i = 1[\Delta_i > q]`, :math:`q` the quantile that labels the budgeted
share :math:`s` of live agent-steps as "listen" (:func:`causal_labels`): the budget fixes *how
much* is heard, the causal effect *where*. A classifier thresholded at 1/2 listens more often than
its label share where the labels are uncertain, so :math:`s` starts at budget / ungated rate and
follows :math:`s \leftarrow \mathrm{clip}(s - \eta\,(r - b), 0.01, 1)` after each update
(:func:`next_label_share`; :math:`r` the execution gates' comm rate, :math:`\eta` = ``budget_lr``).

The gate gets no policy-gradient or straight-through signal; the policy trains by PPO on the
stored gates, so ratios stay exact.

Used by :func:`gatelab.comm.train.train`; the straight-through gate is in :mod:`gatelab.comm.ppo`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from gatelab.comm.config import Estimator, TrainConfig
from gatelab.comm.graph import comm_rate, gate_graph

if TYPE_CHECKING:  # annotations only; neither module imports this one
    from gatelab.comm.model import CommFormer
    from gatelab.comm.ppo import Rollout


def gated_from(cfg: TrainConfig) -> int:
    """The first update whose rollout samples temporal gates (``gate.warmup * updates``)."""
    return round(cfg.gate.warmup * cfg.ppo.updates)


def gate_schedule(cfg: TrainConfig, update: int) -> tuple[bool, float]:
    """Whether update ``update`` samples temporal gates, and its communication-cost coefficient.

    For the first ``gate.warmup * updates`` updates every gate is open (the model runs as without
    gates and the gate gets no gradient), so the policy learns to use messages before listening
    costs anything; then the cost is ``gate.comm_cost`` (the straight-through gate's; 0 for the
    causal one, which meets its budget through the label share).
    """
    if update < gated_from(cfg):
        return False, 0.0
    return True, cfg.gate.comm_cost


def gate_temperature(cfg: TrainConfig, update: int) -> float:
    """Training-gate temperature of update ``update`` (causal estimator).

    1 up to the end of the warm-up, then linearly to ``gate.temp_min`` at the last update
    (``temp_min = 1``: always 1).
    """
    start = gated_from(cfg)
    span = max(1, cfg.ppo.updates - 1 - start)
    return 1.0 - (1.0 - cfg.gate.temp_min) * min(1.0, max(0.0, (update - start) / span))


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


@torch.no_grad()
def causal_effect(model: CommFormer, ro: Rollout) -> torch.Tensor:
    """Delta_i: KL of agent ``i``'s policy listening vs not, per step ``(T, B, A)``.

    Teacher-forced on the rollout's actions and graph; the other agents keep the rollout's gates.
    The factual side is the rollout policy's own distribution (``ro.log_probs``: the update has
    not changed the model yet) and one pass of :meth:`CommFormer.flipped_logits` (each agent's
    own gate flipped) gives the other side for every agent. Zero where the agent's action is
    ignored (``ro.acting``) or the episode is over.
    """
    if ro.listen is None:
        raise ValueError("causal_effect needs a rollout with temporal gates")
    t, b, a = ro.actions.shape
    rows = ro.alive.flatten()  # (T*B,): only the steps of running episodes
    obs, actions = ro.obs.flatten(0, 1)[rows], ro.actions.flatten(0, 1)[rows]
    graph = ro.graph[None].expand(t, -1, -1, -1).flatten(0, 1)[rows]  # (N, A, A)
    listen = ro.listen.flatten(0, 1)[rows]  # (N, A)
    factual = ro.log_probs.flatten(0, 1)[rows]  # (N, A, n_act)
    flipped = F.log_softmax(model.flipped_logits(obs, graph, listen, actions), -1)
    heard = listen.bool()[..., None]
    on, off = torch.where(heard, factual, flipped), torch.where(heard, flipped, factual)
    effect = torch.zeros(t * b, a, dtype=obs.dtype, device=obs.device)
    effect[rows] = (on.exp() * (on - off)).sum(-1)  # KL(pi(.|z_i = 1) || pi(.|z_i = 0))
    return effect.unflatten(0, (t, b)).clamp_min(0.0) * ro.acting


def causal_labels(effect: torch.Tensor, live: torch.Tensor, share: float) -> torch.Tensor:
    """0/1 listen targets: 1 where ``effect`` is among the largest ``share`` of ``live`` entries.

    ``y = 1[effect > q]``, ``q`` the ``1 - share`` quantile of ``effect[live]`` (ties at ``q``,
    e.g. the zeros of ignored agents, get 0). Shapes: effect, live ``(...)`` -> ``(...)``.
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"listen share must be in (0, 1], got {share}")
    values = effect[live]
    if values.numel() == 0:
        return torch.zeros_like(effect)
    threshold = torch.quantile(values.double(), 1.0 - share).to(effect.dtype)
    return (effect > threshold).to(effect.dtype)


def next_label_share(cfg: TrainConfig, update: int, row: dict) -> float | None:
    """The label share after update ``update`` (its scalars ``row``; module docstring).

    ``None`` while the gates are still in their warm-up (then :func:`listen_share` starts it).
    """
    if update < gated_from(cfg):
        return None
    excess = row["train/comm_rate_threshold"] - cfg.gate.comm_budget
    return min(1.0, max(0.01, row["train/share"] - cfg.gate.budget_lr * excess))


def listen_share(cfg: TrainConfig, ro: Rollout) -> float:
    """The share of agent-steps the budget lets listen: ``comm_budget`` / the ungated comm rate."""
    ungated = float(comm_rate(ro.graph).mean())
    return 1.0 if ungated <= 0 else min(1.0, cfg.gate.comm_budget / ungated)


def uses_causal(cfg: TrainConfig) -> bool:
    """Whether the run trains temporal gates with the causal estimator."""
    return cfg.model.temporal_gate and cfg.gate.kind is Estimator.causal


def causal_targets(
    cfg: TrainConfig, model: CommFormer, ro: Rollout, share: float | None
) -> tuple[torch.Tensor | None, dict]:
    """The causal gate's labels ``(T*B, A)`` for a rollout, and their scalars.

    ``share``: the current label share (``None``: start from :func:`listen_share`). The
    straight-through estimator: ``(None, {})``; the warm-up (no gates): share 1, effect 0.
    """
    if not uses_causal(cfg):
        return None, {}
    if ro.listen is None:
        return None, {"train/causal_effect": 0.0, "train/share": 1.0}
    live = ro.alive[..., None].expand_as(ro.listen)
    effect = causal_effect(model, ro)
    share = listen_share(cfg, ro) if share is None else share
    labels = causal_labels(effect, live, share).flatten(0, 1)
    return labels, {"train/causal_effect": float(effect[live].mean()), "train/share": share}
