"""EdgeExpert against fake servers of each dialect (in process, httpx.MockTransport).

The fakes share one toy language model over characters (token id = code point), so the expected
option scores come from a naive loop over that model, independently of the client; the real
servers are in test_edge_llamacpp.py and test_edge_http.py.
"""

import asyncio
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from gatelab.edge.client import EdgeExpert, ExpertError, ExpertTimeout, ask_experts
from gatelab.edge.costs import PROFILES
from gatelab.edge.data import format_cloze
from gatelab.edge.experts import load_experts

OPTIONS = ["red", "green", "a blue", "violet é"]  # é: a token llama.cpp withholds
VOCAB = 300  # the toy model's tokens: code points below 300
QUESTION = "Which colour?"
N_PARAMS = 1000


def toy_logprob(prefix: list[int], token: int) -> float:
    """log p(token | prefix) of the toy model (any deterministic function will do)."""
    return -0.25 * ((sum(prefix) + 3 * token) % 7 + 1)


def expected_sums(context: str, options: list[str]) -> list[float]:
    sums = []
    for option in options:
        full = [ord(c) for c in f"{context} {option}"]
        start = len(context)
        sums.append(sum(toy_logprob(full[:i], full[i]) for i in range(start, len(full))))
    return sums


class FakeServer:
    """One fake server; ``dialect`` is gatelab, vllm or llamacpp. Records every request."""

    def __init__(self, dialect: str):
        self.dialect = dialect
        self.requests: list[tuple[str, str, dict | None]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        path = request.url.path
        self.requests.append((request.method, path, body))
        route = getattr(self, f"_{self.dialect}")
        return route(request.method, path, body) or httpx.Response(
            404, json={"error": {"message": f"no {path}", "type": "not_found_error"}}
        )

    def _models(self, owner):
        entry = {"id": "m", "object": "model", "owned_by": owner}
        if owner == "llamacpp":
            entry["meta"] = {"n_params": N_PARAMS}
        return httpx.Response(200, json={"object": "list", "data": [entry]})

    def _echo(self, body, flops):
        choices = []
        for i, prompt in enumerate(body["prompt"]):
            ids = [ord(c) for c in prompt]
            values = [None] + [toy_logprob(ids[:k], ids[k]) for k in range(1, len(ids))]
            choices.append(
                {
                    "index": i,
                    "text": prompt,
                    "logprobs": {
                        "tokens": list(prompt),
                        "text_offset": list(range(len(prompt))),
                        "token_logprobs": values,
                    },
                }
            )
        reply = {"choices": choices, "usage": {"prompt_tokens": 50, "completion_tokens": 0}}
        return httpx.Response(200, json=reply | ({"x_gatelab": {"flops": flops}} if flops else {}))

    def _gatelab(self, method, path, body):
        if (method, path) == ("GET", "/v1/models"):
            return self._models("gatelab")
        if path == "/v1/completions" and body.get("echo"):
            assert body["max_tokens"] == 0 and body["logprobs"] == 0  # what today's server takes
            return self._echo(body, flops=123.0)
        return None

    def _vllm(self, method, path, body):
        if (method, path) == ("GET", "/v1/models"):
            return self._models("vllm")
        if path == "/v1/completions" and body.get("echo"):
            return self._echo(body, flops=None)
        return None

    def _llamacpp(self, method, path, body):
        if (method, path) == ("GET", "/props"):
            return httpx.Response(200, json={"default_generation_settings": {"n_ctx": 1024}})
        if (method, path) == ("GET", "/v1/models"):
            return self._models("llamacpp")
        if path == "/tokenize":
            return httpx.Response(200, json={"tokens": [ord(c) for c in body["content"]]})
        if path == "/completion":  # greedy on the biased logits, logprob of the raw ones
            ((token, bias),) = body["logit_bias"]
            assert body["n_predict"] == 1 and bias > 100 and body["post_sampling_probs"] is False
            if token > 127:  # as llama.cpp for a token ending in half a UTF-8 character
                return httpx.Response(200, json={"content": "\ufffd", "tokens": []})
            prompt, n = body["prompt"], min(body["n_probs"], VOCAB)
            step = {"id": token, "token": chr(token), "logprob": toy_logprob(prompt, token)}
            ranked = sorted(range(VOCAB), key=lambda t: -toy_logprob(prompt, t))[:n]
            step["top_logprobs"] = [{"id": t, "logprob": toy_logprob(prompt, t)} for t in ranked]
            return httpx.Response(200, json={"completion_probabilities": [step]})
        if path == "/v1/completions":  # the chat layout, one choice per prompt; echo ignored
            top = [{"token": " B", "logprob": -0.2}, {"token": " A", "logprob": -2.0}]
            content = [{"token": " B", "logprob": -0.2, "top_logprobs": top}]
            prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            choices = [{"index": i, "logprobs": {"content": content}} for i in range(len(prompts))]
            return httpx.Response(200, json={"choices": choices, "usage": {"prompt_tokens": 30}})
        return None


def _expert(fake, **kwargs):
    kwargs.setdefault("backoff_s", 0.0)
    transport = httpx.MockTransport(fake)
    return EdgeExpert("m", "http://127.0.0.1:9", PROFILES["cpu"], transport=transport, **kwargs)


@pytest.mark.parametrize("dialect", ["gatelab", "vllm", "llamacpp"])
def test_auto_backend_scores_the_same_continuations(dialect):
    fake = FakeServer(dialect)
    flops = {"flops_per_token": 7.0} if dialect == "vllm" else {}  # vLLM reports no FLOPs
    expert = _expert(fake, normalize="none", **flops)
    answer = asyncio.run(expert.answer(QUESTION, OPTIONS))
    want = expected_sums(format_cloze(QUESTION), OPTIONS)
    assert answer.option_logprobs == pytest.approx(want, abs=1e-12)
    assert answer.option_tokens == tuple(len(" " + o) for o in OPTIONS)
    assert expert.resolved_backend == answer.backend
    assert (
        answer.backend == {"gatelab": "gatelab", "vllm": "openai", "llamacpp": "llamacpp"}[dialect]
    )
    if dialect == "llamacpp":  # FLOPs modelled as 2 N per token scored (an echo's tokens)
        n_scored = sum(len(f"{format_cloze(QUESTION)} {o}") for o in OPTIONS)
        assert answer.prompt_tokens == n_scored and answer.flops == 2 * N_PARAMS * n_scored
        full = [b for _, p, b in fake.requests if p == "/completion" and b["n_probs"] > 1]
        assert [b["prompt"][-1] for b in full] == [ord(" ")]  # é, read from all tokens
    if dialect == "gatelab":
        assert answer.flops == 123.0
    # detection happens once per expert
    probes = [r for r in fake.requests if r[0] == "GET"]
    asyncio.run(expert.answer(QUESTION, OPTIONS))
    assert [r for r in fake.requests if r[0] == "GET"] == probes


def test_vllm_without_flops_names_the_fix():
    expert = _expert(FakeServer("vllm"))
    with pytest.raises(ValueError, match="set flops_per_token"):
        asyncio.run(expert.answer(QUESTION, OPTIONS))
    assert asyncio.run(_expert(FakeServer("vllm"), flops_per_token=5.0).answer(QUESTION, OPTIONS))


def test_letters_on_llamacpp_read_the_chat_layout():
    answer = asyncio.run(
        _expert(FakeServer("llamacpp"), method="letters").answer(QUESTION, OPTIONS)
    )
    assert answer.letters_found == 2 and max(answer.probs) == answer.probs[1]
    assert answer.flops == 2 * N_PARAMS * (30 + 1)


def test_echo_sent_to_llamacpp_is_a_parse_error_naming_echo():
    expert = _expert(FakeServer("llamacpp"), backend="openai")  # the wrong dialect, forced
    with pytest.raises(ExpertError, match="ignores 'echo'") as error:
        asyncio.run(expert.answer(QUESTION, OPTIONS))
    assert error.value.kind == "parse" and error.value.status is None


def _status(status, body=None, text=None):
    def reply(request):
        if text is not None:
            return httpx.Response(status, text=text)
        return httpx.Response(status, json=body)

    return reply


def test_every_failure_names_its_cause():
    cases = [
        (
            _status(503, {"error": {"message": "Loading model", "type": "unavailable_error"}}),
            "http", 503, "HTTP 503: Loading model (3 attempts)",
        ),
        (_status(401, {"detail": "bad key"}), "http", 401, "HTTP 401: bad key"),
        (_status(200, text="<html>"), "parse", None, "not JSON"),
        (_status(200, {"choices": []}), "parse", None, "bad response: expected 4 choices"),
    ]  # fmt: skip
    for handler, kind, status, message in cases:
        expert = _expert(handler, backend="gatelab")
        with pytest.raises(ExpertError, match=re.escape(message)) as error:
            asyncio.run(expert.answer(QUESTION, OPTIONS))
        assert error.value.kind == kind and error.value.status == status, message
        assert str(error.value).startswith("expert m at http://127.0.0.1:9")

    def slow(request):
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(ExpertTimeout, match=r"POST /v1/completions: timed out after 0.5 s") as e:
        asyncio.run(_expert(slow, backend="gatelab", timeout_s=0.5).answer(QUESTION, OPTIONS))
    assert e.value.kind == "timeout"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = EdgeExpert("dead", f"http://127.0.0.1:{port}", PROFILES["cpu"], backoff_s=0.0)
    results = asyncio.run(ask_experts([dead], QUESTION, OPTIONS))
    assert isinstance(results["dead"], ExpertError) and results["dead"].kind == "connect"
    assert f"expert dead at http://127.0.0.1:{port}: GET /props: connection refused" in str(
        results["dead"]
    )


def test_bad_values_name_the_expert_and_field():
    profile = PROFILES["cpu"]
    for kwargs, match in [
        ({"backend": "ollama"}, "backend must be one of"),
        ({"method": "vibes"}, "method must be"),
        ({"timeout_s": float("nan")}, "need timeout_s > 0"),
        ({"top_logprobs": 50}, "top_logprobs"),
        ({"flops_per_token": -1.0}, "flops_per_token"),
    ]:
        with pytest.raises(ValueError, match=f"EdgeExpert x: {match}"):
            EdgeExpert("x", "http://127.0.0.1:1", profile, **kwargs)
    for url in ("127.0.0.1:8000", "ftp://host", "http://"):
        with pytest.raises(ValueError, match="EdgeExpert x: base_url"):
            EdgeExpert("x", url, profile)


# --- secrets: which variables may be read, where the key may go ---------------------------------


class _Listener:
    """A plain-http listener on 127.0.0.1 that records request headers (an expert's endpoint)."""

    def __init__(self):
        seen = self.headers = []

        class Handler(BaseHTTPRequestHandler):
            def _reply(self):
                seen.append(dict(self.headers))
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                payload = json.dumps({"data": [{"id": "m", "owned_by": "gatelab"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _reply

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listener():
    running = _Listener()
    yield running
    running.close()


def _experts_file(tmp_path, url, key_env):
    path = tmp_path / "experts.yaml"
    path.write_text(f"- {{name: m, base_url: '{url}', device: cpu, api_key_env: {key_env}}}\n")
    return path


def _ask(expert):
    try:
        asyncio.run(expert.answer(QUESTION, OPTIONS))
    except ExpertError:
        pass  # the listener is no model server: the request is what counts


def test_a_gatelab_key_goes_to_a_loopback_listener(listener, tmp_path, monkeypatch):
    monkeypatch.setenv("GATELAB_EDGE_KEY", "k-123")
    (expert,) = load_experts(_experts_file(tmp_path, listener.url, "GATELAB_EDGE_KEY"))
    _ask(expert)
    assert listener.headers and all(h["Authorization"] == "Bearer k-123" for h in listener.headers)


def test_other_variables_are_never_read_unless_allowed(listener, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", "/home/secret")
    path = _experts_file(tmp_path, listener.url, "HOME")
    with pytest.raises(ValueError, match=r"experts.yaml: EdgeExpert m: api_key_env 'HOME'"):
        load_experts(path)
    assert listener.headers == []  # nothing was sent
    (expert,) = load_experts(path, allow_env=["HOME"])  # the user's explicit allow-list
    _ask(expert)
    assert listener.headers[0]["Authorization"] == "Bearer /home/secret"


def test_keys_only_over_https_or_to_loopback(monkeypatch):
    monkeypatch.setenv("GATELAB_EDGE_KEY", "k-123")
    profile = PROFILES["cpu"]
    for url in ("http://192.0.2.7:8000", "http://example.com", "http://127.0.0.1.nip.io"):
        with pytest.raises(ValueError, match="refusing to send the key of GATELAB_EDGE_KEY"):
            EdgeExpert("x", url, profile, api_key_env="GATELAB_EDGE_KEY")
    for url in ("http://localhost:1", "http://127.8.9.10", "http://[::1]:8000"):
        EdgeExpert("x", url, profile, api_key_env="GATELAB_EDGE_KEY")
    seen = []

    def record(request):
        seen.append(request)
        return httpx.Response(200, json={"data": []})

    remote = EdgeExpert(
        "x", "https://192.0.2.7", profile, api_key_env="GATELAB_EDGE_KEY",
        transport=httpx.MockTransport(record), backend="gatelab", backoff_s=0.0,
    )  # fmt: skip
    _ask(remote)
    assert seen and seen[0].url.scheme == "https"
    assert seen[0].headers["authorization"] == "Bearer k-123"
    no_key = EdgeExpert("x", "http://192.0.2.7", profile)  # without a key, plain http is fine
    assert no_key.headers() == {}
