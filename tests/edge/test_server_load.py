"""Bounded load on gatelab edge serve (127.0.0.1, tiny model): 200 requests, 16 in flight, valid,
invalid and huge mixed. Only 503 may be a 5xx, every error is OpenAI's format, memory stays
bounded and the server still answers afterwards."""

import asyncio
import json
import random
import statistics
import time

import httpx
import psutil

from gatelab.edge.engine import Engine
from gatelab.edge.served import load_served_models
from gatelab.edge.server import BackgroundServer, build_app

N_REQUESTS, IN_FLIGHT = 200, 16
JSON = {"content-type": "application/json"}


def requests(rng):
    """(kind, path, body bytes, headers) for a mixed load, seeded."""
    valid = [
        ("/v1/completions", {"model": "tiny-random", "prompt": "Hello there", "max_tokens": 8}),
        ("/v1/completions", {"model": "tiny-random", "prompt": ["Q: a?\nA: b", "Q: a?\nA: c"],
                             "max_tokens": 0, "echo": True, "logprobs": 1}),
        ("/v1/chat/completions", {"model": "tiny-random-chat", "max_tokens": 6,
                                  "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"model": "tiny-random", "prompt": "Once", "max_tokens": 6,
                             "stream": True, "n": 2, "temperature": 1.0, "seed": 1}),
    ]  # fmt: skip
    invalid = [
        b'{"model": "tiny-random", "prompt": "x", "temperature": NaN}',
        b'{"model": ["tiny-random"], "prompt": "x"}',
        b'{"model": "tiny-random-chat", "messages": [{"content": "no role"}]}',
        b"[" * 5000 + b"]" * 5000,
        b'{"model": "tiny-random", "prompt": "x", "frequency_penalty": 2}',
        b'{"model": "nope", "prompt": "x"}',
        b"{not json",
    ]
    out = []
    for i in range(N_REQUESTS):
        r = rng.random()
        if r < 0.5:
            path, body = valid[i % len(valid)]
            out.append(("valid", path, json.dumps(body).encode(), JSON))
        elif r < 0.8:
            out.append(("invalid", "/v1/completions", invalid[i % len(invalid)], JSON))
        elif r < 0.85:
            out.append(("invalid", "/v1/completions", b"{}", {}))  # no Content-Type
        elif r < 0.93:  # over the 1 MiB body limit
            body = {"model": "tiny-random", "prompt": "x" * (1 << 20 + 1)}
            out.append(("huge", "/v1/completions", json.dumps(body).encode(), JSON))
        else:  # within the body limit, past the 4096-token context
            body = {"model": "tiny-random", "prompt": "y" * 6000, "echo": True, "max_tokens": 0}
            out.append(("huge", "/v1/completions", json.dumps(body).encode(), JSON))
    return out


async def drive(url, load):
    gate = asyncio.Semaphore(IN_FLIGHT)
    async with httpx.AsyncClient(timeout=120) as client:

        async def one(kind, path, body, headers):
            async with gate:
                start = time.perf_counter()
                reply = await client.post(url + path, content=body, headers=headers)
                seconds = time.perf_counter() - start
                if reply.status_code != 200:
                    error = reply.json()["error"]  # OpenAI's error format, always
                    assert error["message"] and error["type"], error
                elif body and b'"stream": true' in body:
                    assert reply.text.rstrip().endswith("data: [DONE]")
                return kind, reply.status_code, seconds

        return await asyncio.gather(*(one(*r) for r in load))


def test_bounded_load_mixed_valid_invalid_huge(capsys):
    models = load_served_models(["tiny-random", "tiny-random-chat"])
    process = psutil.Process()
    engine = Engine(max_batch=8, max_queue=IN_FLIGHT)  # 16 in flight always fit: no 503
    with BackgroundServer(build_app(models, engine)) as server:
        asyncio.run(drive(server.url, requests(random.Random(1))[:20]))  # warm-up
        rss_before = process.memory_info().rss
        start = time.perf_counter()
        results = asyncio.run(drive(server.url, requests(random.Random(0))))
        wall = time.perf_counter() - start
        rss_after = process.memory_info().rss
        health = httpx.get(server.url + "/health").json()
        ok = {"model": "tiny-random", "prompt": "still there?", "max_tokens": 2}
        assert httpx.post(server.url + "/v1/completions", json=ok).status_code == 200
    statuses = [s for _, s, _ in results]
    assert all(s < 500 or s == 503 for s in statuses), sorted(set(statuses))
    assert {s for k, s, _ in results if k == "invalid"} <= {400, 404, 415}
    assert {s for k, s, _ in results if k == "huge"} <= {400, 413}
    valid = [(s, t) for k, s, t in results if k == "valid"]
    served = [t for s, t in valid if s == 200]
    assert {s for s, _ in valid} == {200}
    p95 = statistics.quantiles(served, n=20)[-1]
    grown = (rss_after - rss_before) / 2**20
    assert grown < 300, grown
    assert health["status"] == "ok" and not health["load"]["decoding"]
    with capsys.disabled():
        print(
            f"\nload: {N_REQUESTS} requests, {IN_FLIGHT} in flight, {wall:.1f} s; "
            f"valid {len(served)}/{len(valid)} served, "
            f"p95 {p95:.2f} s; RSS +{grown:.0f} MB; statuses {sorted(set(statuses))}"
        )
