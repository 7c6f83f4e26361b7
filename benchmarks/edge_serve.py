"""gatelab edge serve vs llama.cpp's llama-server vs gatelab without a KV cache, side by side.

Same GGUF (SmolLM2-135M-Instruct Q4_1), one thread each, one run. Each server is a subprocess
on 127.0.0.1 and gets the same 8 completion requests (32 tokens, greedy), first one at a time,
then all 8 at once; the two servers alternate, twice, and the better repeat is kept (the machine
is shared). Reported per server: generation tokens/s (completion tokens over wall time),
tokens per second of the server process's CPU time (insensitive to other load), the p50/p95
latency of the 8 concurrent requests, and resident memory after the run. "gatelab, no cache"
is what gatelab's server did before its engine: the whole sequence re-run for every token, one
request at a time behind a lock; it runs in this process (same thread count) and its
concurrent latencies are the completion times of the 8 requests served one after another.
"gatelab, float32 decode" is the engine with ``--float32-decode`` (decode steps in float32
instead of the GGUF's 4-bit blocks).

llama-server: :func:`gatelab.edge.llama_server.find_llama_server` (``GATELAB_LLAMA_SERVER``,
``tools/llama-server/`` from ``make llama-server``, then ``PATH``); llama.cpp is skipped, with the
reason, when none is found or the binary cannot run on this CPU. Writes
``runs/bench/edge_serve.json``.
"""

import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import torch

from gatelab.edge.llama_server import LlamaServer, find_llama_server, free_port, smollm2_gguf

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
N_REQUESTS, MAX_TOKENS, REPEATS = 8, 32, 2
PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "The three most important inventions of the last century are",
    "Here is a short recipe for tomato soup:",
    "The history of the Roman Empire began",
    "A good way to learn a new language is",
    "The weather on Mars is very different from Earth because",
    "My favourite book is about a detective who",
    "To build a wooden table you need",
]


def llama_server_binary():
    try:
        return find_llama_server()  # GATELAB_LLAMA_SERVER, ./tools/llama-server/, PATH
    except FileNotFoundError:  # GATELAB_LLAMA_SERVER names no executable: skip llama.cpp
        return None


def wait_ready(url, process, timeout_s=300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


def start_gatelab(*flags):
    port = free_port()
    cmd = [sys.executable, "-m", "gatelab.cli", "edge", "serve", "--model", MODEL, "--threads",
           "1", "--port", str(port), "--max-batch", str(N_REQUESTS), *flags]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, f"http://127.0.0.1:{port}"


def start_llama(binary, gguf):
    """llama-server, ready; raises ConnectionError naming why not (SIGILL: built elsewhere)."""
    server = LlamaServer(gguf, alias=MODEL, binary=binary, threads=1, slots=N_REQUESTS,
                         ctx=1024 * N_REQUESTS)  # fmt: skip
    server.start(timeout_s=300)
    return server.process, server.url


async def one(client, url, prompt):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    start = time.perf_counter()
    reply = await client.post(url + "/v1/completions", json=body, timeout=600)
    reply.raise_for_status()
    return time.perf_counter() - start, reply.json()["usage"]["completion_tokens"]


async def load(url, concurrent):
    async with httpx.AsyncClient() as client:
        start = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one(client, url, p) for p in PROMPTS))
        else:
            results = [await one(client, url, p) for p in PROMPTS]
        wall = time.perf_counter() - start
    return wall, [r[0] for r in results], sum(r[1] for r in results)


def measure(url, process, concurrent):
    proc = psutil.Process(process.pid)
    cpu = proc.cpu_times()
    wall, latencies, tokens = asyncio.run(load(url, concurrent))
    after = proc.cpu_times()
    cpu_s = (after.user + after.system) - (cpu.user + cpu.system)
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "tok_cpu_s": tokens / cpu_s,
            "latencies": sorted(latencies)}  # fmt: skip


def p95(values):
    return (
        statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) > 1 else values[0]
    )


