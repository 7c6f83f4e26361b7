"""Conversion to and from ``transformers``' ``MixtralSparseMoeBlock`` (transformers 5.x).

transformers 5 stores Mixtral experts fused (read in ``modeling_mixtral.py`` of 5.24):
``experts.gate_up_proj (E, 2H, D)`` (gate rows first, then up), ``experts.down_proj (E, D, H)``,
router ``gate.weight (E, D)``; the block routes by softmax, top-K, renormalise — the same as
:func:`gatelab.gates.topk_softmax` without bias — and returns only the hidden states.

transformers 5 collects ``output_router_logits`` with forward hooks on the ``MixtralTopKRouter``
modules (output index 0) and adds ``router_aux_loss_coef * load_balancing_loss_func(...)`` to the
loss itself. :func:`use_sparse_moe` swaps every block of a model for a :class:`SparseMoE` and hooks
each ``SparseMoE.router`` (whose forward returns the logits) the same way, so
``output_router_logits=True`` and the model's ``aux_loss`` keep working. ``transformers`` is
imported lazily: it is needed only here.
"""

from __future__ import annotations

import torch

from gatelab.moe.model import SparseMoE


def use_sparse_moe(model, **kwargs):
    """Replace every ``MixtralSparseMoeBlock`` of ``model`` in place by a :class:`SparseMoE` copy.

    Each new router gets transformers' output-capturing hook, so ``output_router_logits=True``
    returns this layer's logits per layer and the model's ``aux_loss`` is computed from them.

    Args:
        model: a transformers Mixtral model (``MixtralModel``, ``MixtralForCausalLM``, ...).
        **kwargs: further ``SparseMoE`` options (``backend``, ``capacity_factor``, ...).

    Returns:
        ``model``, for chaining.

    Raises:
        TypeError: ``model`` holds no ``MixtralSparseMoeBlock``.
    """
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.utils.output_capturing import install_output_capuring_hook

    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, MixtralSparseMoeBlock)]
    if not blocks:
        raise TypeError(f"use_sparse_moe: {type(model).__name__} holds no MixtralSparseMoeBlock")
    for name, block in blocks:
        moe = from_mixtral(block, **kwargs)
        install_output_capuring_hook(moe.router, "router_logits", index=0)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, moe)
    return model


def from_mixtral(block, **kwargs) -> SparseMoE:
    """A :class:`SparseMoE` holding a copy of ``block``'s weights.

    Args:
        block: a ``MixtralSparseMoeBlock``.
        **kwargs: further ``SparseMoE`` options (``capacity_factor``, ``backend``, ...).

    Raises:
        TypeError: ``block`` does not have the transformers-5 fused Mixtral layout.
        ValueError: its activation is not SiLU (SwiGLU experts).
    """
    experts, gate = getattr(block, "experts", None), getattr(block, "gate", None)
    if not hasattr(experts, "gate_up_proj") or not hasattr(gate, "weight"):
        raise TypeError(
            "from_mixtral expects a transformers>=5 MixtralSparseMoeBlock with experts.gate_up_proj"
            f" and gate.weight, got {type(block).__name__}"
        )
    act = type(experts.act_fn).__name__
    if act not in ("SiLU", "SiLUActivation"):
        raise ValueError(f"from_mixtral supports SiLU (SwiGLU) experts only, got {act}")
    n_experts, two_h, d_model = experts.gate_up_proj.shape
    gate_up, down, router = experts.gate_up_proj, experts.down_proj, gate.weight
    moe = SparseMoE(
        d_model, two_h // 2, n_experts, block.top_k, device=router.device, dtype=router.dtype,
        **kwargs,
    )  # fmt: skip
    with torch.no_grad():
        moe.router.weight.copy_(router)
        moe.w_gate.copy_(gate_up[:, : two_h // 2].transpose(1, 2))  # (E, D, H)
        moe.w_up.copy_(gate_up[:, two_h // 2 :].transpose(1, 2))  # (E, D, H)
        moe.w_down.copy_(down.transpose(1, 2))  # (E, H, D)
    return moe


def to_mixtral(moe: SparseMoE):
    """A ``MixtralSparseMoeBlock`` with ``moe``'s weights.

    Raises:
        ValueError: ``moe`` uses a feature Mixtral lacks (non-softmax router, router bias, GELU,
            shared experts, capacity dropping).
    """
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    unsupported = {
        "router": moe.router_kind != "softmax",
        "router_bias": moe.router.bias is not None,
        "activation": moe.activation != "swiglu",
        "n_shared_experts": moe.n_shared_experts > 0,
        "capacity_factor": moe.capacity_factor is not None,
    }
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        raise ValueError(f"to_mixtral: Mixtral has no equivalent of {', '.join(bad)}")
    config = MixtralConfig(
        hidden_size=moe.d_model,
        intermediate_size=moe.d_hidden,
        num_local_experts=moe.n_experts,
        num_experts_per_tok=moe.top_k,
        hidden_act="silu",
        router_jitter_noise=0.0,
    )
    block = MixtralSparseMoeBlock(config).to(device=moe.w_up.device, dtype=moe.w_up.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        gate_up = torch.cat([moe.w_gate, moe.w_up], dim=2).transpose(1, 2)  # (E, 2H, D)
        block.experts.gate_up_proj.copy_(gate_up)
        block.experts.down_proj.copy_(moe.w_down.transpose(1, 2))  # (E, D, H)
    return block
