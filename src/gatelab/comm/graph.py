r"""The communication graph and the temporal gate of CommFormer.

**Graph.** Learnable logits :math:`\alpha \in \mathbb R^{A\times A}` (row = receiver, column =
sender). Receiver :math:`i` keeps its top-``k`` senders among the *other* agents,

.. math:: k = \max(1, \lfloor S\,(A-1) + \tfrac12 \rfloor),

and always hears itself besides (the public CommFormer code let an agent pick itself and
hear nobody). Training samples the graph with Gumbel top-k (straight-through,
:func:`gatelab.gates.gumbel_topk`); execution uses the deterministic top-k of :math:`\alpha`
(:func:`gatelab.gates.select_topk`). The sample a rollout used is stored; the update re-attaches the
gradient of the *same* Gumbel draw to the stored hard graph (:meth:`CommGraph.relax`), so the
forward value is exactly the rollout's graph (no PPO ratio mismatch) while
:math:`\alpha` still gets the straight-through gradient.

**Noise scale** (train/execution match, gatelab's addition): the draw is
:math:`\operatorname{top}_k(\alpha + s\,g)` with Gumbel noise :math:`g` scaled by :math:`s \in [0,
1]` (:math:`s = 1`: exactly :func:`gatelab.gates.gumbel_topk`). The trainer anneals :math:`s` to 0,
after which the rollouts use the execution graph itself and :math:`\alpha` still gets the
straight-through gradient of the successive-softmax relaxation of :math:`\alpha / \tau`. Without
it the policy only ever trains on noisy graphs but is evaluated on the one deterministic graph.

The logits start as :math:`\mathcal N(0, \sigma^2)` (symmetry breaking).

**Temporal gate** (CommFormer extension, reconstructed [R]): agent :math:`i` computes
:math:`p_i = \sigma(f(o_i))` from its own observation (:math:`f` linear, or a one-hidden-layer MLP)
and receives messages this step iff :math:`z_i = 1` (:math:`z_i \sim \text{Bernoulli}(p_i)` in
training rollouts, :math:`z_i = 1[p_i > 1/2]` at execution). A closed gate zeroes receiver
:math:`i`'s whole row except itself, in the encoder *and* in the decoder's action messages. How the
gate is trained (straight-through with a cost, or causal labels) is in :mod:`gatelab.comm.ppo` and
:mod:`gatelab.comm.gating`.

**Communication rate**: active sender->receiver edges (self excluded) over :math:`A(A-1)`, per step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gatelab import gates

GRAPH_KINDS = ("learned", "random", "full", "none")


def n_senders(sparsity: float, n_agents: int) -> int:
    """``k = max(1, round_half_up(S (A-1)))``: senders per receiver, self excluded."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if n_agents < 2:
        raise ValueError(f"n_agents must be >= 2, got {n_agents}")
    return max(1, math.floor(sparsity * (n_agents - 1) + 0.5))


def _others(n_agents: int) -> torch.Tensor:
    """``(A, A-1)``: for receiver ``i`` the sender indices ``j != i`` in increasing order."""
    idx = torch.arange(n_agents)
    return torch.stack([torch.cat([idx[:i], idx[i + 1 :]]) for i in range(n_agents)])


