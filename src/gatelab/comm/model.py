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
``A`` times, reusing the keys and values that do not change between agents.

Speed (benchmarks/README.md): the action messages' keys and values are a lookup in a table of
``n_actions + 1`` rows (a linear map of an embedding is the embedding of the linear map), and each
receiver's own "no action yet" message enters as a replaced diagonal rather than as extra tensors.
"""

from __future__ import annotations

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
        for name in ("obs_dim", "n_actions", "d_model", "n_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
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


class Decision(NamedTuple):
    """What :meth:`CommFormer.act` decided, each ``(B, A)`` but ``log_probs``."""

    actions: torch.Tensor  # long
    logp: torch.Tensor  # log-probability of each chosen action
    values: torch.Tensor  # normalised values
    log_probs: torch.Tensor  # (B, A, n_actions): each agent's whole log-distribution


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

    ``self_kv`` (key and value, ``(h, d)`` shared or ``(B, R, h, d)`` per receiver) replaces each
    receiver's *own* key/value (the decoder's "no action yet" message; a counterfactual own
    state); ``rows`` restricts the receivers (rollout decoding needs one). The edge terms are
    computed as ``q.e`` and ``sum_j w_ij e_ij`` so no ``(B, R, A, D)`` tensor is built.

    Shape:
        q ``(B, R, h, d)``; k, v ``(B, A, h, d)``; edge_k, edge_v ``(A, A, h, d)``;
        graph ``(B, A, A)``; rows ``(R,)`` (default all) -> ``(B, R, h, d)``.
    """
    n = k.shape[1]
    if rows is not None:
        edge_k, edge_v, graph = (
            edge_k[rows],
            edge_v[rows],
            graph[:, rows],
        )  # (R, A, h, d), (B, R, A)
    qh = q.transpose(1, 2)  # (B, h, R, d)
    logits = qh @ k.permute(0, 2, 3, 1)  # (B, h, R, A): one small matmul per sample
    edge_logits = (q.permute(1, 2, 0, 3) @ edge_k.permute(0, 2, 3, 1)).permute(2, 1, 0, 3)
    logits = logits + edge_logits  # (B, h, R, A); the edge term: one matmul per receiver
    own = None
    if self_kv is not None:
        k_self, v_self = self_kv
        r_index = torch.arange(n, device=q.device) if rows is None else rows
        own = F.one_hot(r_index, n).bool()  # (R, A): each receiver's own column
        if k_self.dim() == 2:  # shared (h, d)
            self_logits = torch.einsum("brhd,hd->brh", q, k_self)
            v_self = v_self[:, None, :]  # (h, 1, d)
        else:  # per receiver (B, R, h, d)
            self_logits = (q * k_self).sum(-1)  # (B, R, h)
            v_self = v_self.transpose(1, 2)  # (B, h, R, d)
        logits = torch.where(own, edge_logits + self_logits.transpose(1, 2)[..., None], logits)
    logits = logits * q.shape[-1] ** -0.5  # scaled once (the public code scaled twice)
    logits = logits - logits.amax(-1, keepdim=True).detach()
    weights = graph[:, None] * logits.exp()  # (B, h, R, A); the self edge keeps the sum > 0
    weights = weights / weights.sum(-1, keepdim=True)
    senders = weights if own is None else weights.masked_fill(own, 0.0)
    out = senders @ v.transpose(1, 2)  # (B, h, R, d)
    out = out + (weights.permute(2, 1, 0, 3) @ edge_v.permute(0, 2, 1, 3)).permute(2, 1, 0, 3)
    if own is not None:
        out = out + (weights * own).sum(-1, keepdim=True) * v_self
    return out.transpose(1, 2)  # (B, R, h, d)


