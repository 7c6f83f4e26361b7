r"""Gating primitives shared by every gatelab system.

A gate turns scores into a decision about which computation runs: which experts see a token
(top-K softmax, noisy top-K, sigmoid top-K, expert choice), which senders an agent listens to
(Gumbel top-K), or where a sample leaves the network (hazard exit probabilities).

Everything here is pure torch, works on any device and dtype, and is differentiable where the
maths allows (the *weights* are; the *indices* of a hard selection are not).

Sources: Nguyen et al., "Statistical Perspective of Top-K Sparse Softmax Gating Mixture of
Experts", ICLR 2024 (arXiv:2309.13850), Eq. (1); Shazeer et al. 2017 (arXiv:1701.06538) §2.1 and
App. A; Fedus et al. 2021 (arXiv:2101.03961) Eq. (4); Zoph et al. 2022 (arXiv:2202.08906) Eq. (5);
Zhou et al. 2022 (arXiv:2202.09368) §3.1; Xie & Ermon 2019 (arXiv:1901.10517) §3.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import NamedTuple

import torch


class TopK(NamedTuple):
    """Weights over the selected experts and their indices, both of shape ``(..., K)``."""

    weights: torch.Tensor
    indices: torch.Tensor


class NoisyTopK(NamedTuple):
    """Noisy top-K gate output: ``weights``/``indices`` ``(..., K)`` and ``load`` ``(E,)``."""

    weights: torch.Tensor
    indices: torch.Tensor
    load: torch.Tensor


class ExpertChoice(NamedTuple):
    """Expert-choice routing: per expert the weights ``(E, C)`` and token indices ``(E, C)``."""

    weights: torch.Tensor
    token_indices: torch.Tensor


def _check_scores(
    x: object,
    name: str,
    *,
    ndim: int | None = None,
    finite: bool = True,
    floating: bool = True,
    values: bool = True,
) -> None:
    """``x`` is a real tensor of shape ``(..., E)``, ``E >= 1`` (or exactly ``ndim`` dims).

    ``finite``: no NaN or inf (weights computed from them would be NaN); otherwise only NaN is
    refused (a selection can order infinities, not NaN). One check of all values, which on an
    accelerator waits for the tensor to be computed; ``values=False`` skips it.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_complex() or (floating and not x.is_floating_point()):
        kind = "a floating-point" if floating else "a real (integer or floating-point)"
        raise TypeError(f"{name} must be {kind} tensor, got {x.dtype}")
    if (ndim is not None and x.ndim != ndim) or x.ndim == 0 or x.shape[-1] == 0:
        wanted = "(N, E)" if ndim == 2 else "(..., E)"
        raise ValueError(f"{name} must have shape {wanted} with E >= 1, got {tuple(x.shape)}")
    if values and x.is_floating_point() and x.numel() and not torch.compiler.is_compiling():
        # value checks are data-dependent: a compiled graph skips them (eager runs check)
        bad = ~torch.isfinite(x) if finite else torch.isnan(x)
        if bool(bad.any()):
            value = x[bad].flatten()[0].item()
            what = "finite (no NaN or inf)" if finite else "free of NaN"
            raise ValueError(f"{name} must be {what}, got {value}")


def _check_k(k: int, n: int, name: str = "k") -> None:
    if isinstance(k, bool) or not isinstance(k, Integral):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"{name} must be in [1, n={n}], got {k}")


def _check_bias(bias: torch.Tensor | None, logits: torch.Tensor, name: str = "bias") -> None:
    """``bias`` is ``None`` or a finite float tensor ``(..., E)`` that broadcasts to logits."""
    if bias is None:
        return
    n = logits.shape[-1]
    _check_scores(bias, name)
    if bias.shape[-1:] != (n,):
        raise ValueError(f"{name} must have last dimension n={n}, got shape {tuple(bias.shape)}")
    try:
        shape = torch.broadcast_shapes(bias.shape, logits.shape)
    except RuntimeError:
        shape = None
    if shape != logits.shape:
        raise ValueError(
            f"{name} of shape {tuple(bias.shape)} does not broadcast to logits "
            f"{tuple(logits.shape)}"
        )
    if bias.device != logits.device:
        raise ValueError(f"{name} is on {bias.device}, logits on {logits.device}")


