import asyncio
import json
import math

import httpx
import pytest
import torch

from gatelab.cost import count_flops
from gatelab.edge.client import (
    EdgeExpert,
    ExpertAnswer,
    ExpertError,
    ExpertTimeout,
    ask_experts,
    continuation_distribution,
    option_distribution,
)
from gatelab.edge.collect import collect, load_answers
from gatelab.edge.costs import PROFILES, llama_forward_flops
from gatelab.edge.data import MCQuestion, format_cloze
from gatelab.edge.llama_server import free_port
from gatelab.edge.names import parse_model_name
from gatelab.edge.served import FEWSHOT_CLOZE_PREFIX, load_served_models
from gatelab.edge.server import BackgroundServer, build_app

NAMES = ["tiny-random", "tiny-random-l1-fewshot", "tiny-random-chat"]
QUESTION = MCQuestion("t/0", "arithmetic", "arithmetic", "What is 2 + 3?", ("4", "5", "6", "7"), 1)


@pytest.fixture(scope="module")
def models():
    return load_served_models(NAMES)


@pytest.fixture(scope="module")
def server(models):
    with BackgroundServer(build_app(models)) as running:
        yield running


def test_health_and_models(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    listed = httpx.get(server.url + "/v1/models").json()
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == sorted(NAMES)


def test_completion_logprobs_match_the_model(server, models):
    prompt = "Question: hi\nAnswer:"
    body = {"model": "tiny-random", "prompt": prompt, "max_tokens": 2, "logprobs": 5}
    reply = httpx.post(server.url + "/v1/completions", json=body).json()
    choice = reply["choices"][0]
    top = choice["logprobs"]["top_logprobs"][0]
    assert len(top) == 5
    # independent reference: the model's own next-token log-softmax
    m = models["tiny-random"]
    ids = m.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = torch.log_softmax(m.model(ids).logits[0, -1].double(), -1)
    best = torch.topk(ref, 5)
    assert max(top.values()) == pytest.approx(float(best.values[0]), abs=1e-6)
    assert choice["logprobs"]["tokens"][0] == m.tokenizer.decode([int(best.indices[0])])
    assert reply["usage"]["prompt_tokens"] == ids.shape[1]
    assert reply["usage"]["completion_tokens"] == 2
    flops = llama_forward_flops(m.model.config, 2, ids.shape[1])  # prefill, then one KV-cached
    flops += llama_forward_flops(m.model.config, 2, 1, n_past=ids.shape[1])  # decode step
    assert reply["x_gatelab"]["flops"] == flops


def test_chat_completion_logprobs(server):
    body = {
        "model": "tiny-random-chat",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1,
        "logprobs": True,
        "top_logprobs": 3,
    }
    reply = httpx.post(server.url + "/v1/chat/completions", json=body).json()
    content = reply["choices"][0]["logprobs"]["content"]
    assert len(content) == 1 and len(content[0]["top_logprobs"]) == 3
    assert reply["choices"][0]["message"]["role"] == "assistant"


def test_bad_requests(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and "not found" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny-random", "prompt": ""})
    assert r.status_code == 400
    body = {"model": "tiny-random", "prompt": "x", "logprobs": 99}
    assert httpx.post(server.url + "/v1/completions", json=body).status_code == 400
    r = httpx.post(server.url + "/v1/chat/completions", content=b"not json")
    assert r.status_code == 415  # JSON is required as Content-Type


def _error(response, status):
    body = response.json()
    assert response.status_code == status, body
    assert set(body) == {"error"} and body["error"]["message"]  # OpenAI's error format
    return body["error"]


def test_malformed_requests_get_openai_errors(server):
    url = server.url
    ok = {"model": "tiny-random", "prompt": "x", "max_tokens": 1}
    assert _error(httpx.post(url + "/v1/completions", json=[ok]), 400)["type"] == (
        "invalid_request_error"
    )
    assert (
        "model" in _error(httpx.post(url + "/v1/completions", json={"prompt": "x"}), 400)["message"]
    )
    for field, value in [
        ("max_tokens", "5"),
        ("max_tokens", True),
        ("max_tokens", 513),
        ("temperature", -1),
        ("seed", -1),
        ("prompt", 3),
        ("echo", "yes"),
    ]:
        error = _error(httpx.post(url + "/v1/completions", json=ok | {field: value}), 400)
        assert field in error["message"], (field, error)
    chat = {"model": "tiny-random-chat", "messages": [{"role": "user", "content": "hi"}]}
    for bad in [
        {"messages": []},
        {"messages": [{"role": "user"}]},
        {"top_logprobs": 21},
        {"max_tokens": 0},
    ]:
        _error(httpx.post(url + "/v1/chat/completions", json=chat | bad), 400)
    assert (
        _error(httpx.post(url + "/v1/chat/completions", json=chat | {"model": "x"}), 404)["type"]
        == "not_found_error"
    )
    extra = httpx.post(url + "/v1/completions", json=ok | {"n": 1, "stop": None})
    assert extra.status_code == 200  # unknown OpenAI fields are ignored, as before


@pytest.mark.parametrize("name", ["tiny-random", "tiny-random-l1-fewshot", "tiny-random-chat"])
def test_echo_logprobs_equal_a_direct_forward_pass(server, models, name):
    prompts = ["Question: hi\nAnswer: yes", "Question: hi\nAnswer: no, not at all"]
    body = {"model": name, "prompt": prompts, "echo": True, "max_tokens": 0, "logprobs": 0}
    reply = httpx.post(server.url + "/v1/completions", json=body).json()
    m = models[name]
    head = FEWSHOT_CLOZE_PREFIX if "fewshot" in name else ""
    if "chat" in name:  # the chat template up to the assistant turn, built here independently
        head = "user: Answer the question with a few words.\nassistant: "
    total = 0
    for prompt, choice in zip(prompts, reply["choices"], strict=True):
        lp = choice["logprobs"]
        assert "".join(lp["tokens"]) == prompt and choice["text"] == prompt
        assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(len(prompt))]
        ids = m.tokenizer(head + prompt, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():  # unbatched, unpadded, float64 reference
            ref = torch.log_softmax(m.model.double()(ids).logits[0].double(), -1)
            m.model.float()
        want = [float(ref[i - 1, ids[0, i]]) for i in range(1, ids.shape[1])]
        got = [v for v in lp["token_logprobs"] if v is not None]
        assert got == pytest.approx(want[-len(got) :], abs=1e-4)
        assert (lp["token_logprobs"][0] is None) == (head == "")
        total += ids.shape[1]
    assert reply["usage"]["prompt_tokens"] == total


def test_echo_bad_requests(server):
    url = server.url + "/v1/completions"
    body = {"model": "tiny-random", "prompt": ["a", "b"], "echo": True, "max_tokens": 1}
    assert httpx.post(url, json=body).status_code == 200  # echo and generation together
    assert httpx.post(url, json=body | {"max_tokens": 0, "prompt": []}).status_code == 400
    assert httpx.post(url, json=body | {"max_tokens": 0, "prompt": ["a", ""]}).status_code == 400
    assert httpx.post(url, json=body | {"max_tokens": 0, "prompt": ["a"] * 17}).status_code == 400


def test_continuation_distribution_closed_form():
    sums, tokens, options = [-2.0, -6.0, -3.0, -9.0], [1, 3, 2, 3], ["ab", "cdefg", "x", "yy"]
    raw = [math.exp(v) for v in sums]
    assert continuation_distribution(sums, tokens, options) == pytest.approx(
        [r / sum(raw) for r in raw]
    )
    per_token = [math.exp(v / n) for v, n in zip(sums, tokens, strict=True)]
    got = continuation_distribution(sums, tokens, options, "tokens")
    assert got == pytest.approx([r / sum(per_token) for r in per_token])
    per_char = [math.exp(v / (len(o) + 1)) for v, o in zip(sums, options, strict=True)]
    got = continuation_distribution(sums, tokens, options, "chars")
    assert got == pytest.approx([r / sum(per_char) for r in per_char])
    with pytest.raises(ValueError, match="normalize"):
        continuation_distribution(sums, tokens, options, "bytes")


def _echo_reply(prompts, values, n_choices=None):
    choices = []
    for i, (prompt, value) in enumerate(zip(prompts, values, strict=True)):
        cut = prompt.index("Answer:") + len("Answer:")
        choices.append(
            {"index": i, "logprobs": {
                "tokens": [prompt[:cut], prompt[cut:]], "text_offset": [0, cut],
                "token_logprobs": [None, value]}}
        )  # fmt: skip
    return {"choices": choices[:n_choices], "usage": {"prompt_tokens": 8}}


def test_continuation_client_request_and_faults():
    seen = []

    def fake(request):
        body = json.loads(request.content)
        seen.append(body)
        mode = len(seen)
        if mode == 1:
            return httpx.Response(200, json=_echo_reply(body["prompt"], [-3, -1, -2, -4]))
        if mode == 2:
            return httpx.Response(200, json=_echo_reply(body["prompt"], [-3, -1, -2, -4], 3))
        return httpx.Response(200, json=_echo_reply(body["prompt"], [-3, None, -2, -4]))

    expert = EdgeExpert(
        "c", "http://127.0.0.1:9", PROFILES["cpu"], flops_per_token=1.0,
        transport=httpx.MockTransport(fake), backend="gatelab",
    )  # fmt: skip
    answer = asyncio.run(expert.answer("Which?", ["a", "b", "c", "d"]))
    assert seen[0]["echo"] is True and seen[0]["max_tokens"] == 0 and seen[0]["logprobs"] == 0
    assert seen[0]["prompt"] == [format_cloze("Which?") + f" {o}" for o in "abcd"]
    assert answer.option_logprobs == (-3, -1, -2, -4) and answer.option_tokens == (1, 1, 1, 1)
    assert answer.method == "continuation" and max(answer.probs) == answer.probs[1]
    with pytest.raises(ExpertError, match="expected 4 choices"):
        asyncio.run(expert.answer("Which?", ["a", "b", "c", "d"]))
    with pytest.raises(ExpertError, match="no logprobs for the continuation"):
        asyncio.run(expert.answer("Which?", ["a", "b", "c", "d"]))
    with pytest.raises(ValueError, match="continuation scoring needs"):
        EdgeExpert("c", "http://x", PROFILES["cpu"], api="chat")


def test_flop_formula_matches_torch_counter(models):
    model = models["tiny-random"].model
    model.config._attn_implementation = "eager"  # counted matmuls (sdpa on CPU is not counted)
    try:
        ids = torch.randint(0, 90, (1, 37), generator=torch.Generator().manual_seed(0))
        counted = count_flops(lambda: model(ids, use_cache=False, logits_to_keep=1))
    finally:
        model.config._attn_implementation = "sdpa"
    assert counted == llama_forward_flops(model.config, 2, 37)


def test_model_names_and_truncation(models):
    assert parse_model_name("smollm2-135m-l20-fewshot").n_layers == 20
    assert models["tiny-random-l1-fewshot"].n_layers == 1
    assert len(models["tiny-random"].model.model.layers) == 2  # the original is untouched
    with pytest.raises(ValueError, match="unknown model"):
        parse_model_name("gpt-5")
    with pytest.raises(ValueError, match="suffix"):
        parse_model_name("tiny-random-l0")


def test_expert_answer_over_http(server):
    expert = EdgeExpert("tiny-random-l1-fewshot", server.url, PROFILES["rtx-4090"])
    answer = asyncio.run(expert.answer(QUESTION.question, QUESTION.options))
    assert math.isclose(sum(answer.probs), 1.0)
    assert answer.measured_s > 0 and answer.prompt_tokens > 50  # few-shot prefix was added
    profile = PROFILES["rtx-4090"]
    assert answer.modelled_delay_s == pytest.approx(profile.network_s + answer.flops / 25e12)
    assert answer.cost.joules == pytest.approx(350.0 * answer.flops / 25e12)
    chat = EdgeExpert("tiny-random-chat", server.url, PROFILES["cpu"], api="chat", method="letters")
    assert math.isclose(sum(asyncio.run(chat.answer("q?", ["a", "b", "c", "d"])).probs), 1.0)


def test_option_distribution_closed_form():
    top = {" A": -1.0, "A": -2.0, " B": -3.0, "(C": -0.5, "x": -4.0, " ": -4.5, "AB": -5.0}
    probs, found = option_distribution(top)
    a = math.log(math.exp(-1.0) + math.exp(-2.0))
    raw = [math.exp(a), math.exp(-3.0), math.exp(-0.5), math.exp(-5.0)]  # D gets the floor
    assert found == 3
    assert probs == pytest.approx([r / sum(raw) for r in raw])
    assert option_distribution({}) == ([0.25] * 4, 0)


def test_dead_server_and_timeout():
    dead = EdgeExpert("x", f"http://127.0.0.1:{free_port()}", PROFILES["cpu"], backoff_s=0.01)
    with pytest.raises(ExpertError, match="connection refused"):
        asyncio.run(dead.answer("q", ["a", "b", "c", "d"]))

    calls = []

    def slow(request):
        calls.append(request)
        raise httpx.ReadTimeout("too slow", request=request)

    timeout = EdgeExpert(
        "y", "http://127.0.0.1:9", PROFILES["cpu"], max_retries=2, backoff_s=0.01,
        transport=httpx.MockTransport(slow),
    )  # fmt: skip
    with pytest.raises(ExpertTimeout, match="timed out"):
        asyncio.run(timeout.answer("q", ["a", "b", "c", "d"]))
    assert len(calls) == 3  # first try + 2 retries
    assert isinstance(ExpertTimeout("t"), TimeoutError)


def test_retries_then_success_and_no_retry_on_client_error(monkeypatch):
    monkeypatch.setenv("GATELAB_TEST_KEY", "sekrit")
    calls = []
    good = {
        "choices": [{"logprobs": {"top_logprobs": [{" B": -0.1, " A": -3.0}]}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1},
    }

    def flaky(request):
        calls.append(request)
        return httpx.Response(503) if len(calls) < 3 else httpx.Response(200, json=good)

    expert = EdgeExpert(
        "z", "http://127.0.0.1:9", PROFILES["cpu"], backoff_s=0.01, flops_per_token=1e9,
        transport=httpx.MockTransport(flaky), api_key_env="GATELAB_TEST_KEY", method="letters",
        backend="gatelab",
    )  # fmt: skip
    answer = asyncio.run(expert.answer("q", ["a", "b", "c", "d"]))
    assert len(calls) == 3 and answer.flops == 11e9 and max(answer.probs) == answer.probs[1]
    assert calls[0].headers["authorization"] == "Bearer sekrit"
    assert "sekrit" not in repr(expert)

    calls.clear()
    bad = EdgeExpert(
        "w", "http://127.0.0.1:9", PROFILES["cpu"],
        transport=httpx.MockTransport(lambda r: calls.append(r) or httpx.Response(400, text="no")),
        backend="gatelab",
    )  # fmt: skip
    with pytest.raises(ExpertError, match="HTTP 400"):
        asyncio.run(bad.answer("q", ["a", "b", "c", "d"]))
    assert len(calls) == 1


def test_collect_records_missing_and_resumes(server, tmp_path):
    port = free_port()
    alive = EdgeExpert("tiny-random", server.url, PROFILES["jetson-agx-orin"])
    dead = EdgeExpert(
        "tiny-random-chat", f"http://127.0.0.1:{port}", PROFILES["cpu"], backoff_s=0.01
    )
    questions = [
        QUESTION,
        MCQuestion("t/1", "words", "words", "Red is?", ("a colour", "b", "c", "d"), 0),
    ]
    cache = tmp_path / "answers.jsonl"
    counts = collect([alive, dead], questions, cache)
    assert counts.pop("errors").keys() == {"tiny-random-chat"}
    assert counts == {"asked": 4, "ok": 2, "missing": 2}
    table = load_answers(cache, questions, ["tiny-random", "tiny-random-chat"])
    assert table.available.tolist() == [[True, False], [True, False]]
    assert all(not json.loads(line)["ok"] for line in cache.read_text().splitlines()[1::2])
    # resume: ok pairs are skipped, missing ones are tried again (now against the live server)
    revived = EdgeExpert("tiny-random-chat", server.url, PROFILES["cpu"])
    counts = collect([alive, revived], questions, cache)
    assert counts == {"asked": 2, "ok": 2, "missing": 0, "errors": {}}
    assert load_answers(cache, questions, ["tiny-random", "tiny-random-chat"]).available.all()
    results = asyncio.run(ask_experts([alive, dead], QUESTION.question, QUESTION.options))
    assert isinstance(results["tiny-random"], ExpertAnswer)
    assert isinstance(results["tiny-random-chat"], ExpertError)


def test_collect_resumes_after_a_torn_last_line(server, tmp_path, caplog):
    alive = EdgeExpert("tiny-random", server.url, PROFILES["jetson-agx-orin"])
    questions = [
        QUESTION,
        MCQuestion("t/1", "words", "words", "Red is?", ("a colour", "b", "c", "d"), 0),
    ]
    cache = tmp_path / "answers.jsonl"
    assert collect([alive], questions, cache)["ok"] == 2
    first, second = cache.read_text().splitlines()
    cache.write_text(first + "\n" + second[: len(second) // 2])  # killed inside the second write
    with caplog.at_level("WARNING"):
        assert collect([alive], questions, cache)["asked"] == 1
    assert "answers.jsonl:2: torn last line" in caplog.text
    lines = cache.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["ok"] for line in lines)  # tail cut, re-asked
    assert load_answers(cache, questions, ["tiny-random"]).available.all()
    # a corrupt line that is not the last is an error naming the file and the line
    cache.write_text(lines[0] + "\n{not json\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match=r"answers.jsonl:2: not a cache record"):
        collect([alive], questions, cache)
