r"""What an edge expert's answer costs: the LLM forward FLOPs and the modelled edge devices.

A server reports the FLOPs of each request (:func:`llama_forward_flops`); a
:class:`DeviceProfile` turns FLOPs into a *modelled* delay and energy on a named device
(:data:`PROFILES`). MoE² (arXiv:2501.09410 §III) charges a subset ``S`` of experts
:math:`e(S) = \sum_{n \in S} e_n` and :math:`d(S) = \max_{n \in S} d_n + t_\text{agg}`
(:mod:`gatelab.edge.select`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def llama_forward_flops(
    config: Any, n_layers: int, n_tokens: int, logit_positions: int = 1, n_past: int = 0
) -> int:
    r"""FLOPs of one forward pass over ``T`` tokens with logits for ``P`` positions (default 1).

    .. math::
        F = L\,[2T(D\,d_q + 2D\,d_{kv} + d_q D + 3DH) + 4T(T + T_p) d_q] + 2DVP

    (a multiply-add is 2 FLOPs; attention scores and values over the full T x (T + T_p), as
    torch's counter counts them, ``T_p = n_past`` tokens already in the KV cache; norms and
    activations ignored). ``config`` is a transformers Llama or
    Gemma config (``hidden_size``, ``intermediate_size``, ``vocab_size``, heads, ``head_dim``).
    """
    d, h, v = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    d_q = config.num_attention_heads * head_dim
    d_kv = config.num_key_value_heads * head_dim
    t = n_tokens
    per_layer = 2 * t * (d * d_q + 2 * d * d_kv + d_q * d + 3 * d * h) + 4 * t * (t + n_past) * d_q
    return int(n_layers * per_layer + 2 * d * v * logit_positions)


@dataclass(frozen=True)
class DeviceProfile:
    r"""A modelled edge device: converts FLOPs into delay and energy.

    .. math::
        t_\text{model} = t_\text{net} + F / R,\qquad e_\text{model} = P \cdot F / R

    ``R`` is an *effective* throughput for batch-1 LLM inference (far below the datasheet peak:
    single-query decoding is memory-bound), ``P`` the board power under load, ``t_net`` one
    request's network round trip. Values are assumptions documented per profile, not measurements.
    """

    name: str
    flops_per_s: float  # effective FLOP/s for batch-1 inference
    power_w: float  # power drawn while computing, W
    network_s: float  # request/response round trip, s

    def __post_init__(self) -> None:
        if self.flops_per_s <= 0 or self.power_w < 0 or self.network_s < 0:
            raise ValueError(
                f"DeviceProfile {self.name}: need flops_per_s > 0, power_w, network_s >= 0"
            )

    def delay_s(self, flops: float) -> float:
        """Modelled delay of a request of ``flops`` FLOPs."""
        return self.network_s + flops / self.flops_per_s

    def energy_j(self, flops: float) -> float:
        """Modelled energy of a request of ``flops`` FLOPs."""
        return self.power_w * flops / self.flops_per_s


# Jetson AGX Orin 64GB: 275 INT8 TOPS peak, ~5 TFLOP/s effective FP16 at batch 1, MAXN ~40 W
# under LLM load; Wi-Fi hop ~15 ms. RTX 4090: 82.6 FP32 / 165 FP16 TFLOP/s peak, ~25 TFLOP/s
# effective, ~350 W under load; wired LAN ~4 ms. CPU: an 8-core desktop at ~0.2 TFLOP/s, 65 W.
PROFILES = {
    "jetson-agx-orin": DeviceProfile("jetson-agx-orin", 5e12, 40.0, 0.015),
    "rtx-4090": DeviceProfile("rtx-4090", 25e12, 350.0, 0.004),
    "cpu": DeviceProfile("cpu", 0.2e12, 65.0, 0.002),
}
