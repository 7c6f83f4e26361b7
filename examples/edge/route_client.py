"""Ask the MoE² router (``gatelab edge route``) with the official openai client.

Against a running router (``gatelab edge route --run runs/edge/quick --experts experts.yaml``):

    python examples/edge/route_client.py --url http://127.0.0.1:8100 --n 20 --energy-budget 1

Or all in one process: the demo pool served on 127.0.0.1 (weights loaded once, as
``gatelab edge collect`` does) and the router in front of it:

    python examples/edge/route_client.py --local --run runs/edge/quick --n 20

It asks ``--n`` multiple-choice questions of the quick test split (the prompt in
``format_prompt``'s layout, so the router recognises them), prints each answer with its gate
weights and modelled costs, then accuracy and the measured latency, then one free-text reply
streamed from the top-weighted expert.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import openai

from gatelab.edge.data import LETTERS, format_prompt, split_questions
from gatelab.edge.eval import SweepConfig, questions_for


def ask_all(client: openai.OpenAI, n: int, budgets: dict) -> None:
    """The multiple-choice questions, then one streamed free-text reply."""
    test = split_questions(questions_for(SweepConfig(quick=True)), seed=0)["test"][:n]
    extra = {"x_gatelab": budgets} if budgets else None
    correct, latencies, failures = 0, [], 0
    for q in test:
        start = time.perf_counter()
        try:
            reply = client.completions.create(
                model="moe2", prompt=format_prompt(q.question, q.options), extra_body=extra
            )
        except openai.APIStatusError as error:  # 400 (budgets), 502 (experts down), 503 (busy)
            failures += 1
            print(f"{q.qid}: HTTP {error.status_code}: {error.body['message']}")
            continue
        latencies.append(time.perf_counter() - start)
        ext = reply.x_gatelab
        answer = reply.choices[0].text
        correct += answer == LETTERS[q.answer]
        weights = ", ".join(f"{k} {v:.2f}" for k, v in ext["weights"].items())
        print(
            f"{q.qid}: {answer} (gold {LETTERS[q.answer]}) [{ext['category']}: {weights}] "
            f"modelled {ext['modelled_energy_j']:.3f} J {ext['modelled_delay_s'] * 1e3:.1f} ms, "
            f"measured {ext['measured_s'] * 1e3:.0f} ms"
            + (f", failed: {sorted(ext['failed'])}" if ext["failed"] else "")
        )
    if latencies:
        print(
            f"{len(latencies)} answered, {failures} refused: "
            f"accuracy {correct / len(latencies):.3f}; "
            f"latency median {statistics.median(latencies) * 1e3:.0f} ms, "
            f"max {max(latencies) * 1e3:.0f} ms (measured here, client side)"
        )
    prompt = "The capital of France is"
    stream = client.completions.create(
        model="moe2", prompt=prompt, max_tokens=12, stream=True, extra_body=extra
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    print(f"free text from {chunks[0].x_gatelab['expert']}: {text!r}")


def main() -> None:
    """Parse the flags; ask a running router, or serve the pool and the router here first."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8100", help="A running router.")
    parser.add_argument("--local", action="store_true", help="Serve the demo pool + router here.")
    parser.add_argument("--run", default="runs/edge/quick", help="Sweep folder (with --local).")
    parser.add_argument("--n", type=int, default=20, help="Questions to ask.")
    parser.add_argument("--energy-budget", type=float, help="J per query (modelled).")
    parser.add_argument("--delay-budget", type=float, help="s per query (modelled).")
    args = parser.parse_args()
    budgets = {
        k: v
        for k, v in (("energy_budget", args.energy_budget), ("delay_budget", args.delay_budget))
        if v is not None
    }
    if not args.local:
        ask_all(openai.OpenAI(base_url=args.url + "/v1", api_key="unused"), args.n, budgets)
        return
    from gatelab.edge.collect import start_local_pool
    from gatelab.edge.route import create_route_app
    from gatelab.edge.router import load_router
    from gatelab.edge.server import BackgroundServer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    state = load_router(args.run)
    start = time.perf_counter()
    servers, experts = start_local_pool()
    print(f"demo pool served in {time.perf_counter() - start:.0f} s: {[e.name for e in experts]}")
    try:
        with BackgroundServer(create_route_app(state, experts)) as routed:
            ask_all(openai.OpenAI(base_url=routed.url + "/v1", api_key="unused"), args.n, budgets)
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    main()
