"""Plain reference MoE: a Python loop over experts in the style of Hugging Face's Mixtral block.

Independent of gatelab.moe.dispatch: routing weights come from the gate formulas, capacity
dropping is a literal loop in choice-major order (all first choices in token order, then all
second choices, ...), expert choice picks each expert's top-C tokens by a stable sort.
"""

import math

import torch
import torch.nn.functional as F

from gatelab import gates


def expert(x, w_gate, w_up, w_down, e, activation):
    if activation == "swiglu":
        return (F.silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]
    return F.gelu(x @ w_up[e]) @ w_down[e]


def reference_forward(moe, x):
    """Returns (y, balance_loss, z_loss, tokens_per_expert, dropped_fraction)."""
    d, e_count, k = moe.d_model, moe.n_experts, moe.top_k
    flat = x.reshape(-1, d)
    n = flat.shape[0]
    logits = flat @ moe.router.weight.T
    out = torch.zeros_like(flat)
    tokens = torch.zeros(e_count, dtype=torch.long)
    cf = moe.capacity_factor
    if moe.router_kind == "expert_choice":
        c = min(n, max(1, math.ceil((1.0 if cf is None else cf) * n * k / e_count)))
        affinity = torch.softmax(logits, dim=-1)
        taken = set()
        for e in range(e_count):
            idx = torch.sort(affinity[:, e], descending=True, stable=True).indices[:c]
            y = expert(flat[idx], moe.w_gate, moe.w_up, moe.w_down, e, moe.activation)
            out = out.index_add(0, idx, affinity[idx, e, None] * y)
            tokens[e] = c
            taken.update(idx.tolist())
        balance = torch.zeros((), dtype=flat.dtype)
        dropped = 1 - len(taken) / n
    else:
        if moe.router_kind == "softmax":
            weights, indices = gates.topk_softmax(logits, k, moe.router.bias)
            probs = torch.softmax(logits, -1)
        elif moe.router_kind == "noisy":
            std = F.softplus(flat @ moe.router.noise_weight.T)
            weights, indices, _ = gates.noisy_topk(logits, std, k, training=moe.training)
            probs = torch.softmax(logits, -1)
        else:
            weights, indices = gates.sigmoid_topk(logits, k)
            s = torch.sigmoid(logits)
            probs = s / s.sum(-1, keepdim=True)
        counts = torch.bincount(indices.reshape(-1), minlength=e_count).to(flat.dtype)
        balance = e_count * ((counts / (n * k)) * probs.mean(0)).sum()
        keep = torch.ones(n, k, dtype=torch.bool)
        if cf is not None:
            c = max(1, math.ceil(cf * n * k / e_count))
            seen = [0] * e_count
            for j in range(k):
                for t in range(n):
                    e = int(indices[t, j])
                    keep[t, j] = seen[e] < c
                    seen[e] += 1
        for e in range(e_count):
            t_idx, j_idx = torch.where((indices == e) & keep)
            tokens[e] = t_idx.numel()
            if t_idx.numel() == 0:
                continue
            y = expert(flat[t_idx], moe.w_gate, moe.w_up, moe.w_down, e, moe.activation)
            out = out.index_add(0, t_idx, weights[t_idx, j_idx, None] * y)
        dropped = 1 - float(keep.float().mean())
    for s in range(moe.n_shared_experts):
        out = out + expert(
            flat, moe.shared_w_gate, moe.shared_w_up, moe.shared_w_down, s, moe.activation
        )
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    return out.reshape(x.shape), balance, z, tokens, dropped
