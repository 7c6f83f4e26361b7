r"""MAPPO pieces: rollout collection, GAE, value normalisation and the clipped PPO loss.

Yu et al., "The Surprising Effectiveness of PPO in Cooperative Multi-Agent Games",
arXiv:2103.01955 (GAE, clipping, value normalisation, entropy bonus, minibatches).

A rollout is one batch of ``B`` episodes of at most ``T = episode_limit`` steps, all started
together (see :mod:`gatelab.comm.envs.base`); steps after an episode ended are masked (``alive``).
The graph (one per episode) and the temporal gates (one per agent and step) that the rollout used
are stored with it, so the update recomputes log-probabilities under *exactly* the same
communication (the public CommFormer code recomputed them with fresh draws).

**Training the temporal gate.** Agent :math:`i` at step :math:`t` draws :math:`z_i \sim
\text{Bernoulli}(p_i)`, :math:`p_i = \sigma(\ell_i)`, then its action :math:`a_i \sim
\pi_\theta(\cdot \mid o, z)`. The straight-through estimator (``GateConfig(estimator="st")``,
the paper's): the stored :math:`z` enters the forward pass as :math:`z + p - \text{sg}(p)`, so the
gate gets :math:`\partial L / \partial z` as if it were :math:`\partial L / \partial p`, and the
loss adds :math:`c \cdot` (communication rate of the straight-through gated graph). Biased (the
surrogate is not a function of :math:`p`), and the cost's gradient falls on every gate alike
whether or not the messages mattered; the causal estimator (:mod:`gatelab.comm.gating`) trains
the gate outside PPO instead, and the policy then reads the stored gates as constants.
Execution uses :math:`z_i = 1[p_i > 1/2]`. Training gates may be drawn at a temperature
:math:`T \le 1`, :math:`z_i \sim \text{Bernoulli}(\sigma(\ell_i / T))` (causal estimator), so
that :math:`T \to 0` makes them the execution gates.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gatelab.comm.envs.base import VecEnv
from gatelab.comm.graph import comm_rate, gate_graph
from gatelab.comm.model import CommFormer, Decision


class Rollout(NamedTuple):
    """One batch of episodes. ``T`` steps, ``B`` environments, ``A`` agents."""

    obs: torch.Tensor  # (T, B, A, O)
    actions: torch.Tensor  # (T, B, A) long
    logp: torch.Tensor  # (T, B, A) log-probabilities under the rollout policy
    values: torch.Tensor  # (T, B, A) normalised value predictions
    rewards: torch.Tensor  # (T, B, A)
    alive: torch.Tensor  # (T, B) bool: the episode was running before step t
    acting: torch.Tensor  # (T, B, A) bool: the agent's action can change the environment
    done: torch.Tensor  # (T, B) bool: the episode was over after step t
    listen: torch.Tensor | None  # (T, B, A) 0/1 temporal gates, or None
    graph: torch.Tensor  # (B, A, A) graph each episode used
    graph_seed: int  # seed of the Gumbel draw that made ``graph`` (learned graphs)
    graph_noise: float  # Gumbel noise scale of that draw
    comm: torch.Tensor  # (T, B) communication rate per step
    success: np.ndarray  # (B,)
    steps: np.ndarray  # (B,) episode lengths
    log_probs: torch.Tensor  # (T, B, A, n_actions) the rollout policy's log-distributions


class ValueNorm(nn.Module):
    """Running mean/variance of value targets (MAPPO's value normalisation), merged exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("var", torch.ones((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge the batch ``x`` into the running statistics (Chan et al. parallel formula)."""
        x = x.double().flatten()
        n, mean, var = x.numel(), x.mean(), x.var(unbiased=False)
        total = self.count + n
        delta = mean - self.mean
        m2 = self.var * self.count + var * n + delta.square() * self.count * n / total
        self.mean.copy_(self.mean + delta * n / total)
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return ((x - self.mean) / self.var.clamp_min(1e-8).sqrt()).to(x.dtype)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return (x * self.var.clamp_min(1e-8).sqrt() + self.mean).to(x.dtype)


def listen_gates(
    model: CommFormer,
    obs: torch.Tensor,
    training: bool,
    generator: torch.Generator | None,
    noise: float = 1.0,
    temp: float = 1.0,
) -> torch.Tensor | None:
    """Temporal gates ``(B, A)``: ``1[0.5 + noise (u - 0.5) < p]``, ``u ~ U(0, 1)``, in training.

    ``noise = 1``: Bernoulli(p); ``noise = 0`` (and evaluation): the threshold ``p > 0.5``.
    In training ``p = sigmoid(logit / temp)`` (tempered gates, :mod:`gatelab.comm.gating`).
    """
    if model.gate is None:
        return None
    with torch.no_grad():
        p = torch.sigmoid(model.gate.logits(obs) / temp) if training else model.gate(obs)
    if not training:
        return (p > 0.5).to(obs.dtype)
    u = torch.rand(p.shape, generator=generator).to(p.device)
    return (0.5 + noise * (u - 0.5) < p).to(obs.dtype)


def with_memory(
    obs: torch.Tensor,
    previous: torch.Tensor | None,
    n_actions: int,
    listened: torch.Tensor | None = None,
    gated: bool = False,
) -> torch.Tensor:
    """Append each agent's previous action as a one-hot: ``(B, A, O)`` -> ``(B, A, O + n_actions)``.

    The policy is otherwise memoryless; this one-step memory lets an agent keep a heading it took
    on the strength of earlier messages. ``previous (B, A)`` or None (first step: zeros).
    ``gated`` (a model with temporal gates): one more column, whether the agent listened at the
    previous step (``listened (B, A)``; ``None`` with a ``previous``: gates open, 1), so a gate
    can also pace its listening (e.g. skip the step after one it listened at).
    """
    memory = torch.zeros(*obs.shape[:-1], n_actions, dtype=obs.dtype, device=obs.device)
    if previous is not None:
        memory = F.one_hot(previous, n_actions).to(obs.dtype)
    parts = [obs, memory]
    if gated:
        heard = torch.zeros(*obs.shape[:-1], 1, dtype=obs.dtype, device=obs.device)
        if previous is not None:
            heard = torch.ones_like(heard) if listened is None else listened[..., None]
        parts.append(heard.to(obs.dtype))
    return torch.cat(parts, -1)


@torch.no_grad()
def collect(
    model: CommFormer,
    env: VecEnv,
    env_seed: int,
    graph_seed: int,
    generator: torch.Generator,
    training: bool = True,
    greedy: bool = False,
    graph_noise: float = 1.0,
    gate_noise: float = 1.0,
    gates: bool = True,
    gate_temp: float = 1.0,
    memory: bool = False,
) -> Rollout:
    """Run one batch of episodes; ``training`` samples graph and gates, else deterministic ones.

    ``graph_noise`` scales the Gumbel noise of the training graph (:meth:`CommGraph.sample`),
    ``gate_noise`` that of the temporal gates (:func:`listen_gates`); ``gates=False`` opens every
    temporal gate (the rollout stores no gates, as for a model without them).
    ``gate_temp``: the training gates' temperature. ``memory``: each agent's observation ends
    with the one-hot of its own previous action (zeros at the first step) and, for a gated model,
    whether it listened at the previous step, stored with the
    rollout, so the recomputed log-probs see exactly what the rollout saw (:func:`with_memory`).
    An agent is *acting* at a step unless the environment ignores its action
    (``env.acting()``, e.g. a predator already on the prey; environments without it: all act).
    Only the episodes still running are computed (finished ones hold zeros, masked by
    ``alive``): late in training most of a batch's episodes are over long before the last one.
    """
    device = next(model.parameters()).device
    obs = torch.as_tensor(env.reset(env_seed), device=device)
    b, a, t_max = env.n_envs, env.n_agents, env.episode_limit
    gated = model.gate is not None
    if memory:
        obs = with_memory(obs, None, env.n_actions, None, gated)
    if training:
        graph = model.graph.sample(b, graph_seed, graph_noise).to(device)
    else:
        graph = model.graph.execution().to(device).expand(b, -1, -1).clone()
    keys = ("obs", "act", "logp", "log_probs", "val", "rew", "alive", "done", "listen", "comm")
    buf: dict[str, list] = {k: [] for k in keys}
    acting_fn = getattr(env, "acting", None)
    alive = torch.ones(b, dtype=torch.bool, device=device)
    steps = np.zeros(b, dtype=np.int64)
    temp = gate_temp if training else 1.0
    for _ in range(t_max):
        run = None if alive.all() else torch.nonzero(alive).squeeze(-1)  # running episodes
        live_obs = obs if run is None else obs[run]
        live_graph = graph if run is None else graph[run]
        drawn = (
            listen_gates(model, live_obs, training, generator, gate_noise, temp) if gates else None
        )
        decision = model.act(live_obs, live_graph, drawn, generator, greedy)
        listen = drawn
        if run is not None:  # finished episodes: action 0 (ignored), gates open, zeros elsewhere
            decision = Decision(*(_scatter(x, run, b) for x in decision))
            listen = None if drawn is None else _scatter(drawn, run, b, fill=1.0)
        acts = np.ones((b, a), dtype=bool) if acting_fn is None else acting_fn()
        step = env.step(decision.actions.cpu().numpy())
        for key, value in zip(keys, (obs, *decision[:2], decision.log_probs, decision.values),
                              strict=False):  # fmt: skip
            buf[key].append(value)
        buf["rew"].append(torch.as_tensor(step.reward, device=device))
        buf["alive"].append(alive)
        buf["done"].append(torch.as_tensor(step.done, device=device))
        buf["listen"].append(listen)
        buf["comm"].append(comm_rate(gate_graph(graph, listen)))
        buf.setdefault("acting", []).append(torch.as_tensor(acts, device=device))
        steps += alive.cpu().numpy()
        alive = ~buf["done"][-1]
        obs = torch.as_tensor(step.obs, device=device)
        if memory:
            obs = with_memory(obs, decision.actions, env.n_actions, listen, gated)
        if not alive.any():
            break
    stack = {k: torch.stack(v) for k, v in buf.items() if k != "listen"}
    return Rollout(
        stack["obs"],
        stack["act"],
        stack["logp"],
        stack["val"],
        stack["rew"],
        stack["alive"],
        stack["acting"],
        stack["done"],
        None if buf["listen"][0] is None else torch.stack(buf["listen"]),
        graph,
        graph_seed,
        graph_noise if training else 0.0,
        stack["comm"],
        step.success.copy(),
        steps,
        stack["log_probs"],
    )


def _scatter(x: torch.Tensor, rows: torch.Tensor, n: int, fill: float = 0.0) -> torch.Tensor:
    """``x`` of the running episodes ``rows`` back into a batch of ``n`` (``fill`` elsewhere)."""
    out = torch.full((n, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
    return out.index_copy(0, rows, x)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, done: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Generalised advantage estimation; the end of an episode (success or limit) is terminal.

    .. math:: \delta_t = r_t + \gamma (1-d_t) V_{t+1} - V_t,\quad
              \hat A_t = \delta_t + \gamma\lambda (1-d_t) \hat A_{t+1}

    Shape:
        rewards, values ``(T, B, A)`` (values denormalised), done ``(T, B)`` -> advantages,
        returns ``(T, B, A)``.
    """
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        nonterminal = (~done[t]).to(rewards.dtype)[:, None]  # (B, 1)
        next_value = values[t + 1] if t + 1 < rewards.shape[0] else torch.zeros_like(values[0])
        delta = rewards[t] + gamma * nonterminal * next_value - values[t]
        last = delta + gamma * lam * nonterminal * last
        adv[t] = last
    return adv, adv + values


class Batch(NamedTuple):
    """A minibatch of ``M`` joint samples (one time step of one environment, all agents)."""

    obs: torch.Tensor  # (M, A, O)
    actions: torch.Tensor  # (M, A)
    logp: torch.Tensor  # (M, A)
    adv: torch.Tensor  # (M, A)
    targets: torch.Tensor  # (M, A) normalised returns
    listen: torch.Tensor | None  # (M, A)
    acting: torch.Tensor  # (M, A) bool: policy loss and entropy count only acting agents
    env_index: torch.Tensor  # (M,) which episode (graph) each sample belongs to


class LossParts(NamedTuple):
    """Unweighted PPO loss terms and diagnostics (scalars)."""

    policy: torch.Tensor
    value: torch.Tensor
    entropy: torch.Tensor
    comm: torch.Tensor
    approx_kl: torch.Tensor
    clipfrac: torch.Tensor


def ppo_losses(
    model: CommFormer,
    batch: Batch,
    graph: torch.Tensor,
    clip: float,
    straight_through: bool = True,
) -> LossParts:
    """Clipped surrogate, value MSE, entropy and differentiable communication rate.

    The surrogate and the entropy average over *acting* agents only: an action the environment
    ignores (a predator frozen on the prey) has no effect on the return, so its gradient is noise.
    The value loss covers every agent.

    ``graph (M, A, A)`` is the stored graph of each sample, possibly re-attached to alpha's
    gradient (:meth:`CommGraph.relax`); the stored gates get a straight-through path to the gate.
    ``straight_through=False``: the stored gates enter as constants (the causal estimator trains
    the gate by its own loss, :mod:`gatelab.comm.gating`).
    """
    listen = batch.listen
    if listen is not None and straight_through:
        p = torch.sigmoid(model.gate.logits(batch.obs))  # (M, A)
        listen = listen + (p - p.detach())  # value: the stored gates; gradient: straight-through
    out = model(batch.obs, graph, listen, batch.actions)
    logp_all = torch.log_softmax(out.logits, -1)  # (M, A, n_actions)
    logp = logp_all.gather(-1, batch.actions[..., None]).squeeze(-1)  # (M, A)
    log_ratio = logp - batch.logp
    ratio = log_ratio.exp()
    surrogate = torch.minimum(ratio * batch.adv, ratio.clamp(1 - clip, 1 + clip) * batch.adv)
    weight = batch.acting.to(logp.dtype)
    weight = weight / weight.sum().clamp_min(1.0)
    entropy = (-(logp_all.exp() * logp_all).sum(-1) * weight).sum()
    return LossParts(
        -(surrogate * weight).sum(),
        (out.values - batch.targets).square().mean(),
        entropy,
        comm_rate(gate_graph(graph, listen)).mean(),
        ((ratio - 1) - log_ratio).mean().detach(),
        ((ratio - 1).abs() > clip).float().mean().detach(),
    )


def recompute_logp(model: CommFormer, rollout: Rollout, relax: bool = True) -> torch.Tensor:
    """Log-probs ``(T, B, A)`` of the rollout's actions under ``model`` with the stored graph/gates.

    With ``relax`` the graph is re-attached to alpha's gradient exactly as the update does.
    """
    t, b = rollout.actions.shape[:2]
    graph = rollout.graph
    if relax:
        graph = model.graph.relax(rollout.graph, rollout.graph_seed, rollout.graph_noise)
    graph = graph[None].expand(t, -1, -1, -1).flatten(0, 1)  # (T*B, A, A)
    listen = None if rollout.listen is None else rollout.listen.flatten(0, 1)
    if listen is not None:
        p = model.gate(rollout.obs.flatten(0, 1))
        listen = listen + (p - p.detach())
    actions = rollout.actions.flatten(0, 1)
    out = model(rollout.obs.flatten(0, 1), graph, listen, actions)
    logp = torch.log_softmax(out.logits, -1).gather(-1, actions[..., None]).squeeze(-1)
    return logp.unflatten(0, (t, b))
