r"""What each kind of server is asked, and how its replies are read: the scoring backends.

A backend is the dialect of a server; the client (:class:`gatelab.edge.client.EdgeExpert`) picks
the requests that dialect serves. Measured on llama.cpp build 11434, gatelab's own server and
vLLM's documented completions API (the backend matrix with every endpoint is in ``docs/edge.md``):

============  ==========================================  =======================================
backend       ``method="continuation"``                   ``method="letters"``
============  ==========================================  =======================================
``gatelab``   ``/v1/completions`` echo (prompt logprobs)  ``/v1/completions`` or chat top-n
``openai``    same as gatelab (vLLM serves echo)          same as gatelab
``llamacpp``  ``/tokenize`` + forced ``/completion``      ``/v1/completions`` (chat layout) or chat
============  ==========================================  =======================================

**Echo** (gatelab, OpenAI/vLLM): the four texts ``context + " " + option`` go in one request with
``echo: true, max_tokens: 0, logprobs: 0``; the server returns the log-probability of every prompt
token, and the continuation is the tokens whose ``text_offset`` lies in ``[len(context),
len(prompt))`` (:func:`parse_echo`).

**Forced decoding** (llama.cpp, which ignores ``echo``): the context and each full text are
tokenised by the server (``POST /tokenize``); the option's tokens are those after the longest
common prefix of the two token lists (:func:`split_continuation`). For each option token
:math:`c_t` one ``POST /completion`` then *generates* exactly that token after the token ids of
the prefix and :math:`c_{<t}`: greedy decoding with ``logit_bias`` +1000 on :math:`c_t`, and
``n_probs: 1`` makes the server report the generated token's log-probability, which llama.cpp
computes from the raw logits before any sampler runs (``post_sampling_probs: false``). So
:math:`\ell = \sum_t \log p(c_t \mid \text{context}, c_{<t})`, the same sum echo gives, in one
request per option token; llama.cpp's prompt cache evaluates each shared prefix once. The server
withholds the probabilities of a token that leaves the text ending in an incomplete UTF-8
sequence; for such a token the client forces a complete one instead (the
context's last token) and reads the wanted token from the whole raw distribution
(``n_probs`` = vocabulary, about 0.6 s and 4.7 MB for SmolLM2's 49,152 tokens). (A grammar
of token ids, ``root ::= <[t1]> <[t2]>``, would force all tokens in one request, but build 11434
rejects it with HTTP 500 once a token is an incomplete UTF-8 piece, e.g. ``⊃`` split into bytes.)
On the quick set this agrees with gatelab's echo scoring of the same GGUF far better than reading
option letters (figure in ``docs/edge.md``).

**Letters**: one generated token with its top-n alternatives. llama.cpp answers
``/v1/completions`` with ``logprobs`` in the chat layout (``logprobs.content[0].top_logprobs``),
not OpenAI's legacy ``top_logprobs`` list; :func:`top_logprobs` reads both.

**Detection** (``backend="auto"``, :func:`detect_backend`): llama.cpp answers ``GET /props`` with
its ``default_generation_settings``; otherwise ``GET /v1/models`` names the owner of each model
(``owned_by``: ``gatelab``, ``llamacpp``, ``vllm``, ...); anything else speaks the OpenAI dialect.
"""

from __future__ import annotations

from typing import Any

BACKENDS = ("auto", "gatelab", "llamacpp", "openai")


class BadResponse(ValueError):
    """A server's reply lacks what the scoring method needs (the client names the expert)."""


def detect_backend(props: Any, models: Any) -> str:
    """The backend of a server from its ``GET /props`` and ``GET /v1/models`` replies.

    Args:
        props: the JSON of ``GET /props`` (None when not served).
        models: the JSON of ``GET /v1/models`` (None when not served).
    """
    if isinstance(props, dict) and isinstance(props.get("default_generation_settings"), dict):
        return "llamacpp"
    owners = {m.get("owned_by") for m in model_entries(models)}
    if "gatelab" in owners:
        return "gatelab"
    if "llamacpp" in owners:
        return "llamacpp"
    return "openai"


def model_entries(models: Any) -> list[dict]:
    """The ``data`` entries of a ``/v1/models`` reply (empty when it has none)."""
    data = models.get("data") if isinstance(models, dict) else None
    return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []


def reported_parameters(models: Any, model: str) -> float | None:
    """The parameter count a server reports for ``model`` (llama.cpp: ``meta.n_params``)."""
    entries = model_entries(models)
    chosen = [m for m in entries if m.get("id") == model] or entries[:1]
    for entry in chosen:
        n = (entry.get("meta") or {}).get("n_params")
        if isinstance(n, int | float) and not isinstance(n, bool) and n > 0:
            return float(n)
    return None


def echo_request(model: str, prompts: list[str]) -> dict:
    """``/v1/completions`` body scoring every prompt token (legacy OpenAI echo semantics)."""
    return {
        "model": model,
        "prompt": prompts,
        "max_tokens": 0,
        "echo": True,
        "logprobs": 0,
        "temperature": 0,
    }