class CommGraph(nn.Module):
    r"""Who each agent listens to.

    Args:
        n_agents: ``A``.
        sparsity: ``S`` in [0, 1]; ``k`` senders per receiver (see module docstring).
        kind: ``learned`` (CommFormer), ``random`` (a fixed random graph with the same ``k``),
            ``full`` (everyone hears everyone) or ``none`` (everyone hears only itself).
        tau: Gumbel-softmax temperature of the relaxation.
        init_std: std of the symmetry-breaking init of :math:`\alpha`.

    Shape:
        :meth:`sample` -> ``(B, A, A)`` 0/1 with ones on the diagonal.

    Train/eval: :meth:`sample` draws (learned) in training; :meth:`execution` is the deterministic
    graph used by ``eval()`` rollouts. ``random``/``full``/``none`` are the same in both.
    """

    def __init__(
        self,
        n_agents: int,
        sparsity: float,
        kind: str = "learned",
        tau: float = 1.0,
        init_std: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if kind not in GRAPH_KINDS:
            raise ValueError(f"graph kind must be one of {GRAPH_KINDS}, got {kind!r}")
        self.n_agents, self.kind, self.tau, self.init_std = n_agents, kind, tau, init_std
        self.k = n_senders(sparsity, n_agents) if kind != "full" else n_agents - 1
        self.seed = seed
        self.register_buffer("others", _others(n_agents), persistent=False)
        self.alpha = nn.Parameter(torch.empty(n_agents, n_agents))
        self.register_buffer("fixed", torch.eye(n_agents))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw alpha ~ N(0, init_std^2) and the fixed graph from ``seed``."""
        gen = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            self.alpha.copy_(torch.randn(self.alpha.shape, generator=gen) * self.init_std)
            self.alpha.requires_grad_(self.kind == "learned")
            fixed = torch.eye(self.n_agents)
            if self.kind == "full":
                fixed.fill_(1.0)
            elif self.kind == "random":
                scores = torch.rand(self.n_agents, self.n_agents - 1, generator=gen)
                cols = torch.gather(self.others, 1, gates.select_topk(scores, self.k))
                fixed.scatter_(1, cols, 1.0)
            self.fixed.copy_(fixed)

    def _dense(self, khot_others: torch.Tensor) -> torch.Tensor:
        """Scatter ``(..., A, A-1)`` sender weights into ``(..., A, A)`` and add self edges."""
        shape = (*khot_others.shape[:-1], self.n_agents)
        idx = self.others.expand(*khot_others.shape[:-2], -1, -1)
        dense = torch.zeros(shape, dtype=khot_others.dtype, device=khot_others.device)
        return dense.scatter(-1, idx, khot_others) + torch.eye(
            self.n_agents, dtype=khot_others.dtype, device=khot_others.device
        )

    def _alpha_others(self) -> torch.Tensor:
        return torch.gather(self.alpha, 1, self.others)  # (A, A-1)

    def sample(self, batch: int, seed: int, noise: float = 1.0) -> torch.Tensor:
        """A hard graph per batch element (Gumbel top-k for ``learned``), no gradient.

        The draw is a deterministic function of ``seed`` and the noise scale ``noise``; pass the
        same two to :meth:`relax`. ``noise=0`` gives the execution graph in every row.
        """
        if self.kind != "learned":
            return self.fixed.expand(batch, -1, -1).clone()
        with torch.no_grad():
            return self._dense(self._gumbel(batch, seed, noise)).detach()

    def _gumbel(self, batch: int, seed: int, noise: float = 1.0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        logits = self._alpha_others().expand(batch, -1, -1)  # (B, A, A-1)
        return scaled_gumbel_topk(logits, self.k, self.tau, noise, gen)

    def relax(self, stored: torch.Tensor, seed: int, noise: float = 1.0) -> torch.Tensor:
        r"""``stored + (y - sg(y))`` for the draw ``y`` of ``(seed, noise)``: value = ``stored``.

        Shape:
            stored ``(B, A, A)`` (the whole rollout batch) -> ``(B, A, A)`` with grad to alpha.
        """
        if self.kind != "learned":
            return stored
        y = self._gumbel(stored.shape[0], seed, noise)  # (B, A, A-1) straight-through sample
        return (
            stored
            + self._dense(y - y.detach())
            - torch.eye(self.n_agents, dtype=stored.dtype, device=stored.device)
        )

    def execution(self) -> torch.Tensor:
        """The deterministic graph ``(A, A)``: top-k of alpha per receiver (learned) or fixed."""
        if self.kind != "learned":
            return self.fixed.clone()
        with torch.no_grad():
            cols = torch.gather(self.others, 1, gates.select_topk(self._alpha_others(), self.k))
            return torch.eye(self.n_agents, device=self.alpha.device).scatter(1, cols, 1.0)

    def extra_repr(self) -> str:  # noqa: D102
        return f"n_agents={self.n_agents}, kind={self.kind}, k={self.k}, tau={self.tau}"


def scaled_gumbel_topk(
    logits: torch.Tensor, k: int, tau: float, noise: float, generator: torch.Generator
) -> torch.Tensor:
    r"""Straight-through k-hot of :math:`\operatorname{top}_k(\alpha + s g)`, ``s = noise``.

    :func:`gatelab.gates.gumbel_topk` with its noise scale held to the annealing range [0, 1]:
    ``noise = 1`` is a Gumbel sample, ``noise = 0`` the deterministic top-k with the gradient of
    the noise-free successive softmax. Shape: ``(..., E)`` -> ``(..., E)``.
    """
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise scale must be in [0, 1], got {noise}")
    return gates.gumbel_topk(logits, k, tau, hard=True, generator=generator, noise=noise)


class TemporalGate(nn.Module):
    r"""Per-agent listen/not-listen gate :math:`p_i = \sigma(f(o_i))` on its own observation.

    Args:
        obs_dim: ``O``.
        init_bias: output bias at init (positive: open at start, everyone listens).
        hidden: ``0``: :math:`f(o) = w^\top o + b`; ``h > 0``: :math:`f(o) = w_2^\top
            \tanh(W_1 o + b_1) + b_2` with ``h`` hidden units.

    Shape:
        obs ``(B, A, O)`` -> probabilities (:meth:`forward`) or logits (:meth:`logits`) ``(B, A)``.

    Init: the output layer's weights ``~ N(0, 0.01/fan_in)``, its bias ``init_bias``; the hidden
    layer PyTorch's default.
    """

    def __init__(self, obs_dim: int, init_bias: float = 2.0, hidden: int = 0) -> None:
        super().__init__()
        if hidden < 0:
            raise ValueError(f"gate hidden width must be >= 0, got {hidden}")
        self.obs_dim, self.init_bias, self.hidden = obs_dim, init_bias, hidden
        if hidden:
            self.body = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh())
        else:
            self.register_module("body", None)
        self.linear = nn.Linear(hidden or obs_dim, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small output weights, open bias."""
        nn.init.normal_(self.linear.weight, std=0.1 / math.sqrt(self.linear.in_features))
        nn.init.constant_(self.linear.bias, self.init_bias)

    def logits(self, obs: torch.Tensor) -> torch.Tensor:
        """:math:`f(o_i)`, ``(B, A)``."""
        return self.linear(obs if self.body is None else self.body(obs)).squeeze(-1)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.sigmoid(self.logits(obs))  # (B, A)


def gate_graph(graph: torch.Tensor, listen: torch.Tensor | None) -> torch.Tensor:
    """Row-mask ``graph (B, A, A)`` by ``listen (B, A)`` (self edges stay); ``None``: unchanged."""
    if listen is None:
        return graph
    eye = torch.eye(graph.shape[-1], dtype=graph.dtype, device=graph.device)
    return eye + (graph - eye) * listen[..., None]


def comm_rate(graph: torch.Tensor) -> torch.Tensor:
    """Active edges over possible edges ``A(A-1)``, self excluded. ``(..., A, A)`` -> ``(...)``."""
    n = graph.shape[-1]
    off = graph.sum((-2, -1)) - torch.diagonal(graph, dim1=-2, dim2=-1).sum(-1)
    return off / (n * (n - 1))
