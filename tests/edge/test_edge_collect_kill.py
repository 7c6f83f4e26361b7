"""``edge collect`` killed with SIGKILL at every point, inside a cache line's write included,
then resumed: the cache is byte-identical to an uninterrupted run (nothing lost, no duplicate).

The collecting process is a fork of the test process (no re-import: fast) that kills itself at
the n-th cache line, before writing it or after writing half of it. The experts are a fake
in-process server (httpx.MockTransport) answering deterministically; the wall clock the client
measures is frozen so the records are reproducible.
"""

import json
import os
import random
import signal
import zlib

import httpx
import pytest

from gatelab.edge import client as client_mod
from gatelab.edge import collect as collect_mod
from gatelab.edge.client import EdgeExpert
from gatelab.edge.costs import PROFILES
from gatelab.edge.data import MCQuestion

QUESTIONS = [
    MCQuestion(f"k/{i}", "toy", "toy", f"Question {i}?", ("one", "two", "three", "four"), i % 4)
    for i in range(4)
]
NAMES = ["alpha", "beta"]
POINTS = [(line, inside) for line in range(1, 9) for inside in (False, True)]  # 8 cache lines


def _fake_server(request):
    """An echo server: the logprob of each prompt token depends on its text only."""
    body = json.loads(request.content)
    choices = []
    for i, prompt in enumerate(body["prompt"]):
        values = [None] + [
            -(zlib.crc32(prompt[:k].encode()) % 97) / 10 for k in range(1, len(prompt))
        ]
        logprobs = {
            "tokens": list(prompt),
            "text_offset": list(range(len(prompt))),
            "token_logprobs": values,
        }
        choices.append({"index": i, "text": prompt, "logprobs": logprobs})
    usage = {"prompt_tokens": 40, "completion_tokens": 0}
    return httpx.Response(
        200, json={"choices": choices, "usage": usage, "x_gatelab": {"flops": 1e9}}
    )


def _experts():
    transport = httpx.MockTransport(_fake_server)
    url = "http://127.0.0.1:9"
    return [
        EdgeExpert(n, url, PROFILES["cpu"], backend="gatelab", transport=transport) for n in NAMES
    ]


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch):
    monkeypatch.setattr(client_mod.time, "perf_counter", lambda: 0.0)


def _killed_run(cache, line, inside):
    """Fork; the child collects and SIGKILLs itself at cache line ``line``. Returns its status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        try:
            written = 0
            append = collect_mod._append

            def dying_append(out, record):
                nonlocal written
                written += 1
                if written == line:
                    if inside:  # half the line reaches the file, then the process dies
                        text = json.dumps(record) + "\n"
                        out.write(text[: len(text) // 2])
                        out.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
                append(out, record)

            collect_mod._append = dying_append
            collect_mod.collect(_experts(), QUESTIONS, cache)
        finally:
            os._exit(3)  # reached only if the kill did not happen
    _, status = os.waitpid(pid, 0)
    return status


def _check(tmp_path, points):
    reference = tmp_path / "reference.jsonl"
    counts = collect_mod.collect(_experts(), QUESTIONS, reference)
    assert counts == {"asked": 8, "ok": 8, "missing": 0, "errors": {}}
    want = reference.read_bytes()
    lines = want.decode().splitlines()
    assert len({(json.loads(x)["qid"], json.loads(x)["expert"]) for x in lines}) == 8
    for line, inside in points:
        cache = tmp_path / f"killed-{line}-{inside}.jsonl"
        status = _killed_run(cache, line, inside)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
        written = cache.read_bytes() if cache.exists() else b""
        assert want.startswith(written) and written.count(b"\n") == line - 1
        resumed = collect_mod.collect(_experts(), QUESTIONS, cache)
        assert resumed["asked"] == len(lines) - (line - 1) and resumed["missing"] == 0
        assert cache.read_bytes() == want, (line, inside)


def test_killed_at_random_points_then_resumed_is_byte_identical(tmp_path):
    _check(tmp_path, random.Random(0).sample(POINTS, 3) + [(5, True)])


@pytest.mark.slow
def test_killed_at_every_point_then_resumed_is_byte_identical(tmp_path):
    _check(tmp_path, POINTS)