def parse_echo(payload: Any, context: str, prompts: list[str]) -> tuple[list[float], list[int]]:
    """Summed log-probability and token count of each prompt's part after ``context``.

    Raises:
        BadResponse: not one choice per prompt, or no echoed prompt logprobs (llama.cpp ignores
            ``echo``: use its backend).
    """
    try:
        choices = sorted(payload["choices"], key=lambda c: c["index"])
    except (KeyError, TypeError):
        raise BadResponse("response has no 'choices'") from None
    if len(choices) != len(prompts):
        raise BadResponse(f"expected {len(prompts)} choices, got {len(choices)}")
    sums, counts = [], []
    for choice, prompt in zip(choices, prompts, strict=True):
        try:
            lp = choice["logprobs"]
            pairs = zip(lp["text_offset"], lp["token_logprobs"], strict=True)
            values = [v for offset, v in pairs if len(context) <= offset < len(prompt)]
        except (KeyError, TypeError, ValueError):
            raise BadResponse(
                "response has no echoed prompt logprobs (the server ignores 'echo'?)"
            ) from None
        if not values or any(not isinstance(v, int | float) for v in values):
            raise BadResponse("no logprobs for the continuation (the server ignores 'echo'?)")
        sums.append(float(sum(values)))
        counts.append(len(values))
    return sums, counts


def letters_request(api: str, model: str, prompt: str, n_top: int) -> tuple[str, dict]:
    """Path and body asking for one token with its ``n_top`` alternatives."""
    body: dict = {"model": model, "max_tokens": 1, "temperature": 0}
    if api == "chat":
        messages = [{"role": "user", "content": prompt}]
        return "/v1/chat/completions", body | {
            "messages": messages,
            "logprobs": True,
            "top_logprobs": n_top,
        }
    return "/v1/completions", body | {"prompt": prompt, "logprobs": n_top}


def top_logprobs(payload: Any) -> dict[str, float]:
    """The first generated token's top alternatives, legacy or chat layout (see module doc).

    Raises:
        BadResponse: the reply holds neither layout.
    """
    try:
        logprobs = payload["choices"][0]["logprobs"]
        if isinstance(logprobs, dict) and "content" in logprobs:  # chat layout
            first = logprobs["content"][0]
            return {t["token"]: float(t["logprob"]) for t in first["top_logprobs"]}
        return {str(k): float(v) for k, v in logprobs["top_logprobs"][0].items()}
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
        raise BadResponse("response has no top logprobs") from None


def tokenize_request(text: str) -> dict:
    """llama.cpp ``POST /tokenize`` body; special tokens as the model adds them (e.g. BOS)."""
    return {"content": text, "add_special": True}


def parse_tokens(payload: Any) -> list[int]:
    """Token ids of a llama.cpp ``/tokenize`` reply.

    Raises:
        BadResponse: no list of integer ``tokens``.
    """
    tokens = payload.get("tokens") if isinstance(payload, dict) else None
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in tokens
    ):
        raise BadResponse("/tokenize reply has no list of token ids")
    return tokens


def split_continuation(context_ids: list[int], full_ids: list[int]) -> tuple[list[int], list[int]]:
    """``full`` split after its longest common prefix with ``context``: (prefix, continuation).

    Raises:
        BadResponse: the option adds no token.
    """
    n = 0
    while n < min(len(context_ids), len(full_ids)) and context_ids[n] == full_ids[n]:
        n += 1
    if n == len(full_ids):
        raise BadResponse("the option adds no token to the context")
    return full_ids[:n], full_ids[n:]


FORCE_BIAS = 1000.0  # added to the forced token's logit: far beyond any logit gap of a model
ALL_TOKENS = 1 << 20  # n_probs asking for the whole vocabulary (llama.cpp clamps it to the size)


def forced_request(prefix_ids: list[int], token: int, n_probs: int = 1) -> dict:
    """llama.cpp ``POST /completion`` body that generates ``token`` after ``prefix_ids``.

    Greedy decoding with a huge ``logit_bias`` on the token makes it the one generated, and
    ``n_probs`` makes the server report its log-probability (and the top ``n_probs``
    alternatives) from the raw logits (see module doc).
    """
    return {
        "prompt": prefix_ids,
        "n_predict": 1,
        "n_probs": n_probs,
        "post_sampling_probs": False,
        "temperature": 0,
        "logit_bias": [[token, FORCE_BIAS]],
        "cache_prompt": True,
    }


def parse_forced(payload: Any, token: int) -> float | None:
    """Log-probability of ``token`` at the first generated position of a ``/completion`` reply.

    That is the generated token's own, or one of its reported alternatives; None when the
    server withheld the probabilities: it does while the generated text ends in an incomplete
    UTF-8 sequence (a byte-level token such as the first half of ``⊃``).

    Raises:
        BadResponse: ``token`` is neither generated nor among the alternatives.
    """
    steps = payload.get("completion_probabilities") if isinstance(payload, dict) else None
    if isinstance(payload, dict) and "content" in payload and not steps:
        return None
    try:
        step = steps[0]
        if int(step["id"]) == token:
            return float(step["logprob"])
        for alternative in step.get("top_logprobs") or []:
            if int(alternative["id"]) == token:
                return float(alternative["logprob"])
        got = int(step["id"])
    except (KeyError, IndexError, TypeError, ValueError):
        raise BadResponse("/completion reply has no completion_probabilities") from None
    raise BadResponse(f"/completion generated token {got}, not the forced {token}")
