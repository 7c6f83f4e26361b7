"""gatelab edge route through the official openai client, against fake expert servers on 127.0.0.1.

Three fake experts (tiny FastAPI apps under uvicorn) answer continuation scoring with fixed
log-probabilities and report fixed FLOPs; free text is a fixed sentence per expert, streamed
word by word. The router state is hand-made: the gate's logits are its output bias (weights
zeroed), so the reference weights are a softmax of known numbers; the best subset under loose
budgets is {alpha, beta}. References: numpy softmaxes, the DeviceProfile closed form, the fake
servers' own texts, and :func:`gatelab.edge.data.format_prompt` for the prompt parser.
"""

import asyncio
import dataclasses
import json
import math
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from gatelab import runs
from gatelab.edge import router
from gatelab.edge.client import EdgeExpert
from gatelab.edge.costs import PROFILES
from gatelab.edge.data import format_prompt
from gatelab.edge.llama_server import free_port
from gatelab.edge.model import EdgeGate, GateConfig
from gatelab.edge.route import create_route_app, parse_multiple_choice
from gatelab.edge.server import BackgroundServer

NAMES = ["alpha", "beta", "gamma"]
BIAS = [0.5, -0.2, 0.1]  # gate logits, whatever the question
LOGPROBS = {  # per expert, the logprob of each option's single continuation token
    "alpha": [-1.0, -0.2, -3.0, -2.0],
    "beta": [-0.5, -2.5, -0.1, -1.5],
    "gamma": [-2.0, -2.0, -2.0, -0.1],
}
FLOPS = {"alpha": 1e9, "beta": 3e9, "gamma": 2e9}
TEXTS = {n: f"{n} says: the quick brown fox jumps over the lazy dog." for n in NAMES}
PROFILE = PROFILES["cpu"]
AGGREGATE_S = 0.001
QUESTION, OPTIONS = "Which one is it?", ["red", "green", "blue", "black"]


def fake_expert_app(name: str, delay_s: float = 0.0) -> FastAPI:
    """An OpenAI-compatible expert: echo scoring with LOGPROBS, free text TEXTS[name].

    ``delay_s``: before every reply, and between the words of a stream.
    """
    app = FastAPI()

    def text_reply(body: dict, chat: bool) -> dict:
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": TEXTS[name]}}
        else:
            choice = {"index": 0, "text": TEXTS[name], "logprobs": None}
        reply = {"id": "x", "object": "chat.completion" if chat else "text_completion"}
        usage = {"prompt_tokens": 3, "completion_tokens": 10, "total_tokens": 13}
        return reply | {
            "created": 0,
            "model": body["model"],
            "choices": [choice | {"finish_reason": "stop"}],
            "usage": usage,
            "x_gatelab": {"flops": FLOPS[name]},
        }

    def stream(body: dict, chat: bool) -> StreamingResponse:
        async def events():
            for i, word in enumerate(TEXTS[name].split(" ")):
                await asyncio.sleep(delay_s)
                piece = word if i == 0 else " " + word
                if chat:
                    choice = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                else:
                    choice = {"index": 0, "text": piece, "finish_reason": None}
                kind = "chat.completion.chunk" if chat else "text_completion"
                chunk = {"id": "x", "object": kind, "created": 0, "model": body["model"]}
                yield f"data: {json.dumps(chunk | {'choices': [choice]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        await asyncio.sleep(delay_s)
        if not body.get("echo"):
            return stream(body, False) if body.get("stream") else text_reply(body, False)
        choices = [
            {
                "index": i,
                "text": p,
                "logprobs": {
                    "tokens": [p[-1]],
                    "text_offset": [len(p) - 1],  # one token: the option's last character
                    "token_logprobs": [LOGPROBS[name][i]],
                },
            }
            for i, p in enumerate(body["prompt"])
        ]
        return {"choices": choices, "x_gatelab": {"flops": FLOPS[name]}}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        await asyncio.sleep(delay_s)
        return stream(body, True) if body.get("stream") else text_reply(body, True)

    return app


