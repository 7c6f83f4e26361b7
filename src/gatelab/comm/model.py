r"""CommFormer: a MAT-style encoder-decoder whose attention is masked by a learned graph.

Hu, Shen, Zhang, Tao, "Learning Multi-Agent Communication from Graph Modeling Perspective",
ICLR 2024 (arXiv:2405.08550); the decoder follows the Multi-Agent Transformer (Wen et al.,
arXiv:2205.14953). Reference code: github.com/charleshsc/CommFormer (read, not copied; its attention
quirks - transposed edge embeddings, scaling applied twice - are not repeated).

Graph-masked attention of receiver :math:`i` over senders :math:`j` (one block, ``n_heads`` heads,
head width :math:`d`):

.. math::
    \ell_{ij} = \frac{q_i^\top (k_j + e^K_{ij})}{\sqrt d},\qquad
    w_{ij} = \frac{G_{ij}\, e^{\ell_{ij}}}{\sum_{j'} G_{ij'}\, e^{\ell_{ij'}}},\qquad
    y_i = \sum_j w_{ij}\,(v_j + e^V_{ij})

with learned edge embeddings :math:`e_{ij}` (receiver ``i``, sender ``j``) and the graph ``G``
entering *multiplicatively*, so a hard 0 removes a sender exactly (its message cannot change the
receiver's output) while the straight-through gradient still reaches :math:`\alpha`.

Encoder: observation -> graph attention -> MLP -> per-agent value. Decoder, agent by agent
(autoregressive, as MAT): agent ``i`` attends over the *actions* of the agents ``j < i`` it listens
to (action messages, same graph), then over the encoder outputs it listens to, and outputs action
logits. Training uses teacher forcing on the stored actions in one pass; rollouts decode
``A`` times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from gatelab.comm.graph import GRAPH_KINDS, CommGraph, TemporalGate, gate_graph


@dataclass(frozen=True)
class CommConfig:
    """Architecture of :class:`CommFormer` (defaults: CommFormer's Predator-Prey setting)."""

    obs_dim: int  # per-agent observation width O (from the environment)
    n_actions: int  # discrete actions per agent (from the environment)
    n_agents: int  # A
    d_model: int = 64  # embedding width D (CommFormer: 64)
    n_heads: int = 1  # attention heads (CommFormer: 1)
    sparsity: float = 0.4  # S; k = max(1, round(S )) senders per receiver (paper: 0.4)
    graph: str = "learned"  # learned | random | full | none
    temporal_gate: bool = False  # per-agent listen gate (CommFormer extension)
    gumbel_tau: float = 1.0  # Gumbel top-k temperature
    alpha_init_std: float = 1.0  # symmetry-breaking init of the graph logits
    gate_init_bias: float = 1.0  # temporal gate starts mostly open (sigmoid(1) = 0.73)
    gate_hidden: int = 0  # temporal gate: 0 linear on the observation, h > 0 an MLP of width h
    graph_seed: int = 0  # seeds alpha's init and the fixed random graph

    def __post_init__(self) -> None:
        if self.n_agents < 2:
            raise ValueError(f"n_agents must be >= 2, got {self.n_agents}")
        if not 0.0 <= self.sparsity <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {self.sparsity}")
        if self.graph not in GRAPH_KINDS:
            raise ValueError(f"graph must be one of {GRAPH_KINDS}, got {self.graph!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")


class Output(NamedTuple):
    """Action logits ``(B, A, n_actions)`` and normalised values ``(B, A)``."""

    logits: torch.Tensor
    values: torch.Tensor


def graph_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    edge_k: torch.Tensor,
    edge_v: torch.Tensor,
    graph: torch.Tensor,
    self_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Attention of receivers over their senders, weighted by a 0/1 (straight-through) graph.

    ``self_kv`` (key and value ``(h, d)``) replaces each receiver's *own* key/value (the decoder's
    "no action yet" message); ``rows`` restricts the receivers (rollout decoding needs one).
    The edge terms are computed as ``q.e`` and ``sum_j w_ij e_ij`` so no ``(B, A, A, D)`` tensor
    is built.

    Shape:
        q ``(B, R, h, d)``; k, v ``(B, A, h, d)``; edge_k, edge_v ``(A, A, h, d)``;
        graph ``(B, A, A)``; rows ``(R,)`` (default all) -> ``(B, R, h, d)``.
    """
    n = k.shape[1]
    rows = torch.arange(n, device=q.device) if rows is None else rows
    edge_k, edge_v, graph = edge_k[rows], edge_v[rows], graph[:, rows]  # (R, A, h, d), (B, R, A)
    logits = torch.einsum("brhd,bjhd->bhrj", q, k)  # (B, h, R, A)
    logits = logits + torch.einsum("brhd,rjhd->bhrj", q, edge_k)
    own = F.one_hot(rows, n).to(q.dtype)  # (R, A): receiver's own column
    if self_kv is not None:
        k_self, v_self = self_kv  # (h, d)
        q_own = torch.einsum("brhd,hd->bhr", q, k_self)  # (B, h, R)
        q_k_own = torch.einsum("brhd,brhd->bhr", q, k[:, rows])
        logits = logits + own * (q_own - q_k_own)[..., None]
    logits = logits / math.sqrt(q.shape[-1])  # scaled once (the public code scaled twice)
    logits = logits - logits.amax(-1, keepdim=True).detach()
    weights = graph[:, None] * logits.exp()  # (B, h, R, A); the self edge keeps the sum > 0
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.einsum("bhrj,bjhd->brhd", weights, v)  # (B, R, h, d)
    out = out + torch.einsum("bhrj,rjhd->brhd", weights, edge_v)
    if self_kv is not None:
        w_own = torch.einsum("bhrj,rj->brh", weights, own)[..., None]  # (B, R, h, 1)
        out = out + w_own * (v_self - v[:, rows])
    return out


class GraphAttention(nn.Module):
    """One graph-masked attention sub-layer with its projections and edge embeddings."""

    def __init__(self, d_model: int, n_heads: int, n_agents: int) -> None:
        super().__init__()
        self.h, self.d = n_heads, d_model // n_heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.edge = nn.Parameter(torch.empty(2, n_agents, n_agents, n_heads, self.d))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Edge embeddings ~ N(0, 0.02^2) (small: they start as a mild per-edge bias)."""
        nn.init.normal_(self.edge, std=0.02)

    def forward(
        self,
        x: torch.Tensor,
        senders: torch.Tensor,
        graph: torch.Tensor,
        self_token: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Queries ``x (B, R, D)``, messages ``senders (B, A, D)`` -> ``(B, R, D)``."""
        q = self.q(x).unflatten(-1, (self.h, self.d))  # (B, R, h, d)
        k, v = self.kv(senders).unflatten(-1, (2, self.h, self.d)).unbind(-3)  # (B, A, h, d)
        self_kv = None
        if self_token is not None:
            self_kv = self.kv(self_token).unflatten(-1, (2, self.h, self.d)).unbind(0)
        y = graph_attention(q, k, v, self.edge[0], self.edge[1], graph, self_kv, rows)
        return self.out(y.flatten(-2))  # (B, R, D)


class Block(nn.Module):
    """Post-norm residual block: graph attention, then a 2-layer MLP."""

    def __init__(self, d_model: int, n_heads: int, n_agents: int) -> None:
        super().__init__()
        self.attn = GraphAttention(d_model, n_heads, n_agents)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, d_model)
        )

    def forward(self, x, senders, graph, self_token=None, rows=None) -> torch.Tensor:
        """``x (B, R, D)`` -> ``(B, R, D)`` (see :class:`GraphAttention`)."""
        x = self.norm1(x + self.attn(x, senders, graph, self_token, rows))
        return self.norm2(x + self.mlp(x))


class CommFormer(nn.Module):
    r"""Encoder-decoder actor-critic over ``A`` agents with a learned communication graph.

    Args:
        cfg: :class:`CommConfig`.

    Shape:
        obs ``(B, A, O)``, graph ``(B, A, A)``, listen ``(B, A)`` or None, actions ``(B, A)``
        -> :class:`Output` (logits ``(B, A, n_actions)``, values ``(B, A)``).

    Train/eval: none inside the module; the trainer samples graphs/gates (``graph.sample``,
    Bernoulli gates) for training rollouts and uses ``graph.execution()`` and ``p > 0.5`` for eval.
    """

    def __init__(self, cfg: CommConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, a = cfg.d_model, cfg.n_agents
        self.graph = CommGraph(
            a, cfg.sparsity, cfg.graph, cfg.gumbel_tau, cfg.alpha_init_std, cfg.graph_seed
        )
        if cfg.temporal_gate:
            self.gate = TemporalGate(cfg.obs_dim, cfg.gate_init_bias, cfg.gate_hidden)
        else:
            self.register_module("gate", None)
        self.obs_in = nn.Sequential(nn.LayerNorm(cfg.obs_dim), nn.Linear(cfg.obs_dim, d), nn.GELU())
        self.agent_id = nn.Parameter(torch.empty(a, d))
        self.encoder = Block(d, cfg.n_heads, a)
        self.value_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        self.action_in = nn.Embedding(cfg.n_actions + 1, d)  # last index: "no action (yet)"
        self.dec_self = Block(d, cfg.n_heads, a)
        self.dec_cross = Block(d, cfg.n_heads, a)
        self.policy_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, cfg.n_actions))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Agent-id embeddings ~ N(0, 0.02^2); last policy layer x0.01 (near-uniform start)."""
        nn.init.normal_(self.agent_id, std=0.02)
        with torch.no_grad():
            self.policy_head[-1].weight.mul_(0.01)
            self.policy_head[-1].bias.zero_()

    def encode(self, obs: torch.Tensor, graph: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states ``(B, A, D)`` and normalised values ``(B, A)``."""
        x = self.obs_in(obs) + self.agent_id  # (B, A, D)
        x = self.encoder(x, x, graph)
        return x, self.value_head(x).squeeze(-1)

    def decode(
        self,
        x: torch.Tensor,
        actions: torch.Tensor,
        graph: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Action logits ``(B, R, n_actions)`` of receivers ``rows`` (default all).

        Agent ``i`` sees the actions of the agents ``j < i`` it listens to, never its own, so
        ``actions (B, A)`` may hold anything (e.g. ``n_actions``) for agents not decoded yet.
        """
        a = graph.shape[-1]
        before = torch.tril(torch.ones(a, a, dtype=graph.dtype, device=graph.device), -1)
        eye = torch.eye(a, dtype=graph.dtype, device=graph.device)
        sent = self.action_in(actions.clamp_max(self.cfg.n_actions))  # (B, A, D)
        none = self.action_in.weight[self.cfg.n_actions]  # (D,) "no action" sent by self
        query = x if rows is None else x[:, rows]
        y = self.dec_self(query, sent, graph * before + eye, none, rows)  # action messages
        y = self.dec_cross(y, x, graph, None, rows)
        return self.policy_head(y)

    def forward(
        self,
        obs: torch.Tensor,
        graph: torch.Tensor,
        listen: torch.Tensor | None,
        actions: torch.Tensor,
    ) -> Output:
        """Teacher-forced pass: logits of every agent given the others' actions (``j < i``)."""
        graph = gate_graph(graph, listen)
        x, values = self.encode(obs, graph)
        return Output(self.decode(x, actions, graph), values)

    @torch.no_grad()
    def act(
        self,
        obs: torch.Tensor,
        graph: torch.Tensor,
        listen: torch.Tensor | None,
        generator: torch.Generator | None = None,
        greedy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode agent by agent: actions, log-probs and values, each ``(B, A)``."""
        graph = gate_graph(graph, listen)
        x, values = self.encode(obs, graph)
        b, a = obs.shape[:2]
        actions = torch.full((b, a), self.cfg.n_actions, dtype=torch.long, device=obs.device)
        logp = torch.zeros(b, a, dtype=obs.dtype, device=obs.device)
        for i in range(a):
            row = torch.tensor([i], device=obs.device)
            logits = F.log_softmax(self.decode(x, actions, graph, row)[:, 0], -1)  # (B, n_act)
            if greedy:
                choice = logits.argmax(-1)
            else:
                u = torch.rand(b, 1, generator=generator).to(obs.device)
                choice = (logits.exp().cumsum(-1) < u).sum(-1).clamp_max(self.cfg.n_actions - 1)
            actions[:, i] = choice
            logp[:, i] = logits.gather(-1, choice[:, None]).squeeze(-1)
        return actions, logp, values
