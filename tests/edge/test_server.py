"""gatelab edge serve against independent references: naive full-recompute decoding in float64,
the official openai client, and OpenAI's documented request/response contract."""

import copy
import json
import socket
import threading
import time

import httpx
import pytest
import torch

from gatelab.edge.engine import Engine, EngineBusy, Job, Prompt, Sampling
from gatelab.edge.generate import TextStream
from gatelab.edge.served import load_served_models
from gatelab.edge.server import BackgroundServer, build_app

NAMES = ["tiny-random", "tiny-random-chat", "tiny-random-l1-fewshot"]


@pytest.fixture(scope="module")
def models():
    return load_served_models(NAMES)


@pytest.fixture(scope="module")
def server(models):
    with BackgroundServer(build_app(models)) as running:
        yield running


@pytest.fixture(scope="module")
def reference(models):
    """A float64 copy of the tiny model, run without any cache (the independent reference)."""
    return copy.deepcopy(models["tiny-random"].model).double()


def naive_greedy(model, ids, steps, k=3, stop_ids=(1,)):
    """Greedy decoding by re-running the whole sequence every step (no KV cache), float64."""
    ids, out = list(ids), []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
        lp = torch.log_softmax(logits.double(), -1)
        token = int(lp.argmax())
        top = torch.topk(lp, k)
        out.append((token, float(lp[token]), top.values.tolist(), top.indices.tolist()))
        if token in stop_ids:
            break
        ids.append(token)
    return out


