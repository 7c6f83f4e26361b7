"""The OpenAI-compatible HTTP app over :class:`~gatelab.edge.serving.ServedModel` experts.

Request and response bodies follow the OpenAI API (``/v1/completions`` legacy logprobs layout,
``/v1/chat/completions`` ``logprobs.content`` layout) so that the same client talks to gatelab,
llama.cpp server, Ollama or vLLM. Errors use OpenAI's ``{"error": {"message", "type"}}`` body.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from gatelab.edge.serving import MAX_TOP_LOGPROBS, ServedModel


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _int_field(body: dict, key: str, default: int, low: int, high: int) -> int:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _BadRequest(f"'{key}' must be an integer in [{low}, {high}], got {value!r}")
    return value


def _common(
    body: dict, models: dict[str, ServedModel], min_tokens: int = 1
) -> tuple[ServedModel, int, float, int]:
    name = body.get("model")
    if name not in models:
        raise _BadRequest(f"model {name!r} not found; available: {sorted(models)}", 404)
    max_tokens = _int_field(body, "max_tokens", 16, min_tokens, 512)
    temperature = body.get("temperature", 0.0) or 0.0
    if not isinstance(temperature, int | float) or temperature < 0:
        raise _BadRequest(f"'temperature' must be a number >= 0, got {temperature!r}")
    seed = _int_field(body, "seed", 0, 0, 2**31 - 1)
    return models[name], max_tokens, float(temperature), seed


def _usage(out: dict) -> dict:
    usage = dict(out["usage"])
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return usage


MAX_ECHO_PROMPTS = 16


def _echo(body: dict, model: ServedModel, max_tokens: int) -> dict[str, Any]:
    """``echo: true, max_tokens: 0``: logprobs of the prompt tokens, one choice per prompt."""
    if max_tokens != 0:
        raise _BadRequest("'echo' is supported with 'max_tokens': 0 only (scoring)")
    prompts = body.get("prompt")
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if (
        not isinstance(prompts, list)
        or not 1 <= len(prompts) <= MAX_ECHO_PROMPTS
        or not all(isinstance(p, str) and p for p in prompts)
    ):
        raise _BadRequest(f"'prompt' must be 1-{MAX_ECHO_PROMPTS} non-empty strings")
    _int_field(body, "logprobs", 0, 0, 0)  # top alternatives are not returned when scoring
    out = model.score(prompts)
    choices = []
    for i, (prompt, scored) in enumerate(zip(prompts, out["choices"], strict=True)):
        logprobs = None
        if body.get("logprobs") is not None:
            top = [None if v is None else {} for v in scored["token_logprobs"]]  # logprobs: 0
            logprobs = {**scored, "top_logprobs": top}
        choices.append(
            {"index": i, "text": prompt, "logprobs": logprobs, "finish_reason": "length"}
        )
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:12]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model.name,
        "choices": choices,
        "usage": _usage(out),
        "x_gatelab": out["x_gatelab"],
    }


def _completion(body: dict, models: dict[str, ServedModel]) -> dict[str, Any]:
    echo = bool(body.get("echo"))
    model, max_tokens, temperature, seed = _common(body, models, 0 if echo else 1)
    if echo:
        return _echo(body, model, max_tokens)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _BadRequest("'prompt' must be a non-empty string")
    n_top = _int_field(body, "logprobs", 0, 0, MAX_TOP_LOGPROBS)
    out = model.generate(model.render(prompt=prompt), max_tokens, n_top, temperature, seed)
    logprobs = None
    if body.get("logprobs") is not None:
        offsets, position = [], len(prompt)
        for token in out["tokens"]:
            offsets.append(position)
            position += len(token)
        logprobs = {
            "tokens": out["tokens"],
            "token_logprobs": out["token_logprobs"],
            "top_logprobs": [dict(top) for top in out["top"]],
            "text_offset": offsets,
        }
    choice = {"index": 0, "text": out["text"], "logprobs": logprobs}
    return _response("cmpl", "text_completion", model, choice, out)


def _response(prefix: str, kind: str, model: ServedModel, choice: dict, out: dict) -> dict:
    """The OpenAI response envelope around one choice."""
    return {
        "id": f"{prefix}-{uuid.uuid4().hex[:12]}",
        "object": kind,
        "created": int(time.time()),
        "model": model.name,
        "choices": [{**choice, "finish_reason": out["finish_reason"]}],
        "usage": _usage(out),
        "x_gatelab": out["x_gatelab"],
    }


def _chat(body: dict, models: dict[str, ServedModel]) -> dict[str, Any]:
    model, max_tokens, temperature, seed = _common(body, models)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("'messages' must be a non-empty list of {role, content}")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise _BadRequest("each message must be an object with a string 'content'")
    want = bool(body.get("logprobs"))
    n_top = _int_field(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS) if want else 0
    out = model.generate(model.render(messages=messages), max_tokens, n_top, temperature, seed)

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    logprobs = None
    if want:
        content = []
        for token, logprob, top in zip(
            out["tokens"], out["token_logprobs"], out["top"], strict=True
        ):
            content.append({**entry(token, logprob), "top_logprobs": [entry(t, v) for t, v in top]})
        logprobs = {"content": content}
    message = {"role": "assistant", "content": out["text"]}
    choice = {"index": 0, "message": message, "logprobs": logprobs}
    return _response("chatcmpl", "chat.completion", model, choice, out)


def build_app(models: dict[str, ServedModel]) -> FastAPI:
    """A FastAPI app serving ``models`` (name -> variant) with the OpenAI endpoints."""
    app = FastAPI(title="gatelab edge expert")

    @app.exception_handler(_BadRequest)
    async def _bad(_: Request, error: _BadRequest) -> JSONResponse:
        kind = "not_found_error" if error.status == 404 else "invalid_request_error"
        return JSONResponse({"error": {"message": str(error), "type": kind}}, error.status)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": sorted(models)}

    @app.get("/v1/models")
    async def list_models() -> dict:
        data = [{"id": n, "object": "model", "owned_by": "gatelab"} for n in sorted(models)]
        return {"object": "list", "data": data}

    async def _json(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise _BadRequest("request body must be JSON") from None
        if not isinstance(body, dict):
            raise _BadRequest("request body must be a JSON object")
        return body

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict:
        return await run_in_threadpool(_completion, await _json(request), models)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        return await run_in_threadpool(_chat, await _json(request), models)

    return app


class BackgroundServer:
    """Run an app with uvicorn in a daemon thread (tests, demo); ``port=0`` picks a free port.

    Example:
        >>> with BackgroundServer(build_app(models)) as server:  # doctest: +SKIP
        ...     httpx.get(server.url + "/health")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        """Base URL of the running server."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        """Start and wait until the socket is listening."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConnectionError(f"server on {self.host}:{self.port} did not start")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        """Ask uvicorn to exit and wait for the thread."""
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
