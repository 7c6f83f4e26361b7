"""Bounded load on gatelab edge route (127.0.0.1 only): 200 requests, 16 in flight, the top-weighted
expert killed after the 100th reply. None is lost: each gets a 200 with a sane answer or a clear
OpenAI-format error, nothing hangs (an overall timeout), and the router answers afterwards.

The mix (seeded): multiple choice on /v1/completions and on chat with explicit options, free
text streamed and not, and malformed ``x_gatelab`` objects (400 naming the field).
"""

import asyncio
import json
import random
import statistics
import time

import httpx
from test_edge_route import NAMES, OPTIONS, QUESTION, TEXTS, Pool

from gatelab.edge.data import format_prompt

N_REQUESTS, IN_FLIGHT, KILL_AFTER = 200, 16, 100
OVERALL_TIMEOUT_S = 60.0


def requests(rng: random.Random) -> list[tuple[str, str, dict]]:
    """(kind, path, body) for the seeded mix."""
    mc = format_prompt(QUESTION, OPTIONS)
    chat = [{"role": "user", "content": QUESTION}]
    kinds = [
        ("mc", "/v1/completions", {"model": "moe2", "prompt": mc}),
        ("mc", "/v1/chat/completions",
         {"model": "moe2", "messages": chat, "x_gatelab": {"options": OPTIONS}}),
        ("text", "/v1/completions", {"model": "moe2", "prompt": "Once upon", "max_tokens": 8}),
        ("stream", "/v1/chat/completions",
         {"model": "moe2", "messages": [{"role": "user", "content": "Hi"}], "stream": True}),
        ("invalid", "/v1/completions",
         {"model": "moe2", "prompt": mc, "x_gatelab": {"energy_budget": "lots"}}),
    ]  # fmt: skip
    weights = [0.35, 0.2, 0.15, 0.2, 0.1]
    return [rng.choices(kinds, weights)[0] for _ in range(N_REQUESTS)]


async def send(client: httpx.AsyncClient, url: str, kind: str, path: str, body: dict) -> dict:
    """One request; what came back, read to the end (streams included)."""
    start = time.perf_counter()
    out = {"kind": kind}
    if kind == "stream":
        async with client.stream("POST", url + path, json=body) as reply:
            out["status"] = reply.status_code
            events = [line[6:] async for line in reply.aiter_lines() if line.startswith("data: ")]
        out["done"] = events[-1:] == ["[DONE]"]
        chunks = [json.loads(e) for e in events if e != "[DONE]"]
        out["text"] = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        out["failed"] = chunks[0]["x_gatelab"]["failed"] if chunks else {}
    else:
        reply = await client.post(url + path, json=body)
        out["status"], out["body"] = reply.status_code, reply.json()
    out["latency_s"] = time.perf_counter() - start
    return out


def test_200_requests_16_in_flight_one_expert_killed_midway():
    pool = Pool(delay_s=0.01)
    try:
        todo = requests(random.Random(0))
        killed = asyncio.Event()

        async def run() -> list[dict]:
            gate = asyncio.Semaphore(IN_FLIGHT)
            finished = 0
            limits = httpx.Limits(max_connections=IN_FLIGHT)
            async with httpx.AsyncClient(timeout=20, limits=limits) as client:

                async def one(kind, path, body):
                    nonlocal finished
                    async with gate:
                        result = await send(client, pool.url, kind, path, body)
                    finished += 1
                    if finished == KILL_AFTER:  # the top-weighted expert goes away
                        await asyncio.to_thread(pool.servers["alpha"].stop)
                        killed.set()
                    return result

                jobs = [one(*request) for request in todo]
                return await asyncio.wait_for(asyncio.gather(*jobs), OVERALL_TIMEOUT_S)

        start = time.perf_counter()
        results = asyncio.run(run())
        wall = time.perf_counter() - start
        assert killed.is_set() and len(results) == N_REQUESTS
        counts: dict[str, int] = {}
        renormalised = 0
        for r in results:
            counts[f"{r['kind']} {r['status']}"] = counts.get(f"{r['kind']} {r['status']}", 0) + 1
            if r["kind"] == "invalid":
                error = r["body"]["error"]
                assert r["status"] == 400 and error["param"] == "x_gatelab.energy_budget"
                continue
            assert r["status"] == 200, r  # alpha is gone, beta and gamma still answer
            if r["kind"] == "mc":
                ext = r["body"]["x_gatelab"]
                assert ext["answer"] in "ABCD" and abs(sum(ext["weights"].values()) - 1) < 1e-9
                renormalised += "alpha" in ext["failed"]
            elif r["kind"] == "text":
                assert r["body"]["choices"][0]["text"] in (TEXTS[n] for n in NAMES)
            else:
                assert r["done"] and r["text"] in (TEXTS[n] for n in NAMES)
        assert renormalised > 0  # some multiple-choice answers came after the kill
        latencies = sorted(r["latency_s"] for r in results)
        p95 = latencies[int(0.95 * len(latencies)) - 1]
        print(
            f"\nroute load: {N_REQUESTS} requests, {IN_FLIGHT} in flight, alpha killed after "
            f"{KILL_AFTER}: {dict(sorted(counts.items()))}; {renormalised} multiple-choice "
            f"answers renormalised without alpha; wall {wall:.2f} s, median "
            f"{statistics.median(latencies) * 1e3:.0f} ms, p95 {p95 * 1e3:.0f} ms"
        )
        after = httpx.post(
            pool.url + "/v1/completions",
            json={"model": "moe2", "prompt": format_prompt(QUESTION, OPTIONS)},
            timeout=10,
        )
        assert after.status_code == 200 and "alpha" in after.json()["x_gatelab"]["failed"]
        assert httpx.get(pool.url + "/health", timeout=5).json()["load"] == 0  # none leaked
    finally:
        pool.stop()
