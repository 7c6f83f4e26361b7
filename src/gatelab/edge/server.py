"""The OpenAI-compatible HTTP app over :class:`~gatelab.edge.served.ServedModel` experts.

Request and response bodies follow the OpenAI API (``/v1/completions`` legacy logprobs layout,
``/v1/chat/completions`` ``logprobs.content`` layout), so the same client talks to gatelab and to
other OpenAI-compatible servers. Request bodies are pydantic models (:class:`CompletionRequest`,
:class:`ChatRequest`) that FastAPI validates; a malformed request gets HTTP 400 and an unknown
model 404, both with OpenAI's ``{"error": {"message", "type"}}`` body.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` (``logprobs``: int, top
alternatives per token; with ``echo: true, max_tokens: 0`` and a list of prompts it scores every
prompt token instead, in one batched forward) and ``POST /v1/chat/completions`` (``logprobs``:
bool, ``top_logprobs``: int). Every response carries ``usage`` and an ``x_gatelab`` extension
with the forward FLOPs and the measured compute seconds.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gatelab.edge.served import MAX_TOP_LOGPROBS, ServedModel

MAX_TOKENS = 512  # longest completion served
MAX_ECHO_PROMPTS = 16  # prompts scored in one echo request
Seed = Annotated[int, Field(ge=0, le=2**31 - 1)]


class _Body(BaseModel):
    # strict: no silent coercion ("5" or true are not integers); unknown OpenAI fields ignored
    model_config = ConfigDict(strict=True, extra="ignore")


class CompletionRequest(_Body):
    """Body of ``POST /v1/completions``."""

    model: str
    prompt: str | list[str]
    max_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS)] | None = None  # default 16
    temperature: Annotated[float, Field(ge=0)] | None = None  # 0 or None: greedy
    seed: Seed | None = None  # sampling seed, default 0
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool = False  # score the prompt (with max_tokens 0) instead of generating

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if self.echo:
            if self.max_tokens != 0:
                raise ValueError("'echo' is supported with 'max_tokens': 0 only (scoring)")
            if not 1 <= len(prompts) <= MAX_ECHO_PROMPTS or not all(prompts):
                raise ValueError(f"'prompt' must be 1-{MAX_ECHO_PROMPTS} non-empty strings")
            if self.logprobs:
                raise ValueError("'logprobs' must be 0 when scoring (echo)")
        else:
            if self.max_tokens == 0:
                raise ValueError("'max_tokens' must be >= 1 (0 only with 'echo')")
            if len(prompts) != 1 or not prompts[0]:
                raise ValueError("'prompt' must be a non-empty string")
        return self


class ChatMessage(_Body):
    """One chat turn."""

    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: str


class ChatRequest(_Body):
    """Body of ``POST /v1/chat/completions``."""

    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = None  # default 16
    temperature: Annotated[float, Field(ge=0)] | None = None
    seed: Seed | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None


class ModelNotFound(LookupError):
    """The request names a model this server does not serve (HTTP 404)."""


def _model(models: dict[str, ServedModel], name: str) -> ServedModel:
    if name not in models:
        raise ModelNotFound(f"model {name!r} not found; available: {sorted(models)}")
    return models[name]


def _usage(out: dict) -> dict:
    usage = dict(out["usage"])
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return usage


def _envelope(prefix: str, kind: str, model: ServedModel, choices: list, out: dict) -> dict:
    """The OpenAI response envelope around the choices."""
    return {
        "id": f"{prefix}-{uuid.uuid4().hex[:12]}",
        "object": kind,
        "created": int(time.time()),
        "model": model.name,
        "choices": choices,
        "usage": _usage(out),
        "x_gatelab": out["x_gatelab"],
    }


def _echo(body: CompletionRequest, model: ServedModel) -> dict[str, Any]:
    """``echo: true, max_tokens: 0``: logprobs of the prompt tokens, one choice per prompt."""
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    out = model.score(prompts)
    choices = []
    for i, (prompt, scored) in enumerate(zip(prompts, out["choices"], strict=True)):
        logprobs = None
        if body.logprobs is not None:
            top = [None if v is None else {} for v in scored["token_logprobs"]]  # logprobs: 0
            logprobs = {**scored, "top_logprobs": top}
        choices.append(
            {"index": i, "text": prompt, "logprobs": logprobs, "finish_reason": "length"}
        )
    return _envelope("cmpl", "text_completion", model, choices, out)


def _completion(body: CompletionRequest, models: dict[str, ServedModel]) -> dict[str, Any]:
    model = _model(models, body.model)
    if body.echo:
        return _echo(body, model)
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    out = model.generate(
        model.render(prompt=prompt),
        16 if body.max_tokens is None else body.max_tokens,
        body.logprobs or 0,
        body.temperature or 0.0,
        body.seed or 0,
    )
    logprobs = None
    if body.logprobs is not None:
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
    choice["finish_reason"] = out["finish_reason"]
    return _envelope("cmpl", "text_completion", model, [choice], out)


def _chat(body: ChatRequest, models: dict[str, ServedModel]) -> dict[str, Any]:
    model = _model(models, body.model)
    messages = [m.model_dump() for m in body.messages]
    n_top = (body.top_logprobs or 0) if body.logprobs else 0
    out = model.generate(
        model.render(messages=messages),
        16 if body.max_tokens is None else body.max_tokens,
        n_top,
        body.temperature or 0.0,
        body.seed or 0,
    )

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    logprobs = None
    if body.logprobs:
        content = []
        for token, logprob, top in zip(
            out["tokens"], out["token_logprobs"], out["top"], strict=True
        ):
            content.append({**entry(token, logprob), "top_logprobs": [entry(t, v) for t, v in top]})
        logprobs = {"content": content}
    message = {"role": "assistant", "content": out["text"]}
    choice = {"index": 0, "message": message, "logprobs": logprobs}
    choice["finish_reason"] = out["finish_reason"]
    return _envelope("chatcmpl", "chat.completion", model, [choice], out)


def _error(message: str, kind: str, status: int) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status)


def _describe(error: RequestValidationError) -> str:
    """One line per failed field, e.g. ``body.max_tokens: Input should be <= 512``."""
    parts = []
    for e in error.errors():
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{where}: {e['msg']}" if where else e["msg"])
    return "; ".join(parts) or "invalid request"


def build_app(models: dict[str, ServedModel]) -> FastAPI:
    """A FastAPI app serving ``models`` (name -> variant) with the OpenAI endpoints."""
    app = FastAPI(title="gatelab edge expert")

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return _error(_describe(error), "invalid_request_error", 400)

    @app.exception_handler(ModelNotFound)
    async def not_found(_: Request, error: ModelNotFound) -> JSONResponse:
        return _error(str(error), "not_found_error", 404)

    @app.exception_handler(ValueError)
    async def bad_value(_: Request, error: ValueError) -> JSONResponse:
        return _error(str(error), "invalid_request_error", 400)  # e.g. a prompt of no tokens

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": sorted(models)}

    @app.get("/v1/models")
    async def list_models() -> dict:
        data = [{"id": n, "object": "model", "owned_by": "gatelab"} for n in sorted(models)]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> dict:
        return await run_in_threadpool(_completion, body, models)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> dict:
        return await run_in_threadpool(_chat, body, models)

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