def attend_one(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    edge_k: torch.Tensor,
    edge_v: torch.Tensor,
    graph: torch.Tensor,
) -> torch.Tensor:
    """:func:`graph_attention` of one receiver ``i`` (rollout decoding), with fewer, smaller ops.

    ``edge_k``/``edge_v`` are receiver ``i``'s edges ``e_{i.}`` and ``graph`` its row; the
    receiver's own key and value are whatever ``k``/``v`` hold at column ``i``.

    Shape:
        q ``(B, h, d)``; k, v ``(B, A, h, d)``; edge_k, edge_v ``(A, h, d)``; graph ``(B, A)``
        -> ``(B, h, d)``.
    """
    logits = ((k + edge_k) * q[:, None]).sum(-1) * q.shape[-1] ** -0.5  # (B, A, h)
    logits = logits - logits.amax(1, keepdim=True)
    weights = graph[..., None] * logits.exp()
    weights = weights / weights.sum(1, keepdim=True)  # (B, A, h)
    return (weights[..., None] * (v + edge_v)).sum(1)  # (B, h, d)


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

    def keys_values(self, senders: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(..., h, d)`` of ``senders (..., D)``, each contiguous."""
        d_model = self.h * self.d
        w, b = self.kv.weight, self.kv.bias
        k = F.linear(senders, w[:d_model], b[:d_model])
        v = F.linear(senders, w[d_model:], b[d_model:])
        return k.unflatten(-1, (self.h, self.d)), v.unflatten(-1, (self.h, self.d))

    def forward(
        self,
        x: torch.Tensor,
        keys: tuple[torch.Tensor, torch.Tensor],
        graph: torch.Tensor,
        self_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Queries ``x (B, R, D)``, senders' ``keys`` (:meth:`keys_values`) -> ``(B, R, D)``."""
        q = self.q(x).unflatten(-1, (self.h, self.d))  # (B, R, h, d)
        y = graph_attention(q, *keys, self.edge[0], self.edge[1], graph, self_kv, rows)
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

    def forward(self, x, keys, graph, self_kv=None, rows=None) -> torch.Tensor:
        """``x (B, R, D)`` -> ``(B, R, D)`` (see :class:`GraphAttention`)."""
        x = self.norm1(x + self.attn(x, keys, graph, self_kv, rows))
        return self.norm2(x + self.mlp(x))

    def one(self, x: torch.Tensor, keys, graph: torch.Tensor, receiver: int) -> torch.Tensor:
        """One receiver's block (:func:`attend_one`): ``x (B, D)``, its graph row ``(B, A)``."""
        attn = self.attn
        q = attn.q(x).unflatten(-1, (attn.h, attn.d))  # (B, h, d)
        edge_k, edge_v = attn.edge[:, receiver]  # (A, h, d) each
        y = attend_one(q, *keys, edge_k, edge_v, graph)
        x = self.norm1(x + attn.out(y.flatten(-2)))
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
        x = self.encoder(x, self.encoder.attn.keys_values(x), graph)
        return x, self.value_head(x).squeeze(-1)

    def _action_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(n_actions + 1, h * d)`` of every action message (last: none)."""
        k, v = self.dec_self.attn.keys_values(self.action_in.weight)
        return k.flatten(-2), v.flatten(-2)

    def _action_keys(self, tables, actions: torch.Tensor):
        """Keys and values ``(B, A, h, d)`` of the messages ``actions (B, A)``; and none's."""
        attn = self.dec_self.attn
        k_table, v_table = tables
        sent = actions.clamp_max(self.cfg.n_actions)
        keys = (F.embedding(sent, k_table), F.embedding(sent, v_table))  # (B, A, h*d)
        keys = tuple(t.unflatten(-1, (attn.h, attn.d)) for t in keys)
        none = tuple(t[self.cfg.n_actions].unflatten(-1, (attn.h, attn.d)) for t in tables)
        return keys, none  # "no action" is what a receiver sends itself

    def _self_graph(self, graph: torch.Tensor) -> torch.Tensor:
        """The action messages' graph: the senders ``j < i`` a receiver listens to, and itself."""
        a = graph.shape[-1]
        before = torch.tril(torch.ones(a, a, dtype=graph.dtype, device=graph.device), -1)
        eye = torch.eye(a, dtype=graph.dtype, device=graph.device)
        return graph * before + eye

    def decode(
        self,
        x: torch.Tensor,
        actions: torch.Tensor,
        graph: torch.Tensor,
        rows: torch.Tensor | None = None,
        x_keys: tuple[torch.Tensor, torch.Tensor] | None = None,
        tables: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Action logits ``(B, R, n_actions)`` of receivers ``rows`` (default all).

        Agent ``i`` sees the actions of the agents ``j < i`` it listens to, never its own, so
        ``actions (B, A)`` may hold anything (e.g. ``n_actions``) for agents not decoded yet.
        ``x_keys``/``tables``: the keys of ``x`` and the action tables, if already computed.
        """
        keys, none = self._action_keys(tables or self._action_tables(), actions)
        query = x if rows is None else x[:, rows]
        y = self.dec_self(query, keys, self._self_graph(graph), none, rows)  # action messages
        x_keys = x_keys or self.dec_cross.attn.keys_values(x)
        y = self.dec_cross(y, x_keys, graph, None, rows)
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
    def flipped_logits(
        self, obs: torch.Tensor, graph: torch.Tensor, listen: torch.Tensor, actions: torch.Tensor
    ) -> torch.Tensor:
        r"""Teacher-forced logits ``(B, A, n_actions)``, agent ``i``'s with *its own* gate flipped.

        Row ``i`` equals ``forward(obs, graph, listen', actions).logits[:, i]`` with
        :math:`z'_i = 1 - z_i` and the others' gates as given, for every ``i`` in one pass: a
        gate changes only its receiver's row of the graph, so the flipped encoder state of
        agent ``i`` is row ``i`` of the encoder under all gates flipped, and in the decoder's
        cross-attention it replaces agent ``i``'s own state among the factual others'.
        """
        factual, flipped = gate_graph(graph, listen), gate_graph(graph, 1.0 - listen)
        h = self.obs_in(obs) + self.agent_id  # (B, A, D)
        h_keys = self.encoder.attn.keys_values(h)
        x = self.encoder(h, h_keys, factual)  # (B, A, D)
        x_flip = self.encoder(h, h_keys, flipped)  # row i: agent i's state, its gate flipped
        tables = self._action_tables()
        keys, none = self._action_keys(tables, actions)
        y = self.dec_self(x_flip, keys, self._self_graph(flipped), none)
        own = self.dec_cross.attn.keys_values(x_flip)  # (B, A, h, d): each receiver's own
        y = self.dec_cross(y, self.dec_cross.attn.keys_values(x), flipped, own)
        return self.policy_head(y)

    @torch.no_grad()
    def act(
        self,
        obs: torch.Tensor,
        graph: torch.Tensor,
        listen: torch.Tensor | None,
        generator: torch.Generator | None = None,
        greedy: bool = False,
    ) -> Decision:
        """Decode agent by agent: a :class:`Decision` (actions, their log-probs, values, ...).

        The encoder states, their keys and the action tables are computed once; agent ``i``'s
        own action message is "no action" because it is not decoded yet.
        """
        graph = gate_graph(graph, listen)
        x, values = self.encode(obs, graph)
        cross_keys = self.dec_cross.attn.keys_values(x)
        tables, self_graph = self._action_tables(), self._self_graph(graph)
        b, a = obs.shape[:2]
        actions = torch.full((b, a), self.cfg.n_actions, dtype=torch.long, device=obs.device)
        log_probs = torch.zeros(b, a, self.cfg.n_actions, dtype=obs.dtype, device=obs.device)
        for i in range(a):
            sent, _ = self._action_keys(tables, actions)
            y = self.dec_self.one(x[:, i], sent, self_graph[:, i], i)
            y = self.dec_cross.one(y, cross_keys, graph[:, i], i)
            logits = F.log_softmax(self.policy_head(y), -1)  # (B, n_actions)
            if greedy:
                choice = logits.argmax(-1)
            else:
                u = torch.rand(b, 1, generator=generator).to(obs.device)
                choice = (logits.exp().cumsum(-1) < u).sum(-1).clamp_max(self.cfg.n_actions - 1)
            actions[:, i] = choice
            log_probs[:, i] = logits
        logp = log_probs.gather(-1, actions[..., None]).squeeze(-1)
        return Decision(actions, logp, values, log_probs)