def router_state() -> router.RouterState:
    gate = EdgeGate(GateConfig(n_experts=3, d_hidden=4)).double().eval()
    with torch.no_grad():
        gate.out.bias.copy_(torch.tensor(BIAS))  # out.weight is zero: logits == BIAS
    quality = {"0": -0.9, "1": -0.9, "2": -1.2, "0,1": -0.5, "0,2": -0.8, "1,2": -0.85}
    quality["0,1,2"] = -0.6  # the hull picks {0, 1}
    table = {
        "energy_j": [PROFILE.energy_j(FLOPS[n]) for n in NAMES],
        "delay_s": [PROFILE.delay_s(FLOPS[n]) for n in NAMES],
        "base_quality": quality,
        "centroid": [1.0] + [0.0] * 383,
    }
    other = table | {"centroid": [0.0, 1.0] + [0.0] * 382}
    return router.RouterState(gate, NAMES, 2, AGGREGATE_S, {"toy": table, "other": other})


def fixed_embedding(text: str) -> np.ndarray:
    return np.eye(1, 384, dtype=np.float32)[0]  # nearest centroid: "toy"


def expert(name: str, url: str) -> EdgeExpert:
    return EdgeExpert(name, url, PROFILE, backend="gatelab", backoff_s=0.0, timeout_s=5.0)


class Pool:
    """Fake experts on 127.0.0.1 (``down``: a closed port; ``apps``: other servers for some)
    and the router in front of them."""

    def __init__(self, down=(), delay_s: float = 0.0, apps=None, **route_kwargs) -> None:
        apps = {n: fake_expert_app(n, delay_s) for n in NAMES} | (apps or {})
        self.servers = {n: BackgroundServer(apps[n]).start() for n in NAMES if n not in down}
        urls = {n: s.url for n, s in self.servers.items()}
        urls |= {n: f"http://127.0.0.1:{free_port()}" for n in down}
        self.experts = [expert(n, urls[n]) for n in NAMES]
        app = create_route_app(router_state(), self.experts, embed=fixed_embedding, **route_kwargs)
        self.router = BackgroundServer(app).start()
        self.url = self.router.url
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)

    def stop(self) -> None:
        self.router.stop()
        for server in self.servers.values():
            server.stop()


@pytest.fixture(scope="module")
def pool():
    running = Pool()
    yield running
    running.stop()


def softmax(values) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    e = np.exp(values - values.max())
    return e / e.sum()


def reference(answered: list[str]) -> tuple[dict, np.ndarray, float, float]:
    """Weights, mixture, modelled energy and delay of the experts that answered (closed form)."""
    w = softmax([BIAS[NAMES.index(n)] for n in answered])
    mixed = sum(wi * softmax(LOGPROBS[n]) for wi, n in zip(w, answered, strict=True))
    energy = sum(PROFILE.power_w * FLOPS[n] / PROFILE.flops_per_s for n in answered)
    delay = max(PROFILE.network_s + FLOPS[n] / PROFILE.flops_per_s for n in answered)
    return dict(zip(answered, w, strict=True)), mixed, energy, delay + AGGREGATE_S


def test_multiple_choice_completion_is_the_gate_combined_answer(pool):
    reply = pool.client.completions.create(
        model="moe2", prompt=format_prompt(QUESTION, OPTIONS), max_tokens=1
    )
    ext = reply.x_gatelab
    weights, mixed, energy, delay = reference(["alpha", "beta"])
    assert reply.choices[0].text == "ABCD"[int(np.argmax(mixed))]
    assert ext["kind"] == "multiple_choice" and ext["category"] == "toy"
    assert ext["subset"] == ["alpha", "beta"] and ext["failed"] == {}
    assert sum(ext["weights"].values()) == pytest.approx(1.0)
    assert ext["weights"] == pytest.approx(weights)
    assert ext["probs"] == pytest.approx(mixed.tolist())
    assert ext["modelled_energy_j"] == pytest.approx(energy)
    assert ext["modelled_delay_s"] == pytest.approx(delay)
    assert ext["measured_s"] > 0 and all(v["measured_s"] > 0 for v in ext["experts"].values())
    assert ext["energy_budget"] is None  # unbounded: the server's default