def _check_generator(generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )


def _check_number(
    value: object, name: str, low: float, *, low_open: bool, high: float | None = None
):
    """``value`` is a real number (not a bool), finite, above ``low`` and at most ``high``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    inside = math.isfinite(value) and (value > low if low_open else value >= low)
    if inside and high is not None:
        inside = value <= high
    if not inside:
        bound = f"{'>' if low_open else '>='} {low:g}" + ("" if high is None else f", <= {high:g}")
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")


def select_topk(scores: torch.Tensor, k: int, *, validate: bool = True) -> torch.Tensor:
    """Indices of the ``k`` largest ``scores`` along the last dim, ties broken by lower index.

    A stable descending sort keeps equal scores in index order, which makes the selection a
    deterministic function of the scores (``torch.topk`` gives no such guarantee).
    ``validate=False`` skips the NaN check (a caller that has checked the scores: one pass and,
    on an accelerator, one host sync fewer).

    Shape:
        scores ``(..., E)`` -> indices ``(..., K)``, sorted by decreasing score.

    Raises:
        TypeError: ``scores`` is not a real tensor or ``k`` not an int.
        ValueError: ``scores`` has no last axis or holds NaN (infinities sort fine), or ``k`` is
            outside ``[1, E]``.
    """
    _check_scores(scores, "scores", finite=False, floating=False, values=validate)
    _check_k(k, scores.shape[-1])
    return _topk_indices(scores, k)


def _topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`select_topk` without the checks (its callers have made them)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def topk_softmax(logits: torch.Tensor, k: int, bias: torch.Tensor | None = None) -> TopK:
    r"""Top-K sparse softmax gate with the selection made by ``logits`` alone.

    .. math::
        S_K(x) = \operatorname{top}_K(\beta_1^\top x),\qquad
        w_i(x) = \frac{\exp(\beta_{1i}^\top x + \beta_{0i})}
                      {\sum_{j \in S_K(x)} \exp(\beta_{1j}^\top x + \beta_{0j})},\ i \in S_K(x)

    ``logits`` are :math:`\beta_1^\top x`; ``bias`` is :math:`\beta_0`, added *after* selection
    (arXiv:2309.13850 Eq. 1). With ``k == n`` this is ``softmax(logits + bias)``; with ``bias=None``
    it is the Mixtral router (softmax over the selected logits).

    Args:
        logits: selection scores.
        k: number of selected experts, ``1 <= k <= E``.
        bias: optional per-expert intercepts, broadcastable to ``logits``.

    Shape:
        logits ``(..., E)``, bias ``(E,)`` or ``(..., E)`` -> weights, indices ``(..., K)``.

    Returns:
        ``TopK(weights, indices)``; weights sum to one over the last dim.

    Raises:
        TypeError: ``logits`` or ``bias`` is not a floating-point tensor, ``k`` not an int.
        ValueError: ``logits`` without a last axis or with NaN/inf, ``k`` outside ``[1, E]``,
            or ``bias`` of the wrong shape, with NaN/inf or on another device.
    """
    _check_scores(logits, "logits")
    _check_k(k, logits.shape[-1])
    _check_bias(bias, logits)
    indices = _topk_indices(logits, k)  # (..., K)
    scores = logits if bias is None else logits + bias
    weights = torch.softmax(torch.gather(scores, -1, indices), dim=-1)  # (..., K)
    return TopK(weights, indices)


def topk_softmax_dense(logits: torch.Tensor, k: int, bias: torch.Tensor | None = None):
    """:func:`topk_softmax` scattered back to a dense ``(..., E)`` vector, zeros elsewhere."""
    weights, indices = topk_softmax(logits, k, bias)
    return torch.zeros_like(logits).scatter(-1, indices, weights)


def noisy_topk(
    clean_logits: torch.Tensor,
    noise_std: torch.Tensor,
    k: int,
    *,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> NoisyTopK:
    r"""Noisy top-K gating and its differentiable load estimate (Shazeer et al. 2017 §2.1, App. A).

    .. math::
        H(x)_i = (xW_g)_i + \epsilon_i\,\sigma_i(x),\quad \epsilon_i \sim \mathcal N(0,1),\quad
        G(x) = \operatorname{softmax}(\operatorname{KeepTopK}(H(x), k))

        \text{load}_i = \sum_x \Phi\Big(\frac{(xW_g)_i - \text{kth\_excluding}(H(x), k, i)}
                                              {\sigma_i(x)}\Big)

    where kth_excluding is the k-th largest entry of :math:`H(x)` among the other experts. In eval
    mode no noise is added and ``load`` counts the selections (no gradient).

    Args:
        clean_logits: :math:`xW_g`.
        noise_std: :math:`\sigma(x) = \operatorname{softplus}(xW_\text{noise}) > 0`.
        k: experts per token, ``1 <= k < E`` when training (the estimate needs a (k+1)-th value).
        training: add noise and return the smooth load estimate.
        generator: RNG for the noise.

    Shape:
        clean_logits, noise_std ``(N, E)`` -> weights, indices ``(N, K)``; load ``(E,)``.

    Raises:
        TypeError: a tensor argument of the wrong type or dtype, ``k`` not an int, ``training``
            not a bool, ``generator`` not a ``torch.Generator``.
        ValueError: ``clean_logits`` not ``(N, E)`` or with NaN/inf, ``noise_std`` of another
            shape or device, with NaN/inf or values <= 0, ``k`` outside ``[1, E]`` (``< E``
            when training).
    """
    _check_scores(clean_logits, "clean_logits", ndim=2)
    n = clean_logits.shape[-1]
    _check_k(k, n)
    _check_scores(noise_std, "noise_std", ndim=2)
    if noise_std.shape != clean_logits.shape or noise_std.device != clean_logits.device:
        raise ValueError(
            f"noise_std must match clean_logits {tuple(clean_logits.shape)} on "
            f"{clean_logits.device}, got {tuple(noise_std.shape)} on {noise_std.device}"
        )
    if noise_std.numel() and not torch.compiler.is_compiling() and not bool((noise_std > 0).all()):
        raise ValueError(f"noise_std must be > 0, got {noise_std.min().item()}")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    _check_generator(generator)
    if not training:
        indices = _topk_indices(clean_logits, k)  # (N, K)
        weights = torch.softmax(torch.gather(clean_logits, -1, indices), dim=-1)
        flat = indices.reshape(-1)
        load = torch.bincount(flat, minlength=n).to(clean_logits.dtype)
        return NoisyTopK(weights, indices, load)
    if k == n:
        raise ValueError(f"noisy_topk needs k < n={n} in training (the load uses the (k+1)-th)")
    eps = torch.randn(
        clean_logits.shape, generator=generator, dtype=clean_logits.dtype, device="cpu"
    ).to(clean_logits.device)
    noisy = clean_logits + eps * noise_std  # (N, E)
    top = torch.sort(noisy, dim=-1, descending=True, stable=True)
    indices = top.indices[..., :k]  # (N, K)
    weights = torch.softmax(top.values[..., :k], dim=-1)  # (N, K)
    # For an expert inside the top k, the threshold it must beat is the (k+1)-th value; for one
    # outside, the k-th value.
    kth_in = top.values[..., k : k + 1]  # (N, 1)
    kth_out = top.values[..., k - 1 : k]  # (N, 1)
    is_in = noisy >= kth_out  # (N, E)
    threshold = torch.where(is_in, kth_in, kth_out)
    normal = torch.distributions.Normal(
        torch.zeros((), dtype=noisy.dtype, device=noisy.device),
        torch.ones((), dtype=noisy.dtype, device=noisy.device),
    )
    prob_in = normal.cdf((clean_logits - threshold) / noise_std)  # (N, E)
    return NoisyTopK(weights, indices, prob_in.sum(0))


def sigmoid_topk(logits: torch.Tensor, k: int, selection_bias: torch.Tensor | None = None) -> TopK:
    r"""Sigmoid-score top-K with renormalisation (DeepSeek-V3, arXiv:2412.19437 Eqs. 13-16).

    .. math::
        s_i = \sigma(u_i),\quad S_K = \operatorname{top}_K(s + b),\quad
        w_i = s_i / \textstyle\sum_{j\in S_K} s_j

    ``selection_bias`` :math:`b` only steers selection (auxiliary-loss-free load balancing); it
    never enters the weights.

    Shape:
        logits ``(..., E)`` -> weights, indices ``(..., K)``.

    Raises:
        TypeError: ``logits``/``selection_bias`` not floating-point tensors, ``k`` not an int.
        ValueError: NaN/inf in either, a ``selection_bias`` that does not broadcast to the
            logits, ``k`` outside ``[1, E]``.
    """
    _check_scores(logits, "logits")
    _check_k(k, logits.shape[-1])
    _check_bias(selection_bias, logits, "selection_bias")
    scores = torch.sigmoid(logits)
    indices = _topk_indices(scores if selection_bias is None else scores + selection_bias, k)
    chosen = torch.gather(scores, -1, indices)  # (..., K)
    return TopK(chosen / chosen.sum(-1, keepdim=True), indices)


def expert_choice(logits: torch.Tensor, capacity: int) -> ExpertChoice:
    r"""Expert-choice routing (Zhou et al. 2022, §3.1): each expert takes its top-C tokens.

    .. math::
        S = \operatorname{softmax}_{\text{experts}}(X W_g),\qquad
        G, I = \operatorname{top}_C(S^\top)\ \text{along tokens}

    A token may be taken by several experts or by none.

    Shape:
        logits ``(N, E)`` -> weights, token_indices ``(E, C)``.

    Raises:
        TypeError: ``logits`` not a floating-point tensor, ``capacity`` not an int.
        ValueError: ``logits`` not ``(N, E)`` with ``N, E >= 1`` or with NaN/inf, ``capacity``
            outside ``[1, N]``.
    """
    _check_scores(logits, "logits", ndim=2)
    if logits.shape[0] == 0:
        raise ValueError(f"logits must hold at least one token, got {tuple(logits.shape)}")
    _check_k(capacity, logits.shape[0], "capacity")
    affinity = torch.softmax(logits, dim=-1).T  # (E, N)
    token_indices = _topk_indices(affinity, capacity)  # (E, C)
    return ExpertChoice(torch.gather(affinity, -1, token_indices), token_indices)


def gumbel_topk(
    logits: torch.Tensor,
    k: int,
    tau: float = 1.0,
    hard: bool = True,
    generator: torch.Generator | None = None,
    noise: float = 1.0,
) -> torch.Tensor:
    r"""Relaxed k-hot sample along the last dim, straight-through when ``hard``.

    Perturb :math:`\tilde\alpha = \alpha + s\,g`, :math:`g \sim \text{Gumbel}(0,1)`, with noise
    scale :math:`s` = ``noise`` (0: the deterministic top-k). At :math:`s = 1` the hard sample is
    the k-hot of :math:`\operatorname{top}_k(\tilde\alpha)` (a draw without replacement from
    :math:`\operatorname{softmax}(\alpha)`). The soft relaxation is Xie & Ermon's (2019) successive
    softmax:

    .. math::
        p^{(1)} = \operatorname{softmax}(\tilde\alpha/\tau),\quad
        p^{(j+1)} = \operatorname{softmax}\big((\tilde\alpha + \textstyle\sum_{i\le j}
        \log(1-p^{(i)}))/\tau\big),\quad y_\text{soft} = \textstyle\sum_{j\le k} p^{(j)}

    With ``hard=True`` the forward value is the exact k-hot and the gradient is that of
    :math:`y_\text{soft}` (straight-through).

    Shape:
        logits ``(..., E)`` -> ``(..., E)`` with entries summing to ``k``.

    Raises:
        TypeError: ``logits`` not a floating-point tensor, ``k`` not an int, ``tau``/``noise``
            not numbers, ``hard`` not a bool, ``generator`` not a ``torch.Generator``.
        ValueError: NaN/inf logits, ``k`` outside ``[1, E]``, ``tau <= 0`` or ``noise < 0``
            (or either not finite).
    """
    _check_scores(logits, "logits")
    _check_k(k, logits.shape[-1])
    _check_number(tau, "tau", 0, low_open=True)
    _check_number(noise, "noise", 0, low_open=False)
    if not isinstance(hard, bool):
        raise TypeError(f"hard must be a bool, got {type(hard).__name__}")
    _check_generator(generator)
    # G = -log(E), E ~ Exp(1), drawn on CPU so a CPU generator seeds any device.
    exponential = torch.empty(logits.shape, dtype=logits.dtype).exponential_(generator=generator)
    gumbel = -exponential.clamp_min(torch.finfo(logits.dtype).tiny).log()
    perturbed = logits + noise * gumbel.to(logits.device)
    soft = torch.zeros_like(logits)
    shifted = perturbed
    for _ in range(k):
        p = torch.softmax(shifted / tau, dim=-1)
        soft = soft + p
        shifted = shifted + torch.log1p(-p.clamp(max=1 - 1e-6))
    if not hard:
        return soft
    khot = torch.zeros_like(logits).scatter(-1, _topk_indices(perturbed, k), 1.0)
    return khot + (soft - soft.detach())  # value exactly the k-hot


def exit_probabilities(gates: torch.Tensor) -> torch.Tensor:
    r"""Hazard-form exit probabilities from per-exit gate values.

    .. math::
        P_l = g_l \prod_{j<l} (1 - g_j)\quad (l < L),\qquad P_L = \prod_{j<L} (1 - g_j)

    ``g_l`` is the probability of leaving at exit ``l`` *given* the sample reached it. The last
    exit (the backbone's head) takes the remainder, so the ``L`` probabilities sum to one. This is
    the one consistent reading of JEI-DNN's gates (Regol, Chataoui and Coates, ICLR 2024).

    Shape:
        gates ``(..., L-1)`` in [0, 1] -> ``(..., L)``.

    Raises:
        TypeError: ``gates`` is not a floating-point tensor.
        ValueError: ``gates`` has no exit axis, or a value outside [0, 1] (NaN included).
    """
    _check_hazards(gates)
    survive = torch.cumprod(1 - gates, dim=-1)  # (..., L-1)
    reach = torch.cat([torch.ones_like(gates[..., :1]), survive[..., :-1]], dim=-1)
    return torch.cat([gates * reach, survive[..., -1:]], dim=-1)


def _check_hazards(gates: object) -> None:
    """``gates`` is a floating-point tensor ``(..., L-1)``, ``L-1 >= 1``, with values in [0, 1]."""
    if not isinstance(gates, torch.Tensor) or not gates.is_floating_point():
        kind = gates.dtype if isinstance(gates, torch.Tensor) else type(gates).__name__
        raise TypeError(f"gates must be a floating-point tensor, got {kind}")
    if gates.ndim == 0 or gates.shape[-1] == 0:
        raise ValueError(
            f"gates must have shape (..., L-1) with L-1 >= 1, got {tuple(gates.shape)}"
        )
    if not bool(((gates >= 0) & (gates <= 1)).all()):  # NaN fails both comparisons
        bad = gates[~((gates >= 0) & (gates <= 1))].flatten()[0].item()
        raise ValueError(f"gates must lie in [0, 1] (hazard probabilities), got {bad}")


def first_exit(gates: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Index of the first exit whose hazard ``g_l >= threshold``; ``L-1`` (the last) if none.

    Shape:
        gates ``(..., L-1)`` -> ``(...,)`` long in ``[0, L-1]``.

    Raises:
        TypeError: ``gates`` not a floating-point tensor, ``threshold`` not a number.
        ValueError: ``gates`` without an exit axis or outside [0, 1], ``threshold`` outside
            [0, 1].
    """
    _check_hazards(gates)
    _check_number(threshold, "threshold", 0, low_open=False, high=1)
    fire = gates >= threshold  # (..., L-1)
    n_gates = gates.shape[-1]
    index = torch.arange(n_gates, device=gates.device).expand_as(fire)
    return torch.where(fire, index, n_gates).amin(dim=-1)


def load_balancing_loss(
    router_probs: torch.Tensor,
    expert_indices: torch.Tensor,
    n_experts: int,
    *,
    validate: bool = True,
) -> torch.Tensor:
    r"""Switch-Transformer load-balancing loss (Fedus et al. 2021, Eq. 4).

    .. math::
        \mathcal L_\text{bal} = E \sum_{i=1}^{E} f_i\, P_i,\quad
        f_i = \frac{\#\{(t, j): I_{tj} = i\}}{N K},\quad P_i = \frac1N \sum_t p_{ti}

    Equals 1 under perfectly uniform routing. ``f`` is counted over all ``K`` choices per token.

    ``validate=False`` skips the value checks (finite, non-negative probabilities; indices in
    range): for a caller that computed both from checked logits. Shapes are always checked.

    Shape:
        router_probs ``(N, E)`` (full softmax), expert_indices ``(N, K)`` -> scalar.

    Raises:
        TypeError: ``router_probs`` not a floating-point tensor, ``expert_indices`` not an
            integer tensor, ``n_experts`` not an int.
        ValueError: no tokens, shapes that disagree, NaN/inf or negative probabilities, indices
            outside ``[0, n_experts)``.
    """
    if isinstance(n_experts, bool) or not isinstance(n_experts, Integral):
        raise TypeError(f"n_experts must be an int, got {type(n_experts).__name__}")
    if n_experts < 1:
        raise ValueError(f"n_experts must be >= 1, got {n_experts}")
    _check_scores(router_probs, "router_probs", ndim=2, values=validate)
    n = router_probs.shape[0]
    if n == 0 or router_probs.shape[1] != n_experts:
        raise ValueError(
            f"router_probs must have shape (N, n_experts={n_experts}) with N >= 1, "
            f"got {tuple(router_probs.shape)}"
        )
    # data-dependent checks run eagerly only
    skip_values = torch.compiler.is_compiling() or not validate
    if not skip_values and not bool((router_probs >= 0).all()):
        raise ValueError(f"router_probs must be >= 0, got {router_probs.min().item()}")
    if not isinstance(expert_indices, torch.Tensor):
        kind = type(expert_indices).__name__
        raise TypeError(f"expert_indices must be a torch.Tensor, got {kind}")
    if (
        expert_indices.is_floating_point()
        or expert_indices.is_complex()
        or (expert_indices.dtype == torch.bool)
    ):
        raise TypeError(f"expert_indices must be an integer tensor, got {expert_indices.dtype}")
    if expert_indices.ndim != 2 or expert_indices.shape[0] != n or expert_indices.shape[1] == 0:
        raise ValueError(
            f"expert_indices must have shape (N={n}, K) with K >= 1, "
            f"got {tuple(expert_indices.shape)}"
        )
    if expert_indices.device != router_probs.device:
        raise ValueError(
            f"expert_indices is on {expert_indices.device}, router_probs on {router_probs.device}"
        )
    if not skip_values and not bool(((expert_indices >= 0) & (expert_indices < n_experts)).all()):
        outside = expert_indices[(expert_indices < 0) | (expert_indices >= n_experts)]
        raise ValueError(
            f"expert_indices must lie in [0, n_experts={n_experts}), got {outside[0].item()}"
        )
    flat = expert_indices.reshape(-1)  # bincount's output shape depends on the data (compile)
    counts = flat.new_zeros(n_experts).scatter_add_(0, flat, torch.ones_like(flat))
    fraction = counts.to(router_probs.dtype) / expert_indices.numel()  # (E,)
    return n_experts * (fraction * router_probs.mean(0)).sum()


def router_z_loss(logits: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
    r"""Router z-loss (Zoph et al. 2022, Eq. 5): :math:`\frac1N\sum_t (\log\sum_i e^{u_{ti}})^2`.

    ``validate=False`` skips the NaN/inf check (a caller that has checked the logits).

    Shape:
        logits ``(..., E)`` -> scalar.

    Raises:
        TypeError: ``logits`` not a floating-point tensor.
        ValueError: ``logits`` without a last axis, without a row, or with NaN/inf.
    """
    _check_scores(logits, "logits", values=validate)
    if logits.numel() == 0:
        raise ValueError(f"logits must hold at least one row, got {tuple(logits.shape)}")
    return torch.logsumexp(logits, dim=-1).square().mean()