def no_cache_baseline():
    """The pre-engine server loop: full recompute per token, requests one after another."""
    from gatelab.edge.weights import load_smollm2

    torch.set_num_threads(1)
    tokenizer, model = load_smollm2()
    ends = model.generation_config.eos_token_id
    eos = {tokenizer.eos_token_id, *([ends] if isinstance(ends, int) else ends or [])}
    finished, tokens, cpu0, wall0 = [], 0, time.thread_time(), time.perf_counter()
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer(prompt).input_ids])
            for _ in range(MAX_TOKENS):
                logits = model(ids, use_cache=False, logits_to_keep=1).logits[0, -1]
                token = int(torch.argmax(logits))
                ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
                tokens += 1
                if token in eos:
                    break
            finished.append(time.perf_counter() - wall0)
    wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
    alone = [b - a for a, b in zip([0.0, *finished], finished, strict=False)]
    seq = {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "tok_cpu_s": tokens / cpu,
           "latencies": alone}  # fmt: skip
    conc = dict(seq, latencies=finished)  # behind one lock: request i waits for the i-1 before
    rss = psutil.Process().memory_info().rss
    return {"sequential": seq, "concurrent": conc, "rss_mb": rss / 2**20}


def main():
    try:
        gguf = smollm2_gguf()
    except FileNotFoundError as error:
        print(f"skip: {error}")
        return
    servers = {
        "gatelab": start_gatelab(),
        "gatelab, float32 decode": start_gatelab("--float32-decode"),
    }
    binary = llama_server_binary()
    skipped = None
    if binary is None:
        skipped = "llama-server not found (set GATELAB_LLAMA_SERVER or build it, see docs/edge.md)"
    else:
        try:
            servers["llama.cpp"] = start_llama(binary, gguf)
        except ConnectionError as error:
            skipped = str(error)
    results = {}
    try:
        for process, url in servers.values():
            wait_ready(url, process)
            asyncio.run(load(url, False))  # warm-up: first-request costs are not measured
        for _ in range(REPEATS):
            for concurrent in (False, True):
                for name, (process, url) in servers.items():
                    got = measure(url, process, concurrent)
                    key = "concurrent" if concurrent else "sequential"
                    best = results.setdefault(name, {}).get(key)
                    if best is None or got["wall_s"] < best["wall_s"]:
                        results[name][key] = got
        for name, (process, _) in servers.items():
            proc = psutil.Process(process.pid)
            results[name]["rss_mb"] = (
                sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20
            )
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=30)
    results["gatelab, no cache"] = no_cache_baseline()

    print(f"{N_REQUESTS} completions of up to {MAX_TOKENS} tokens, greedy, 1 thread, {gguf.name}")
    print("| server | tok/s sequential | tok/CPU-s sequential | tok/s 8 concurrent | "
          "p50 / p95 latency, 8 concurrent (s) | RSS (MB) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        seq, conc = r["sequential"], r["concurrent"]
        print(f"| {name} | {seq['tok_s']:.1f} | {seq['tok_cpu_s']:.1f} | {conc['tok_s']:.1f} | "
              f"{statistics.median(conc['latencies']):.2f} / {p95(conc['latencies']):.2f} | "
              f"{r['rss_mb']:.0f} |")  # fmt: skip
    if skipped:
        print(f"llama.cpp: skipped: {skipped}")
    elif "llama.cpp" in results:
        g, ll = results["gatelab"], results["llama.cpp"]
        speed = ll["sequential"]["tok_s"] / g["sequential"]["tok_s"]
        cpu = ll["sequential"]["tok_cpu_s"] / g["sequential"]["tok_cpu_s"]
        latency = p95(g["concurrent"]["latencies"]) / p95(ll["concurrent"]["latencies"])
        print(f"llama.cpp / gatelab: sequential tok/s {speed:.2f}x (per CPU-s {cpu:.2f}x), "
              f"p95 latency of 8 concurrent: gatelab / llama.cpp {latency:.2f}x")  # fmt: skip
    out = ROOT / "runs" / "bench" / "edge_serve.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "torch": torch.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count(), "llama_server": str(binary),
            "skipped": skipped, "requests": N_REQUESTS, "max_tokens": MAX_TOKENS,
            "repeats": REPEATS, "load_average": os.getloadavg()}  # fmt: skip
    out.write_text(json.dumps({"config": meta, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