def test_chat_with_explicit_options_and_budgets(pool):
    # 0.5 J admits alpha alone (0.325 J; beta 0.975 J, gamma 0.65 J)
    reply = pool.client.chat.completions.create(
        model="moe2",
        messages=[{"role": "user", "content": QUESTION}],
        extra_body={"x_gatelab": {"options": OPTIONS, "energy_budget": 0.5, "category": "toy"}},
    )
    ext = reply.x_gatelab
    weights, mixed, energy, _ = reference(["alpha"])
    assert ext["subset"] == ["alpha"] and ext["weights"] == pytest.approx(weights)
    assert reply.choices[0].message.content == "ABCD"[int(np.argmax(mixed))]
    assert ext["modelled_energy_j"] == pytest.approx(energy) and ext["energy_budget"] == 0.5


def test_free_text_streams_the_top_weighted_expert(pool):
    stream = pool.client.chat.completions.create(
        model="moe2", messages=[{"role": "user", "content": "Tell me a story."}], stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == TEXTS["alpha"]  # alpha's bias 0.5 > beta's -0.2
    ext = chunks[0].x_gatelab
    assert ext["kind"] == "free_text" and ext["expert"] == "alpha"
    assert ext["weights"] == pytest.approx(reference(["alpha", "beta"])[0])


def test_multiple_choice_streamed_is_one_content_chunk(pool):
    chunks = list(
        pool.client.chat.completions.create(
            model="moe2",
            messages=[{"role": "user", "content": format_prompt(QUESTION, OPTIONS)}],
            stream=True,
        )
    )
    _, mixed, _, _ = reference(["alpha", "beta"])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "ABCD"[int(mixed.argmax())]
    assert chunks[0].x_gatelab["kind"] == "multiple_choice"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_free_text_completion_not_streamed(pool):
    reply = pool.client.completions.create(model="moe2", prompt="Once upon a time", max_tokens=9)
    assert reply.choices[0].text == TEXTS["alpha"]
    ext = reply.x_gatelab
    assert ext["modelled_energy_j"] == pytest.approx(PROFILE.energy_j(FLOPS["alpha"]))
    assert ext["expert_x_gatelab"] == {"flops": FLOPS["alpha"]}


def test_one_expert_down_renormalises_and_reports_it():
    running = Pool(down={"alpha"})
    try:
        reply = running.client.completions.create(
            model="moe2", prompt=format_prompt(QUESTION, OPTIONS)
        )
        ext = reply.x_gatelab
        weights, mixed, energy, delay = reference(["beta"])
        assert ext["subset"] == ["alpha", "beta"]  # planned with alpha, which then failed
        assert ext["weights"]["beta"] == pytest.approx(1.0)
        assert ext["weights"]["alpha"] == 0.0
        assert "connection refused" in ext["failed"]["alpha"]
        assert reply.choices[0].text == "ABCD"[int(np.argmax(mixed))]
        assert ext["modelled_energy_j"] == pytest.approx(energy)
        assert ext["modelled_delay_s"] == pytest.approx(delay)
        # free text falls back to the next weighted expert
        stream = running.client.completions.create(model="moe2", prompt="Hi", stream=True)
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks) == TEXTS["beta"]
        assert "connection refused" in chunks[0].x_gatelab["failed"]["alpha"]
    finally:
        running.stop()


def test_all_down_is_502_naming_every_cause():
    running = Pool(down=set(NAMES))
    try:
        for call in (
            lambda: running.client.completions.create(
                model="moe2", prompt=format_prompt(QUESTION, OPTIONS)
            ),
            lambda: running.client.completions.create(model="moe2", prompt="free text"),
        ):
            with pytest.raises(openai.APIStatusError) as error:
                call()
            assert error.value.status_code == 502
            message = error.value.body["message"]
            assert message.startswith("all selected experts failed")
            for name in NAMES:  # alpha, beta planned; gamma tried when planning again
                assert f"expert {name} at http://127.0.0.1:" in message
            assert error.value.body["code"] == "experts_failed"
    finally:
        running.stop()


