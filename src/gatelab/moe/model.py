r"""``SparseMoE``: a top-K routed mixture-of-experts feed-forward layer for deep networks.

Routers: top-K softmax with renormalisation (Mixtral; with an optional post-selection bias it is
the gate of Nguyen et al., arXiv:2309.13850 Eq. 1), noisy top-K (Shazeer et al.,
arXiv:1701.06538 §2.1), sigmoid top-K (DeepSeek-V3, arXiv:2412.19437 Eqs. 13-16) and expert
choice (Zhou et al., arXiv:2202.09368 §3.1). Auxiliary losses: Switch load balancing
(arXiv:2101.03961 Eq. 4) and router z-loss (arXiv:2202.08906 Eq. 5). Execution is dropless or
capacity-limited, with optional always-on shared experts (DeepSeekMoE, arXiv:2401.06066 §3.2).
The fast path lives in :mod:`gatelab.moe.dispatch`; the Hugging Face Mixtral block's loop over
experts is the reference the tests compare against. As in Mixtral, the router is a submodule whose
forward returns the router logits, and the layer reports its losses unweighted, so the layer can
replace a Mixtral block inside a ``transformers`` model (:mod:`gatelab.moe.mixtral`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import gatelab.moe.dispatch as dsp
from gatelab import gates
from gatelab.moe.experts import BACKENDS, routed_experts

ROUTERS = ("softmax", "noisy", "sigmoid", "expert_choice")
ACTIVATIONS = ("swiglu", "gelu")


class MoEStats(NamedTuple):
    """What one forward pass of a :class:`SparseMoE` reports.

    Attributes:
        balance_loss: Switch load-balancing loss, unweighted, differentiable (0 for expert choice,
            which is balanced by construction).
        z_loss: router z-loss, unweighted, differentiable.
        aux_loss: ``balance_coef * balance_loss + z_coef * z_loss``, ready to add to a task loss.
        tokens_per_expert: ``(E,)`` rows each expert processed (after dropping).
        dropped_fraction: token choice: dropped assignments / (N K); expert choice: tokens that
            no expert took / N.
        router_logits: ``(N, E)`` router logits :math:`u = W x` (what Mixtral's
            ``output_router_logits`` returns per layer), differentiable.
    """

    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    aux_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped_fraction: float
    router_logits: torch.Tensor


class Router(nn.Module):
    r"""Linear router :math:`u = W x`; the routing rule lives in ``SparseMoE``.

    Like Mixtral's ``MixtralTopKRouter``, its forward returns the logits ``(N, E)`` (in float32
    for half-precision inputs, ST-MoE §3.2's advice), so a forward hook on it sees them.

    Attributes:
        weight: ``(E, D)``, init :math:`\mathcal N(0, 1/D)`.
        bias: ``(E,)`` or None, the post-selection intercepts :math:`\beta_0` (init 0).
        noise_weight: ``(E, D)`` or None, noisy router's :math:`W_\text{noise}` (init 0, so the
            initial noise scale is softplus(0) = 0.69).
    """

    def __init__(self, d_model: int, n_experts: int, bias: bool, noisy: bool, **kw) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, d_model, **kw))
        _optional(self, "bias", (n_experts,), bias, kw)
        _optional(self, "noise_weight", (n_experts, d_model), noisy, kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the router weight, zero the bias and noise weight."""
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.weight.shape[1]))
        for p in (self.bias, self.noise_weight):
            if p is not None:
                nn.init.zeros_(p)

    def forward(self, flat: torch.Tensor) -> torch.Tensor:
        """Router logits. Shape: ``(N, D) -> (N, E)``."""
        if flat.dtype in (torch.float16, torch.bfloat16):
            return F.linear(flat.float(), self.weight.float())
        return F.linear(flat, self.weight)