def naive_echo(model, ids):
    """log p(t_i | t_<i) and the log-softmax rows of a whole sequence, one forward, float64."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids]), use_cache=False).logits[0].double(), -1)
    return [None] + [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))], lp


def encode(models, text):
    return models["tiny-random"].tokenizer(text, add_special_tokens=False).input_ids


PROMPTS = ["Question: hi\nAnswer:", "a", "The quick brown fox jumps over the lazy dog, and"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_kv_cached_greedy_equals_naive_recompute(server, models, reference, prompt):
    body = {"model": "tiny-random", "prompt": prompt, "max_tokens": 6, "logprobs": 3}
    reply = httpx.post(server.url + "/v1/completions", json=body).json()
    want = naive_greedy(reference, encode(models, prompt), 6)
    lp = reply["choices"][0]["logprobs"]
    tok = models["tiny-random"].tokenizer
    assert lp["tokens"] == [tok.decode([t]) for t, *_ in want if t != 1]
    assert lp["token_logprobs"] == pytest.approx([v for t, v, *_ in want if t != 1], abs=1e-5)
    for top, (_, _, values, _) in zip(lp["top_logprobs"], want, strict=False):
        assert sorted(top.values(), reverse=True)[:3] == pytest.approx(values, abs=1e-5)
    assert reply["usage"]["completion_tokens"] == len(want)


def _run(engine, jobs):
    """Submit ``jobs`` at once (the worker admits them together) and collect their events."""
    events = {id(j): [] for j in jobs}
    done = threading.Semaphore(0)
    for job in jobs:

        def on_event(event, job=job):
            events[id(job)].append(event)
            if event[0] in ("done", "error"):
                done.release()

        job.on_event = on_event
    with engine.cond:  # hold the worker until every job is queued
        for job in jobs:
            engine.submit(job)
    for _ in jobs:
        assert done.acquire(timeout=60)
    return [events[id(j)] for j in jobs]


def test_continuous_batching_of_different_lengths_equals_each_alone(models, reference):
    served = models["tiny-random"]
    engine = Engine(max_batch=8)
    prompts = [encode(models, p) for p in PROMPTS] + [encode(models, "x" * 40)]
    steps = [7, 6, 9, 5]
    jobs = [
        Job(served, [Prompt(ids)], Sampling(max_tokens=n, top_k=2), timeout_s=60)
        for ids, n in zip(prompts, steps, strict=True)
    ]
    try:
        results = _run(engine, jobs)
    finally:
        engine.stop()
    assert engine.peak_rows == 4  # all four decoded in one left-padded batch
    for ids, n, events in zip(prompts, steps, results, strict=True):
        got = [e[2] for e in events if e[0] == "token"]
        want = [w for w in naive_greedy(reference, ids, n, k=2) if w[0] != 1]
        assert [t.token for t in got] == [t for t, *_ in want]
        assert [t.logprob for t in got] == pytest.approx([v for _, v, *_ in want], abs=1e-5)
        assert events[-1][0] == "done"


def test_echo_with_generation_returns_prompt_and_completion_logprobs(server, models, reference):
    prompt = "Question: hi\nAnswer: yes"
    body = {"model": "tiny-random", "prompt": prompt, "echo": True, "max_tokens": 3, "logprobs": 2}
    choice = httpx.post(server.url + "/v1/completions", json=body).json()["choices"][0]
    ids = encode(models, prompt)
    values, rows = naive_echo(reference, ids)
    lp, n = choice["logprobs"], len(ids)
    assert choice["text"].startswith(prompt) and "".join(lp["tokens"][:n]) == prompt
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:n] == pytest.approx(values[1:], abs=1e-5)
    tok = models["tiny-random"].tokenizer
    for i in range(1, n):  # the k best of the position plus the actual token (OpenAI legacy)
        best = torch.topk(rows[i - 1], 2)
        want = {tok.decode([int(t)]): float(v) for v, t in zip(*best, strict=True)}
        want.setdefault(tok.decode([ids[i]]), values[i])
        assert lp["top_logprobs"][i] == pytest.approx(want, abs=1e-5)
    generated = naive_greedy(reference, ids, 3)
    assert lp["token_logprobs"][n:] == pytest.approx([v for _, v, *_ in generated], abs=1e-5)
    assert lp["text_offset"][n] == len(prompt)


def test_prefix_reuse_scores_like_a_fresh_forward(models, reference):
    served = models["tiny-random"]
    engine = Engine()
    context = encode(models, "Question: which is the largest planet?\nAnswer:")
    options = [context + encode(models, f" {o}") for o in ("Jupiter", "Mars", "Venus")]
    try:
        first = _run(engine, [Job(served, [Prompt(ids, score=True) for ids in options],
                                  Sampling(max_tokens=0))])[0]  # fmt: skip
    finally:
        engine.stop()
    assert engine.store.hits == 2  # options 2 and 3 started from option 1's context states
    scored = [e[2] for e in first if e[0] == "scored"]
    for ids, records in zip(options, scored, strict=True):
        values, rows = naive_echo(reference, ids)
        assert records.logprobs[1:].tolist() == pytest.approx(values[1:], abs=1e-5)
        best = torch.topk(rows[:-1], 20).values
        assert torch.allclose(records.top_values[1:], best, atol=1e-5)


def test_prompt_forms_give_the_same_completion(server, models):
    ids = encode(models, "Question: hi\nAnswer:")
    url, base = server.url + "/v1/completions", {"model": "tiny-random", "max_tokens": 4}
    text = httpx.post(url, json=base | {"prompt": "Question: hi\nAnswer:"}).json()
    as_ids = httpx.post(url, json=base | {"prompt": ids}).json()
    batch = httpx.post(url, json=base | {"prompt": [ids, ids[:5]]}).json()
    texts = httpx.post(url, json=base | {"prompt": ["Question: hi\nAnswer:", "Quest"]}).json()
    assert as_ids["choices"][0]["text"] == text["choices"][0]["text"]
    assert [c["text"] for c in batch["choices"]] == [c["text"] for c in texts["choices"]]
    assert [c["index"] for c in batch["choices"]] == [0, 1]


def test_text_stream_cuts_at_stops_and_holds_back_their_starts(models):
    tok = models["tiny-random"].tokenizer  # one character per token
    stream = TextStream(tok, ("STOP", "xy"))
    out = [stream.push(t) for t in encode(models, "abST")]
    assert out == ["a", "b", "", ""] and not stream.stopped  # "ST" may begin "STOP"
    assert stream.push(encode(models, "O")[0]) == "" and stream.push(encode(models, "P")[0]) == ""
    assert stream.stopped and stream.text == "ab" and stream.finish() == ""
    stream = TextStream(tok, ("STOP",))
    assert "".join(stream.push(t) for t in encode(models, "aSTb")) == "aSTb"  # not a stop after all
    assert stream.finish() == "" and not stream.stopped


def test_stop_strings_over_http_cut_the_greedy_text(server, models, reference):
    prompt = "Question: hi\nAnswer:"
    tok = models["tiny-random"].tokenizer
    greedy = tok.decode([t for t, *_ in naive_greedy(reference, encode(models, prompt), 12)])
    stop = greedy[3:5]  # two characters from inside the greedy text
    body = {"model": "tiny-random", "prompt": prompt, "max_tokens": 12, "stop": [stop, "never"]}
    choice = httpx.post(server.url + "/v1/completions", json=body).json()["choices"][0]
    assert choice["text"] == greedy[: greedy.index(stop)] and choice["finish_reason"] == "stop"


def test_n_seed_and_top_p(server):
    url = server.url + "/v1/completions"
    body = {"model": "tiny-random", "prompt": "Hello", "max_tokens": 8, "n": 3, "temperature": 1.5}
    one = httpx.post(url, json=body | {"seed": 7}).json()["choices"]
    again = httpx.post(url, json=body | {"seed": 7}).json()["choices"]
    other = httpx.post(url, json=body | {"seed": 8}).json()["choices"]
    assert [c["index"] for c in one] == [0, 1, 2]
    assert [c["text"] for c in one] == [c["text"] for c in again]
    assert [c["text"] for c in one] != [c["text"] for c in other]
    assert len({c["text"] for c in one}) > 1  # the three choices are sampled independently
    greedy = httpx.post(url, json=body | {"n": 1, "temperature": 0}).json()["choices"][0]["text"]
    nucleus = httpx.post(url, json=body | {"n": 1, "top_p": 1e-9, "seed": 1}).json()
    assert nucleus["choices"][0]["text"] == greedy  # a nucleus of one token is greedy


def test_chat_parts_and_max_completion_tokens(server):
    url = server.url + "/v1/chat/completions"
    base = {"model": "tiny-random-chat", "max_completion_tokens": 3}
    whole = {"messages": [{"role": "user", "content": "hi there"}]}
    pieces = [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]
    parts = {"messages": [{"role": "user", "content": pieces}]}
    a = httpx.post(url, json=base | whole).json()
    b = httpx.post(url, json=base | parts).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["usage"]["completion_tokens"] <= 3 and a["object"] == "chat.completion"


def test_official_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    full = client.completions.create(model="tiny-random", prompt="Hello", max_tokens=8)
    chunks = list(
        client.completions.create(
            model="tiny-random", prompt="Hello", max_tokens=8, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert len(chunks) > 2 and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    stop = full.choices[0].text[2:4]
    cut = client.completions.create(model="tiny-random", prompt="Hello", max_tokens=8, stop=stop)
    assert (
        cut.choices[0].text == full.choices[0].text[:2] and cut.choices[0].finish_reason == "stop"
    )
    many = client.completions.create(model="tiny-random", prompt="Hello", max_tokens=4, n=2,
                                     temperature=1.0, seed=3, logprobs=2)  # fmt: skip
    assert len(many.choices) == 2 and all(
        len(c.logprobs.top_logprobs[0]) >= 2 for c in many.choices
    )
    echo = client.completions.create(model="tiny-random", prompt="Hello", max_tokens=0, echo=True,
                                     logprobs=1)  # fmt: skip
    assert echo.choices[0].text == "Hello" and echo.choices[0].logprobs.token_logprobs[0] is None
    chat = list(
        client.chat.completions.create(
            model="tiny-random-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
            stream=True, logprobs=True, top_logprobs=2,
        )
    )  # fmt: skip
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-1].choices[0].finish_reason in ("stop", "length")
    with_logprobs = [c for c in chat if c.choices and c.choices[0].logprobs]
    assert with_logprobs and len(with_logprobs[0].choices[0].logprobs.content[0].top_logprobs) == 2
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.completions.create(model="tiny-random", prompt="x", presence_penalty=0.5)
    assert client.models.retrieve("tiny-random").id == "tiny-random"


def _error(response, status):
    body = response.json()
    assert response.status_code == status, body
    assert set(body) == {"error"} and body["error"]["message"]  # OpenAI's error format
    assert {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


BAD_COMPLETIONS = [
    ({"model": ["tiny-random"]}, "model"),
    ({"temperature": float("nan")}, None),  # refused by the JSON parser, see below
    ({"temperature": True}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 1.0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"logprobs": True}, "logprobs"),
    ({"stop": ""}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"frequency_penalty": 0.1}, "frequency_penalty"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"best_of": 3}, "best_of"),
    ({"suffix": "x"}, "suffix"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [100000]}, "prompt"),
    ({"prompt": ["a"] * 17}, "prompt"),
    ({"prompt": "x" * 5000}, "prompt"),  # past the 4096-token context
    ({"prompt": "x" * 4090, "max_tokens": 10}, "max_tokens"),
]


@pytest.mark.parametrize(("change", "param"), BAD_COMPLETIONS[:1] + BAD_COMPLETIONS[2:])
def test_bad_completion_fields_are_named(server, change, param):
    body = {"model": "tiny-random", "prompt": "x", "max_tokens": 1} | change
    error = _error(httpx.post(server.url + "/v1/completions", json=body), 400)
    assert error["param"] == param and param in error["message"]


BAD_CHATS = [
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages[0].name"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"max_tokens": 2, "max_completion_tokens": 3}, "max_completion_tokens"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"seed": -1}, "seed"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "param"), BAD_CHATS)
def test_bad_chat_fields_are_named(server, change, param):
    body = {"model": "tiny-random-chat", "messages": [{"role": "user", "content": "hi"}]} | change
    error = _error(httpx.post(server.url + "/v1/chat/completions", json=body), 400)
    assert error["param"].startswith(param), error


def test_malformed_bodies_routes_and_methods(server):
    url = server.url + "/v1/completions"
    json_type = {"content-type": "application/json"}
    for raw in [b'{"model": "tiny-random", "prompt": "x", "temperature": NaN}',
                b'{"model": "tiny-random", "prompt": "x", "temperature": Infinity}',
                b"[" * 5000 + b"]" * 5000, b'{"a":' * 5000 + b"1" + b"}" * 5000,
                b"not json", b'["list"]', b"\xff\xfe"]:  # fmt: skip
        _error(httpx.post(url, content=raw, headers=json_type), 400)
    assert "application/json" in _error(httpx.post(url, content=b"{}"), 415)["message"]
    text = {"content-type": "text/plain"}
    _error(httpx.post(url, content=b"{}", headers=text), 415)
    assert _error(httpx.get(server.url + "/v1/nope"), 404)["type"] == "not_found_error"
    _error(httpx.get(url), 405)
    _error(httpx.delete(server.url + "/v1/models"), 405)
    assert _error(httpx.get(server.url + "/v1/models/nope"), 404)["param"] == "model"
    card = httpx.get(server.url + "/v1/models/tiny-random").json()
    assert card["id"] == "tiny-random" and card["max_model_len"] == 4096


def test_auth_body_limit_queue_and_timeout(models):
    served = {"tiny-random": models["tiny-random"]}
    app = build_app(served, Engine(max_queue=0), api_key="s3cret", max_body_bytes=2000)
    ok = {"model": "tiny-random", "prompt": "x", "max_tokens": 1}
    with BackgroundServer(app) as s:
        url = s.url + "/v1/completions"
        assert _error(httpx.post(url, json=ok), 401)["code"] == "invalid_api_key"
        bad_key = {"authorization": "Bearer nope"}
        _error(httpx.post(url, json=ok, headers=bad_key), 401)
        _error(httpx.get(s.url + "/v1/models", headers=bad_key), 401)
        assert httpx.get(s.url + "/health").status_code == 200  # liveness needs no key
        key = {"authorization": "Bearer s3cret"}
        big = ok | {"prompt": "x" * 3000}
        assert _error(httpx.post(url, json=big, headers=key), 413)["code"] == "too_large"

        def chunked():  # no Content-Length: the guard counts the bytes it receives
            yield json.dumps(big).encode()

        streamed = httpx.post(
            url, content=chunked(), headers=key | {"content-type": "application/json"}
        )
        _error(streamed, 413)
        busy = httpx.post(url, json=ok, headers=key)  # max_queue=0: nothing may wait
        assert _error(busy, 503)["code"] == "server_busy" and busy.headers["retry-after"] == "1"
    app = build_app(served, timeout_s=0.05)
    with BackgroundServer(app) as s:
        slow = ok | {"prompt": "x" * 3000, "max_tokens": 512, "echo": True, "logprobs": 5}
        error = _error(httpx.post(s.url + "/v1/completions", json=slow), 504)
        assert error["code"] == "timeout" and error["type"] == "timeout_error"


def test_engine_queue_bound():
    engine = Engine(max_queue=1)
    job = Job(None, [], Sampling())
    with engine.cond:
        engine.waiting.append(job)  # one waiting, the worker not started
        with pytest.raises(EngineBusy):
            engine.submit(Job(None, [], Sampling()))
    with pytest.raises(ValueError, match="max_batch"):
        Engine(max_batch=0)


def _abandon(url, body):
    """Send a request over a raw socket and close it without reading the answer."""
    host, port = url.removeprefix("http://").split(":")
    raw = json.dumps(body).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(raw)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head + raw)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # close only once the server works on it
            load = httpx.get(url + "/health").json()["load"]
            if load["prefilling"] or load["decoding"]:
                break
            time.sleep(0.02)


@pytest.mark.parametrize("stream", [False, True])
def test_abandoned_request_stops_its_work(models, stream):
    served = {"tiny-random": models["tiny-random"]}
    engine = Engine()
    with BackgroundServer(build_app(served, engine)) as s:
        body = {"model": "tiny-random", "prompt": "y" * 3000, "max_tokens": 512, "stream": stream}
        _abandon(s.url, body | {"stop": ["never-ever"]})
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            load = httpx.get(s.url + "/health").json()["load"]
            if not (load["prefilling"] or load["decoding"] or load["waiting"]):
                break
            time.sleep(0.05)
        assert not (load["prefilling"] or load["decoding"]), load
        assert engine.cancelled == 1
        ok = {"model": "tiny-random", "prompt": "x", "max_tokens": 2}
        assert httpx.post(s.url + "/v1/completions", json=ok).status_code == 200


def test_stream_that_times_out_ends_with_an_error_event(models):
    app = build_app({"tiny-random": models["tiny-random"]}, timeout_s=0.05)
    body = {"model": "tiny-random", "prompt": "x" * 3000, "max_tokens": 512, "stream": True}
    with BackgroundServer(app) as s:
        with httpx.stream("POST", s.url + "/v1/completions", json=body) as reply:
            lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
    assert reply.status_code == 200 and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "timeout"


def test_cli_serve_refuses_bad_options_in_one_line():
    from typer.testing import CliRunner

    from gatelab.cli import app

    runner = CliRunner()
    missing = runner.invoke(
        app, ["edge", "serve", "--model", "tiny-random", "--api-key-env", "GATELAB_TEST_UNSET"]
    )
    assert missing.exit_code == 2 and "GATELAB_TEST_UNSET is not set" in missing.output
    assert "Traceback" not in missing.output
    for flag, value in [("--max-batch", "0"), ("--port", "70000"), ("--timeout-s", "0")]:
        bad = runner.invoke(app, ["edge", "serve", "--model", "tiny-random", flag, value])
        assert bad.exit_code == 2 and flag in bad.output, (flag, bad.output)