def answering(status: int, text: str) -> FastAPI:
    """A server answering every POST with ``status`` and ``text``."""
    app = FastAPI()

    @app.post("/v1/{path:path}")
    async def any_post(path: str):
        return PlainTextResponse(text, status)

    return app


def test_free_text_falls_back_past_a_malformed_reply():
    running = Pool(apps={"alpha": answering(200, "not json")})
    try:
        reply = running.client.completions.create(model="moe2", prompt="Hello")
        assert reply.choices[0].text == TEXTS["beta"]
        assert "bad response: no 'choices'" in reply.x_gatelab["failed"]["alpha"]
    finally:
        running.stop()


def test_free_text_refused_by_every_expert_is_400():
    running = Pool(apps={n: answering(400, "max_tokens is too large") for n in NAMES})
    try:
        with pytest.raises(openai.BadRequestError) as error:
            running.client.completions.create(model="moe2", prompt="Hello")
        message = error.value.body["message"]
        assert message.startswith("every selected expert refused the request: expert alpha")
        assert message.count("HTTP 400: max_tokens is too large") == 3
    finally:
        running.stop()


@pytest.mark.parametrize(
    "extension, param, words",
    [
        ({"energy_budget": "cheap"}, "x_gatelab.energy_budget", "valid number"),
        ({"delay_budget": -1.0}, "x_gatelab.delay_budget", "greater than or equal to 0"),
        ({"budget": 1.0}, "x_gatelab.budget", "not supported"),
        ({"options": ["a", "b", "c"]}, "x_gatelab.options", "at least 4"),
        ({"category": "nope"}, "x_gatelab.category", "unknown category 'nope'"),
        ({"energy_budget": 0.01}, "x_gatelab.energy_budget", "fits no expert"),
        ({"delay_budget": 0.001}, "x_gatelab.delay_budget", "fits no expert"),
        ("fast", "x_gatelab", "valid dictionary"),
    ],
)
def test_malformed_x_gatelab_is_400_naming_the_field(pool, extension, param, words):
    body = {"model": "moe2", "prompt": format_prompt(QUESTION, OPTIONS), "x_gatelab": extension}
    reply = httpx.post(pool.url + "/v1/completions", json=body, timeout=10)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_other_refusals(pool):
    post = lambda body: httpx.post(pool.url + "/v1/completions", json=body, timeout=10)  # noqa: E731
    mc = format_prompt(QUESTION, OPTIONS)
    assert post({"model": "gpt-4", "prompt": mc}).status_code == 404
    reply = post({"model": "moe2", "prompt": mc, "n": 2})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "n"
    reply = post({"model": "moe2", "prompt": mc, "max_tokens": "1"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "max_tokens"


def test_parse_multiple_choice_inverts_format_prompt():
    assert parse_multiple_choice(format_prompt(QUESTION, OPTIONS)) == (QUESTION, OPTIONS)
    loose = "What is 2+2?\n(A) 3\n(B) 4\nC) 5\nD. 22"
    assert parse_multiple_choice(loose) == ("What is 2+2?", ["3", "4", "5", "22"])
    assert parse_multiple_choice("A. x\nB. y\nC. z\nD. w") is None  # no question
    assert parse_multiple_choice("Q?\nA. x\nB. y\nD. z\nC. w") is None  # out of order
    assert parse_multiple_choice("Q?\nA. x\nB. y\nC. z\nD. w\nE. v") is None  # five options
    assert parse_multiple_choice("Tell me a story.") is None


def test_full_router_is_503_with_retry_after():
    running = Pool(delay_s=0.5, max_in_flight=1, max_queue=0)
    try:
        body = {"model": "moe2", "prompt": "slow free text"}

        async def two():
            async with httpx.AsyncClient(timeout=10) as client:
                return await asyncio.gather(
                    *(client.post(running.url + "/v1/completions", json=body) for _ in range(2))
                )

        replies = asyncio.run(two())
        assert sorted(r.status_code for r in replies) == [200, 503]
        busy = next(r for r in replies if r.status_code == 503)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "server_busy"
    finally:
        running.stop()


def test_a_client_leaving_a_stream_gives_its_place_back():
    running = Pool(delay_s=0.2)  # ten words, 0.2 s apart
    try:
        body = {"model": "moe2", "prompt": "a slow story", "stream": True}
        with httpx.stream("POST", running.url + "/v1/completions", json=body, timeout=10) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the stream
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["x_gatelab"]["expert"] == "alpha"
            assert httpx.get(running.url + "/health").json()["load"] == 1
        deadline = time.monotonic() + 5
        while httpx.get(running.url + "/health").json()["load"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(running.url + "/health").json()["load"] == 0
    finally:
        running.stop()


def test_unbounded_budgets_are_null_not_infinity(pool):
    reply = httpx.post(
        pool.url + "/v1/completions",
        json={"model": "moe2", "prompt": format_prompt(QUESTION, OPTIONS)},
        timeout=10,
    )
    assert "Infinity" not in reply.text and math.isclose(sum(reply.json()["x_gatelab"]["probs"]), 1)


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["--run", "{tmp}/missing"], "gate.safetensors not found"),
        (["--energy-budget", "nan"], "--energy-budget"),
        (["--delay-budget", "-1"], "--delay-budget"),
        (["--max-in-flight", "0"], "--max-in-flight"),
        (["--max-in-flight", "99999999999999999999"], "--max-in-flight"),
        (["--max-queue", "-1"], "--max-queue"),
        (["--experts", "{tmp}/none.yaml"], "none.yaml"),
        (["--api-key-env", "GATELAB_SURELY_UNSET"], "GATELAB_SURELY_UNSET"),
    ],
)
def test_cli_bad_value_is_one_line_exit_2(argv, hint, tmp_path, capsys):
    from gatelab.cli import main

    argv = [a.format(tmp=tmp_path) for a in argv]
    code = main(["edge", "route", "--run", str(tmp_path / "missing"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("gatelab: error:"), err
    assert hint.format(tmp=tmp_path) in err, err


@pytest.mark.slow  # a fresh interpreter and MiniLM's first load: ~15 s
def test_cli_serves_the_router(tmp_path):
    """``gatelab edge route`` as users run it: a subprocess on a free port, real MiniLM."""
    state = router_state()
    runs.save_checkpoint(
        tmp_path / "gate.safetensors",
        config={"gate": dataclasses.asdict(state.gate.config)},
        step=0,
        modules={"gate": state.gate},
    )
    info = {"experts": NAMES, "top_k": 2, "aggregate_s": AGGREGATE_S}
    (tmp_path / "router.json").write_text(json.dumps(info | {"categories": state.categories}))
    servers = [BackgroundServer(fake_expert_app(n)).start() for n in NAMES]
    experts = tmp_path / "experts.yaml"
    experts.write_text(
        "".join(
            f"- {{name: {n}, base_url: '{s.url}', device: cpu, backend: gatelab}}\n"
            for n, s in zip(NAMES, servers, strict=True)
        )
    )
    port = free_port()
    command = [sys.executable, "-m", "gatelab.cli", "edge", "route", "--run", str(tmp_path)]
    command += ["--experts", str(experts), "--port", str(port), "--energy-budget", "0.5"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        body = {"category": "toy"}  # MiniLM's embedding of this question: any centroid
        reply = client.completions.create(
            model="moe2", prompt=format_prompt(QUESTION, OPTIONS), extra_body={"x_gatelab": body}
        )
        assert reply.x_gatelab["subset"] == ["alpha"]  # --energy-budget 0.5 is the default
        assert reply.x_gatelab["energy_budget"] == 0.5
    finally:
        process.terminate()
        process.wait(timeout=10)
        for server in servers:
            server.stop()


def test_shutdown_closes_the_shared_client():
    """The app's lifespan closes the httpx client every expert call shared."""
    from fastapi.testclient import TestClient

    experts = [expert(n, f"http://127.0.0.1:{free_port()}") for n in NAMES]
    app = create_route_app(router_state(), experts, embed=fixed_embedding)
    with TestClient(app):
        client = app.state.router.client  # made on first use, in the server's loop
        assert not client.is_closed
    assert client.is_closed