class SparseMoE(nn.Module):
    r"""Top-K routed mixture of SwiGLU (or GELU) experts, with grouped dispatch.

    .. math::
        y(x) = \sum_{i \in S_K(x)} w_i(x)\, f_i(x) + \sum_{s=1}^{S} g_s(x),\qquad
        f_i(x) = (\operatorname{silu}(x W^g_i) \odot x W^u_i)\, W^d_i

    with :math:`S_K, w` from the router (for ``"softmax"`` exactly
    :func:`gatelab.gates.topk_softmax` on :math:`u = W_r x`, bias added after selection) and
    :math:`g_s` the always-on shared experts.

    Args:
        d_model: ``D``. d_hidden: ``H``, hidden width of each expert.
        n_experts: ``E``. top_k: ``K`` in ``[1, E]`` (expert choice: average experts per token).
        router: ``"softmax" | "noisy" | "sigmoid" | "expert_choice"``.
        activation: ``"swiglu" | "gelu"`` (GELU experts have no ``w_gate``).
        capacity_factor: None (dropless) or > 0: each expert keeps at most
            ``ceil(capacity_factor * N * K / E)`` rows, dropped in choice-major order
            (see :mod:`gatelab.moe.dispatch`). Expert choice uses it as its capacity (default 1).
        n_shared_experts: ``S`` always-on experts of width ``H``.
        router_bias: learn :math:`\beta_0` (softmax router only).
        balance_coef, z_coef: weights of the two losses in ``last_stats.aux_loss``.
        backend: expert kernel, ``"auto" | "grouped_mm" | "loop" | "padded"``.

    Shape:
        x ``(..., D)`` -> ``(..., D)``; tokens ``N`` = product of the leading dims.

    Attributes:
        router.weight ``(E, D)``; router.bias ``(E,)``; w_gate, w_up ``(E, D, H)``; w_down
        ``(E, H, D)``; shared_w_gate, shared_w_up ``(S, D, H)``, shared_w_down ``(S, H, D)``.
        Expert init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as ``nn.Linear``.
        last_stats: :class:`MoEStats` of the latest forward.

    Train/eval: the noisy router adds noise only in training. Expert choice picks tokens across
    the whole input, so it is not causal. Router logits are computed in float32 for half inputs.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        n_experts: int,
        top_k: int,
        router: str = "softmax",
        activation: str = "swiglu",
        capacity_factor: float | None = None,
        n_shared_experts: int = 0,
        router_bias: bool = False,
        balance_coef: float = 0.01,
        z_coef: float = 1e-3,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _validate(d_model, d_hidden, n_experts, top_k, router, activation, capacity_factor)
        _validate_extras(n_shared_experts, router_bias, balance_coef, z_coef, dtype)
        if router_bias and router != "softmax":
            raise ValueError("SparseMoE: router_bias is the softmax gate's beta_0; use 'softmax'")
        if backend not in BACKENDS:
            raise ValueError(f"SparseMoE: backend must be one of {BACKENDS}, got {backend!r}")
        self.d_model, self.d_hidden, self.n_experts, self.top_k = (
            d_model,
            d_hidden,
            n_experts,
            top_k,
        )
        self.router_kind, self.activation, self.capacity_factor = (
            router,
            activation,
            capacity_factor,
        )
        self.n_shared_experts, self.balance_coef, self.z_coef = (
            n_shared_experts,
            balance_coef,
            z_coef,
        )
        self.backend = backend
        kw = {"device": device, "dtype": dtype}
        self.router = Router(d_model, n_experts, router_bias, router == "noisy", **kw)
        swiglu = activation == "swiglu"
        _optional(self, "w_gate", (n_experts, d_model, d_hidden), swiglu, kw)
        self.w_up = nn.Parameter(torch.empty(n_experts, d_model, d_hidden, **kw))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_hidden, d_model, **kw))
        s = n_shared_experts
        _optional(self, "shared_w_gate", (s, d_model, d_hidden), s > 0 and swiglu, kw)
        _optional(self, "shared_w_up", (s, d_model, d_hidden), s > 0, kw)
        _optional(self, "shared_w_down", (s, d_hidden, d_model), s > 0, kw)
        self.last_stats: MoEStats | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Router as :class:`Router`; expert matrices U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        self.router.reset_parameters()
        for w in (self.w_gate, self.w_up, self.w_down, self.shared_w_gate, self.shared_w_up,
                  self.shared_w_down):  # fmt: skip
            if w is not None:
                bound = 1.0 / math.sqrt(w.shape[1])
                nn.init.uniform_(w, -bound, bound)

    def capacity(self, n_tokens: int) -> int | None:
        """Rows per expert for ``n_tokens`` tokens: ``ceil(cf N K / E)``, None when dropless."""
        cf = self.capacity_factor
        if cf is None and self.router_kind != "expert_choice":
            return None
        c = math.ceil((1.0 if cf is None else cf) * n_tokens * self.top_k / self.n_experts)
        return max(1, min(c, n_tokens)) if self.router_kind == "expert_choice" else max(1, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        self._check_input(x)
        flat = x.reshape(-1, self.d_model)  # (N, D)
        if flat.shape[0] == 0:  # an empty batch is no error: nothing routed, zero losses
            self.last_stats = self._empty_stats(flat)
            return x.new_zeros(x.shape)
        logits = self.router(flat)  # (N, E)
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(logits).all()):
            raise ValueError("SparseMoE: x holds NaN or inf (its router logits are not finite)")
        plan, gate_weights, balance = self.route(flat, logits)
        out = routed_experts(
            flat,
            gate_weights,
            plan.token_index,
            plan.expert_index,
            plan.counts,
            self.w_gate,
            self.w_up,
            self.w_down,
            self.activation,
            self.backend,
        )  # fmt: skip (N, D)
        if self.n_shared_experts:
            out = out + shared_forward(self, flat)
        self.last_stats = self._stats(plan, balance, logits, flat.shape[0])
        return out.reshape(x.shape)

    def _check_input(self, x: torch.Tensor) -> None:
        """One line naming ``x`` for a non-tensor, a wrong shape, dtype or device."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"SparseMoE: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"SparseMoE: x must have shape (..., D={self.d_model}), got {tuple(x.shape)}"
            )
        weight = self.w_up
        if not x.is_floating_point():
            raise TypeError(f"SparseMoE: x must be a floating-point tensor, got {x.dtype}")
        if x.dtype != weight.dtype:  # the expert op computes in the parameters' dtype
            raise TypeError(
                f"SparseMoE: x has dtype {x.dtype} but the layer's parameters are {weight.dtype}; "
                "cast one of them (e.g. moe.to(x.dtype))"
            )
        if x.device != weight.device:
            raise ValueError(
                f"SparseMoE: x is on {x.device} but the layer's parameters are on {weight.device}"
            )

    def _empty_stats(self, flat: torch.Tensor) -> MoEStats:
        zero = self.w_up.new_zeros(())
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=flat.device)
        logits = flat.new_zeros(0, self.n_experts)
        return MoEStats(zero, zero, zero, counts, 0.0, logits)

    def route(
        self, flat: torch.Tensor, logits: torch.Tensor
    ) -> tuple[dsp.Dispatch, torch.Tensor, torch.Tensor]:
        """Apply the routing rule: the dispatch plan, the dense gates and the balance loss.

        The gates are the routing weights scattered to ``(N, E)`` (zero where a token did not
        pick an expert), computed without a scatter in their backward: a masked softmax for
        ``"softmax"`` (the same numbers as :func:`gatelab.gates.topk_softmax`), masked and
        renormalised scores for ``"sigmoid"`` (:func:`gatelab.gates.sigmoid_topk`), the masked
        affinities for expert choice.

        Shape:
            flat ``(N, D)``, logits ``(N, E)`` -> gates ``(N, E)``, balance loss ``()``.
        """
        n, e, k = flat.shape[0], self.n_experts, self.top_k
        if self.router_kind == "expert_choice":
            taken = self._expert_choice(logits)  # (N, E)
            weights = _expert_softmax(logits).masked_fill(~taken, 0.0)
            return dsp.dispatch_expert_choice(taken), weights, logits.new_zeros(())
        if self.router_kind == "softmax":
            indices = gates.select_topk(logits, k, validate=False)  # (N, K), logits checked
            scores = logits if self.router.bias is None else logits + self.router.bias
            hidden = ~_mask(indices, (n, e))  # (N, E)
            weights = _expert_softmax(scores.masked_fill(hidden, -math.inf))
            probs = _expert_softmax(logits)  # (N, E)
        elif self.router_kind == "noisy":
            noise_std = F.softplus(F.linear(flat, self.router.noise_weight).to(logits.dtype))
            chosen, indices, _ = gates.noisy_topk(logits, noise_std, k, training=self.training)
            weights = torch.zeros_like(logits).scatter(-1, indices, chosen)  # (N, E)
            probs = _expert_softmax(logits)
        else:  # sigmoid: the balance loss uses normalised sigmoid scores (DeepSeek-V3 Eq. 18)
            scores = torch.sigmoid(logits)
            indices = gates.select_topk(scores, k, validate=False)
            kept = scores.masked_fill(~_mask(indices, (n, e)), 0.0)
            weights = kept / kept.sum(-1, keepdim=True)
            probs = scores / scores.sum(-1, keepdim=True)
        balance = gates.load_balancing_loss(probs, indices, e, validate=False)
        return self._dispatch(indices), weights, balance

    def _expert_choice(self, logits: torch.Tensor) -> torch.Tensor:
        """Which tokens each expert takes (its top-C by affinity). Shape: ``(N, E) -> (N, E)``."""
        n = logits.shape[0]
        choice = gates.expert_choice(logits, self.capacity(n))
        return _mask(choice.token_indices, (self.n_experts, n)).T

    def _dispatch(self, indices: torch.Tensor) -> dsp.Dispatch:
        """Rows grouped by expert, capacity applied. Shape: indices ``(N, K)``."""
        return dsp.dispatch_topk(indices, self.n_experts, self.capacity(indices.shape[0]))

    def _stats(self, plan: dsp.Dispatch, balance, logits, n_tokens: int) -> MoEStats:
        if self.router_kind == "expert_choice":
            taken = torch.zeros(n_tokens, dtype=torch.bool, device=plan.token_index.device)
            dropped = 1.0 - float(taken.index_fill(0, plan.token_index, True).float().mean())
        else:
            dropped = plan.n_dropped / max(1, n_tokens * self.top_k)
        z_loss = gates.router_z_loss(logits, validate=False)
        aux = self.balance_coef * balance + self.z_coef * z_loss
        return MoEStats(balance, z_loss, aux, plan.counts.detach(), dropped, logits)

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"d_model={self.d_model}, d_hidden={self.d_hidden}, n_experts={self.n_experts}, "
            f"top_k={self.top_k}, router={self.router_kind!r}, activation={self.activation!r}, "
            f"capacity_factor={self.capacity_factor}, n_shared_experts={self.n_shared_experts}"
        )


