r"""How far the 4-bit decode path moves SmolLM2's log-probabilities, and what the Q8_0 head costs.

Runs one English passage (93 tokens) through SmolLM2-135M-Instruct four ways and compares each
with the float32 model (transformers' dequantisation of the GGUF) at every position:

- ``Q8Head``: float32 layers, the head as two 4-bit planes (:class:`gatelab.edge.quant.Q8Head`);
- ``4-bit layers``: the Q4_1 layers as :class:`~gatelab.edge.quant.Int4Linear`, float32 head;
- ``decode path``: both, as ``gatelab edge serve`` decodes.

Prints the mean absolute difference of the log-probability of the actual next token and how
often the most likely token is the same, then the CPU time of one decode step (one sequence,
one thread) with the float32 head and with ``Q8Head``. Run:

    HF_HUB_OFFLINE=1 PYTHONPATH=src .venv/bin/python experiments/edge_decode_head.py
"""

import copy
import time

import torch

from gatelab.edge.generate import new_cache
from gatelab.edge.quant import DecodeHead
from gatelab.edge.served import load_served_models
from gatelab.threads import torch_threads

TEXT = (
    "The history of the Roman Empire began in 27 BC when Augustus became the first emperor. "
    "Over the next centuries the empire grew to cover the Mediterranean world, and its roads, "
    "laws and language shaped Europe for a thousand years. "
) * 2


def compare(name: str, logprobs: torch.Tensor, want: torch.Tensor, ids: torch.Tensor) -> None:
    """Print how far ``logprobs (P, V)`` is from the float32 ``want`` at the tokens ``ids``."""
    nxt = ids[1:, None]  # (P-1, 1)
    moved = (logprobs[:-1].gather(1, nxt) - want[:-1].gather(1, nxt)).abs().mean()
    same = (logprobs.argmax(-1) == want.argmax(-1)).float().mean()
    print(f"{name}: mean |d logprob| of the next token {moved:.4f}; same argmax {same:.3f}")


def step_ms(served, decode, steps: int = 64, repeats: int = 6) -> float:
    """Median CPU milliseconds of one decode step after a short prompt."""
    prompt = torch.tensor([served.encode("Once upon a time, in a small village by the sea,")])
    times = []
    for _ in range(repeats):
        cache = new_cache(len(served.model.model.layers))
        with torch.no_grad():
            token = int(served.model(prompt, cache=cache, use_cache=True).logits[0, -1].argmax())
            start = time.thread_time()
            for _ in range(steps):
                out = decode(torch.tensor([[token]]), cache=cache, use_cache=True)
                token = int(out.logits[0, -1].argmax())
        times.append((time.thread_time() - start) / steps * 1e3)
    return sorted(times)[len(times) // 2]


@torch_threads(1)
def main() -> None:
    """The comparisons and timings of the module docstring."""
    served = load_served_models(["smollm2-135m"])["smollm2-135m"]
    decode = served.decode_model
    if getattr(decode.lm_head, "q8", None) is None:
        raise SystemExit("the GGUF's head is not Q8_0: nothing to compare")
    ids = torch.tensor(served.encode(TEXT))
    with torch.no_grad():
        hidden = served.model.model(ids[None]).last_hidden_state[0]  # (P, D) float32 layers
        want = torch.log_softmax(served.model.lm_head(hidden), -1)
        quant_hidden = decode.model(ids[None]).last_hidden_state[0]  # 4-bit layers
        q8 = decode.lm_head.q8  # the head's Q8_0 planes (DecodeHead uses them for one row)
        compare("Q8Head", torch.log_softmax(q8(hidden), -1), want, ids)
        float_head = served.model.lm_head
        compare("4-bit layers", torch.log_softmax(float_head(quant_hidden), -1), want, ids)
        compare("decode path", torch.log_softmax(q8(quant_hidden), -1), want, ids)
    print(f"over {len(ids) - 1} positions")
    float_head = copy.copy(decode)
    float_head._modules = dict(float_head._modules)
    float_head.lm_head = DecodeHead(served.model.lm_head.weight)
    print(f"decode step, CPU ms: float32 head {step_ms(served, float_head):.2f}, "
          f"Q8Head {step_ms(served, decode):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
