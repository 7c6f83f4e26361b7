"""The backend dialects, on reply shapes recorded from the real servers (llama.cpp build 11434,
gatelab's server, vLLM's documented echo layout)."""

import pytest

from gatelab.edge.backends import (
    BadResponse,
    detect_backend,
    forced_request,
    parse_echo,
    parse_forced,
    parse_tokens,
    reported_parameters,
    split_continuation,
    top_logprobs,
)

# GET /props and GET /v1/models of llama-server b11434 (abridged: the keys the client reads)
LLAMA_PROPS = {
    "default_generation_settings": {"params": {"n_probs": 0}, "n_ctx": 1024},
    "total_slots": 4,
    "model_alias": "smollm2-135m",
    "model_ftype": "Q4_1",
}
LLAMA_MODELS = {
    "object": "list",
    "data": [
        {
            "id": "smollm2-135m",
            "object": "model",
            "owned_by": "llamacpp",
            "meta": {"n_vocab": 49152, "n_params": 134515008, "n_embd": 576},
        }
    ],
}
GATELAB_MODELS = {"object": "list", "data": [{"id": "tiny-random", "owned_by": "gatelab"}]}
VLLM_MODELS = {"object": "list", "data": [{"id": "Qwen/Qwen2.5-0.5B", "owned_by": "vllm"}]}


def test_detect_backend():
    assert detect_backend(LLAMA_PROPS, None) == "llamacpp"
    assert detect_backend(None, LLAMA_MODELS) == "llamacpp"  # /props switched off
    assert detect_backend(None, GATELAB_MODELS) == "gatelab"
    assert detect_backend({"detail": "Not Found"}, GATELAB_MODELS) == "gatelab"
    assert detect_backend(None, VLLM_MODELS) == "openai"
    assert detect_backend(None, None) == "openai"
    assert detect_backend("html", {"data": "nope"}) == "openai"


def test_reported_parameters():
    assert reported_parameters(LLAMA_MODELS, "smollm2-135m") == 134515008
    assert reported_parameters(LLAMA_MODELS, "other-alias") == 134515008  # one model served
    assert reported_parameters(VLLM_MODELS, "Qwen/Qwen2.5-0.5B") is None
    assert reported_parameters({"data": [{"id": "m", "meta": {"n_params": True}}]}, "m") is None


def _legacy(prompt, pieces, values):
    offsets = [sum(map(len, pieces[:i])) for i in range(len(pieces))]
    assert "".join(pieces) == prompt
    return {"tokens": pieces, "text_offset": offsets, "token_logprobs": values}


def test_parse_echo_keeps_the_continuation_and_drops_a_generated_token():
    context = "Question: q\nAnswer:"
    prompts = [context + " yes", context + " no way"]
    choices = [
        {"index": 1, "logprobs": _legacy(prompts[1], [context, " no", " way"], [None, -1, -2])},
        {"index": 0, "logprobs": _legacy(prompts[0], [context, " yes"], [None, -0.5])},
    ]
    assert parse_echo({"choices": choices}, context, prompts) == ([-0.5, -3.0], [1, 2])
    # OpenAI with max_tokens 1: one generated token after the prompt, not part of the score
    choices[1]["logprobs"]["tokens"].append("!")
    choices[1]["logprobs"]["text_offset"].append(len(prompts[1]))
    choices[1]["logprobs"]["token_logprobs"].append(-9.0)
    assert parse_echo({"choices": choices}, context, prompts) == ([-0.5, -3.0], [1, 2])


def test_parse_echo_names_what_is_missing():
    context, prompts = "Q:", ["Q: a"]
    # llama.cpp ignores echo: the completion has chat-layout logprobs of a generated token
    llama = {"choices": [{"index": 0, "logprobs": {"content": [{"token": "x", "logprob": -1}]}}]}
    with pytest.raises(BadResponse, match="ignores 'echo'"):
        parse_echo(llama, context, prompts)
    with pytest.raises(BadResponse, match="expected 1 choices, got 0"):
        parse_echo({"choices": []}, context, prompts)
    with pytest.raises(BadResponse, match="no 'choices'"):
        parse_echo({"error": "x"}, context, prompts)
    empty = {"choices": [{"index": 0, "logprobs": _legacy("Q: a", ["Q:", " a"], [None, None])}]}
    with pytest.raises(BadResponse, match="no logprobs for the continuation"):
        parse_echo(empty, context, prompts)


def test_top_logprobs_reads_both_layouts():
    legacy = {"choices": [{"logprobs": {"top_logprobs": [{" A": -0.1, " B": -2.0}]}}]}
    assert top_logprobs(legacy) == {" A": -0.1, " B": -2.0}
    # llama.cpp's /v1/completions with logprobs (recorded): the chat layout
    chat = {
        "choices": [
            {
                "text": "-",
                "logprobs": {
                    "content": [
                        {
                            "id": 29,
                            "token": "-",
                            "logprob": -0.93,
                            "top_logprobs": [
                                {"id": 29, "token": "-", "bytes": [45], "logprob": -0.93},
                                {"id": 28, "token": ",", "bytes": [44], "logprob": -2.17},
                            ],
                        }
                    ]
                },
            }
        ]
    }
    assert top_logprobs(chat) == {"-": -0.93, ",": -2.17}
    with pytest.raises(BadResponse, match="no top logprobs"):
        top_logprobs({"choices": [{"logprobs": None}]})


def test_split_continuation_and_forced_request():
    context = [17872, 42, 21350, 42]  # "Question: ...\nAnswer:"
    assert split_continuation(context, context + [7042]) == (context, [7042])
    # a token that straddles the boundary is scored with the option, conditioned on the rest
    assert split_continuation(context, [17872, 42, 21350, 99, 5]) == ([17872, 42, 21350], [99, 5])
    with pytest.raises(BadResponse, match="adds no token"):
        split_continuation(context, context)
    body = forced_request(context, 7042)
    assert body["prompt"] == context and body["n_predict"] == 1 and body["n_probs"] == 1
    assert body["logit_bias"] == [[7042, 1000.0]]
    assert body["post_sampling_probs"] is False and body["temperature"] == 0


def test_parse_forced_and_tokens():
    # recorded from llama-server b11434: " Paris" forced after "Question: ...France?\nAnswer:"
    reply = {
        "content": " Paris",
        "completion_probabilities": [
            {
                "id": 7042,
                "token": " Paris",
                "bytes": [32, 80, 97, 114, 105, 115],
                "logprob": -4.17312479019165,
                "top_logprobs": [{"id": 2, "token": "", "bytes": [], "logprob": -1.44042456}],
            }
        ],
    }
    assert parse_forced(reply, 7042) == -4.17312479019165
    assert parse_forced(reply, 2) == -1.44042456  # an alternative of the generated token
    with pytest.raises(BadResponse, match="not the forced 43"):
        parse_forced(reply, 43)
    # a byte-level token ending in half a UTF-8 character: llama.cpp withholds the probabilities
    assert parse_forced({"content": " \ufffd", "tokens": [], "stop": True}, 4636) is None
    with pytest.raises(BadResponse, match="completion_probabilities"):
        parse_forced({"completion_probabilities": [{"token": "x"}]}, 1)
    assert parse_tokens({"tokens": [1, 2]}) == [1, 2]
    for bad in ({"tokens": [{"id": 1, "piece": "a"}]}, {"tokens": [True]}, [], {"error": 1}):
        with pytest.raises(BadResponse, match="token ids"):
            parse_tokens(bad)