def _optional(module: nn.Module, name: str, shape: tuple, present: bool, kw: dict) -> None:
    """Register an (uninitialised) parameter, or ``None`` under its name when absent."""
    param = nn.Parameter(torch.empty(*shape, **kw)) if present else None
    module.register_parameter(name, param)


def _expert_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the experts (last dim); on CPU with fewer than 16 experts, along the rows.

    torch 2.13's CPU softmax over a last dim shorter than its 16-float vector falls to a slow
    path: 306 us against 41 us along dim 0 of the transposed copy at ``(2048, 8)``, and 506
    against 180 us with the backward (docs/notes/moe.md). Same values up to rounding.

    Shape:
        scores ``(N, E)`` -> ``(N, E)``.
    """
    if scores.device.type == "cpu" and scores.shape[-1] < 16:
        return torch.softmax(scores.T.contiguous(), dim=0).T
    return torch.softmax(scores, dim=-1)


def _mask(indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Boolean ``shape`` mask, True at ``indices`` along the last dim (no gradient)."""
    return torch.zeros(shape, dtype=torch.bool, device=indices.device).scatter_(-1, indices, True)


def shared_forward(moe: SparseMoE, flat: torch.Tensor) -> torch.Tensor:
    """Sum of the ``S`` shared experts, as one batched matmul. Shape: ``(N, D) -> (N, D)``."""
    stacked = flat.unsqueeze(0).expand(moe.n_shared_experts, -1, -1)  # (S, N, D)
    up = torch.bmm(stacked, moe.shared_w_up)  # (S, N, H)
    if moe.activation == "swiglu":
        hidden = F.silu(torch.bmm(stacked, moe.shared_w_gate)) * up
    else:
        hidden = F.gelu(up)
    return torch.bmm(hidden, moe.shared_w_down).sum(0)  # (N, D)


def _validate(d_model, d_hidden, n_experts, top_k, router, activation, capacity_factor) -> None:
    for name, value in (("d_model", d_model), ("d_hidden", d_hidden), ("n_experts", n_experts)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"SparseMoE: {name} must be a positive int, got {value!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_experts:
        raise ValueError(f"SparseMoE: top_k must be in [1, n_experts={n_experts}], got {top_k!r}")
    if router not in ROUTERS:
        raise ValueError(f"SparseMoE: router must be one of {ROUTERS}, got {router!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"SparseMoE: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if router == "noisy" and top_k == n_experts:
        raise ValueError(
            f"SparseMoE: the noisy router needs top_k < n_experts={n_experts} (its load estimate "
            "uses the (K+1)-th score); use router='softmax' for top_k == n_experts"
        )
    if capacity_factor is not None and not (
        isinstance(capacity_factor, int | float)
        and not isinstance(capacity_factor, bool)
        and math.isfinite(capacity_factor)
        and capacity_factor > 0
    ):
        raise ValueError(
            f"SparseMoE: capacity_factor must be None (dropless) or > 0, got {capacity_factor!r}"
        )


def _validate_extras(n_shared_experts, router_bias, balance_coef, z_coef, dtype) -> None:
    if isinstance(n_shared_experts, bool) or not isinstance(n_shared_experts, int):
        raise TypeError(f"SparseMoE: n_shared_experts must be an int, got {n_shared_experts!r}")
    if n_shared_experts < 0:
        raise ValueError(f"SparseMoE: n_shared_experts must be >= 0, got {n_shared_experts}")
    if not isinstance(router_bias, bool):
        raise TypeError(f"SparseMoE: router_bias must be a bool, got {router_bias!r}")
    for name, value in (("balance_coef", balance_coef), ("z_coef", z_coef)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"SparseMoE: {name} must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"SparseMoE: {name} must be finite and >= 0, got {value!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"SparseMoE: dtype must be a floating-point torch.dtype, got {dtype!r}")
