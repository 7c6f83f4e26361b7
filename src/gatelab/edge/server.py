"""The OpenAI-compatible HTTP app over :class:`~gatelab.edge.served.ServedModel` experts.

Endpoints: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/completions`` and ``POST /v1/chat/completions``, with OpenAI's request and response
layouts (legacy ``logprobs`` on completions, ``logprobs.content`` on chat), so OpenAI clients,
lm-evaluation-harness's ``local-completions`` and :class:`~gatelab.edge.client.EdgeExpert` talk
to it as to any OpenAI-compatible server. Every response carries ``usage`` and an ``x_gatelab``
extension (forward FLOPs, measured compute seconds, layers: see :mod:`gatelab.edge.engine`).

What is served, and what is refused:

- ``stream`` (server-sent events ending with ``data: [DONE]``; ``stream_options.include_usage``
  adds a last chunk with the usage), ``n``, ``stop`` (up to 4 strings, cut before them),
  ``max_tokens`` (and ``max_completion_tokens`` on chat), ``temperature``, ``top_p``, ``seed``.
- Completions: ``prompt`` as a string, a list of strings, token ids or a list of token-id lists;
  ``echo`` with any ``max_tokens >= 0`` (the prompt's tokens are scored and returned before the
  completion) and ``logprobs`` 0-20: per token its log-probability and a dict of the ``k`` most
  likely tokens of that position plus the actual one (OpenAI's legacy semantics).
- Chat: ``content`` as a string or a list of ``{"type": "text"}`` parts; ``logprobs`` and
  ``top_logprobs`` 0-20.
- ``user`` is accepted (metadata); ``presence_penalty``/``frequency_penalty`` 0, an empty
  ``logit_bias``, ``best_of == n``, ``response_format: {"type": "text"}``, no ``tools`` are
  accepted as the no-ops they are. Any other field or value is answered 400 naming it.

Bounds (:func:`build_app`): request bodies of at most ``max_body_bytes`` (413), prompts plus
``max_tokens`` within the model's context (400), a bounded queue (503 with ``Retry-After``), a
per-request timeout (504), work dropped when the client disconnects, optional API key (401).
Every error is OpenAI's ``{"error": {"message", "type", "param", "code"}}``
(:mod:`gatelab.edge.openai_api`).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request

from gatelab.edge.engine import Engine, EngineBusy, Job, Prompt, Sampling, TokenOut
from gatelab.edge.generate import Records
from gatelab.edge.openai_api import (
    MAX_BODY_BYTES,
    MAX_TOKENS,
    ChatRequest,
    CompletionRequest,
    OpenAIError,
    RequestGuard,
    SampledRequest,
    install_error_handlers,
    read_json,
    sse_response,
    validate,
)
from gatelab.edge.served import ServedModel

MAX_PROMPTS = 16  # prompts in one completions request
MAX_ROWS = 64  # prompts x n in one request
TIMEOUT_S = 120.0  # per request, queueing included


def _model(models: dict[str, ServedModel], name: str) -> ServedModel:
    if name not in models:
        raise OpenAIError(
            404,
            f"model {name!r} not found; available: {sorted(models)}",
            "not_found_error",
            param="model",
            code="model_not_found",
        )
    return models[name]


def _max_new(asked: int | None, default: int, longest_prompt: int, served: ServedModel) -> int:
    """Tokens to generate: as asked (refused past the context) or the default, clipped to it."""
    room = served.context - longest_prompt
    if room < 0 or (asked is None and room < 1):
        raise OpenAIError(
            400,
            f"the prompt has {longest_prompt} tokens; model {served.name!r} has a context of "
            f"{served.context} tokens",
            param="prompt",
            code="context_length_exceeded",
        )
    if asked is None:
        return min(default, room)
    if asked > room:
        raise OpenAIError(
            400,
            f"{longest_prompt} prompt tokens + max_tokens {asked} exceed the context of "
            f"{served.context} tokens of model {served.name!r}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return asked


def _sampling(body: SampledRequest, max_tokens: int, top_k: int) -> Sampling:
    temperature = body.temperature or 0.0
    return Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=body.stops(),
        top_k=top_k,
        n=body.n,
        seed=body.seed,
    )


class _Collected:
    """What a job's events add up to (non-streaming responses)."""

    def __init__(self) -> None:
        self.scored: dict[int, Records] = {}
        self.tokens: dict[int, list[TokenOut]] = {}
        self.text: dict[int, str] = {}
        self.finish: dict[int, str] = {}
        self.stats: dict = {}

    def add(self, event: tuple) -> None:
        kind = event[0]
        if kind == "scored":
            self.scored[event[1]] = event[2]
        elif kind == "token":
            self.tokens.setdefault(event[1], []).append(event[2])
            self.text[event[1]] = self.text.get(event[1], "") + event[2].delta
        elif kind == "end":
            self.text[event[1]] = self.text.get(event[1], "") + event[3]
            self.finish[event[1]] = event[2]
        elif kind == "done":
            self.stats = event[1]


class _Runner:
    """Submits jobs to the engine and turns their events into responses."""

    def __init__(self, models: dict[str, ServedModel], engine: Engine, timeout_s: float) -> None:
        self.models, self.engine, self.timeout_s = models, engine, timeout_s

    def submit(self, job: Job) -> Job:
        job.loop, job.events, job.timeout_s = (
            asyncio.get_running_loop(),
            asyncio.Queue(),
            self.timeout_s,
        )
        try:
            self.engine.submit(job)
        except EngineBusy as error:
            raise OpenAIError(
                503,
                f"server busy ({error}); retry later",
                "server_error",
                code="server_busy",
                headers={"Retry-After": "1"},
            ) from None
        return job

    async def events(self, job: Job, request: Request | None) -> AsyncIterator[tuple]:
        """The job's events; the job is cancelled if the client goes away or stops reading.

        With ``request`` the connection is checked every 0.2 s, events or not (a streaming
        response is watched by Starlette instead, which cancels this generator).
        """
        checked = time.monotonic()
        try:
            while True:
                if request is not None and time.monotonic() - checked > 0.2:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        job.cancel()
                        return
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=0.2)
                except TimeoutError:
                    continue
                if event[0] == "error":
                    failed = event[1]
                    kind = "timeout_error" if failed.status == 504 else "server_error"
                    raise OpenAIError(failed.status, str(failed), kind, code=failed.code)
                yield event
                if event[0] == "done":
                    return
        finally:
            if not job.finished:
                job.cancel()

    async def collect(self, job: Job, request: Request) -> _Collected:
        out = _Collected()
        async for event in self.events(job, request):
            out.add(event)
        if not out.stats:
            raise OpenAIError(499, "client closed the request", code="client_closed")
        return out


def _envelope(kind: str, served: ServedModel, rid: str, choices: list, usage: dict | None) -> dict:
    body: dict[str, Any] = {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": served.name,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    return body


def _usage(prompt_tokens: int, stats: dict) -> dict:
    completion = stats.get("completion_tokens", 0)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def _x_gatelab(stats: dict) -> dict:
    return {k: stats[k] for k in ("flops", "compute_s", "n_layers")}


class _Completions:
    """``/v1/completions``: one job for all prompts, echo records and generated rows."""

    def __init__(self, body: CompletionRequest, served: ServedModel) -> None:
        self.body, self.served = body, served
        prompts = body.prompts()
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise OpenAIError(400, f"'prompt' must hold 1-{MAX_PROMPTS} prompts", param="prompt")
        for p in prompts:
            if not p:
                raise OpenAIError(400, "'prompt' is empty", param="prompt")
            if isinstance(p, list) and not all(0 <= t < served.vocab_size for t in p):
                message = f"'prompt' token ids must be in [0, {served.vocab_size})"
                raise OpenAIError(400, message, param="prompt")
        if len(prompts) * body.n > MAX_ROWS:
            raise OpenAIError(400, f"prompts x n must be <= {MAX_ROWS}", param="n")
        self.prompts = prompts
        try:
            inputs = [served.completion_ids(p, body.echo) for p in prompts]
        except ValueError as error:
            raise OpenAIError(400, str(error), param="prompt") from None
        longest = max(len(ids) for ids, _ in inputs)
        max_new = _max_new(body.max_tokens, 16, longest, served)
        self.k = body.logprobs or 0
        self.job = Job(
            served,
            [Prompt(ids, n_head, body.echo) for ids, n_head in inputs],
            _sampling(body, max_new, self.k),
        )
        self.prompt_tokens = sum(len(ids) for ids, _ in inputs)
        self.echoed = [served.echo_pieces(p) for p in prompts] if body.echo else []
        self.rid = f"cmpl-{uuid.uuid4().hex[:24]}"

    def _top(self, values: list[float], ids: list[int], actual: int, value: float) -> dict:
        top = {self.served.piece(i): v for v, i in zip(values, ids, strict=True)}
        top.setdefault(self.served.piece(actual), value)  # the actual token, always
        return top

    def echo_logprobs(self, p: int, records: Records) -> dict:
        """Legacy logprobs of prompt ``p``'s own tokens (after the head)."""
        _, pieces, offsets = self.echoed[p]
        prompt = self.job.prompts[p]
        n_head, values = prompt.n_head, []
        tops: list[dict | None] = []
        for i in range(n_head, len(prompt.ids)):
            if i == 0:
                values.append(None)
                tops.append(None)
                continue
            value = float(records.logprobs[i])
            values.append(value)
            ids = records.top_ids[i, : self.k].tolist()
            tops.append(
                self._top(records.top_values[i, : self.k].tolist(), ids, prompt.ids[i], value)
            )
        return {
            "tokens": list(pieces),
            "token_logprobs": values,
            "top_logprobs": tops,
            "text_offset": list(offsets),
        }

    def generated_logprobs(self, tokens: list[TokenOut], start: int) -> dict:
        """Legacy logprobs of generated tokens, offsets counted from ``start``."""
        return {
            "tokens": [t.text for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [
                {piece: v for piece, v in t.top} | {t.text: t.logprob} for t in tokens
            ],
            "text_offset": [start + t.offset for t in tokens],
        }

    def response(self, got: _Collected) -> dict:
        body, choices = self.body, []
        n_rows = len(self.prompts) * body.n
        for row in range(n_rows):
            p = row // body.n
            text, logprobs = got.text.get(row, ""), None
            prefix = self.echoed[p][0] if body.echo else ""
            if body.logprobs is not None:
                logprobs = {
                    "tokens": [],
                    "token_logprobs": [],
                    "top_logprobs": [],
                    "text_offset": [],
                }
                if body.echo:
                    logprobs = self.echo_logprobs(p, got.scored[p])
                generated = self.generated_logprobs(got.tokens.get(row, []), len(prefix))
                for key in logprobs:
                    logprobs[key] = logprobs[key] + generated[key]
            finish = got.finish.get(row, "length")
            choices.append(
                {"index": row, "text": prefix + text, "logprobs": logprobs, "finish_reason": finish}
            )
        reply = _envelope(
            "text_completion", self.served, self.rid, choices, _usage(self.prompt_tokens, got.stats)
        )
        reply["x_gatelab"] = _x_gatelab(got.stats)
        return reply

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        return _envelope("text_completion", self.served, self.rid, choices, usage)

    async def stream(self, events: AsyncIterator[tuple]) -> AsyncIterator[dict]:
        body = self.body
        started: set[int] = set()
        stats: dict = {}

        def opening(row: int, records: Records | None) -> dict:
            started.add(row)
            p = row // body.n
            logprobs = None
            if body.logprobs is not None and records is not None:
                logprobs = self.echo_logprobs(p, records)
            return {
                "index": row,
                "text": self.echoed[p][0],
                "logprobs": logprobs,
                "finish_reason": None,
            }

        async for event in events:
            kind = event[0]
            if kind == "scored":
                rows = range(event[1] * body.n, (event[1] + 1) * body.n)
                yield self.chunk([opening(r, event[2]) for r in rows])
            elif kind == "token":
                row, token = event[1], event[2]
                start = len(self.echoed[row // body.n][0]) if body.echo else 0
                logprobs = (
                    self.generated_logprobs([token], start) if body.logprobs is not None else None
                )
                if token.delta or logprobs:
                    yield self.chunk(
                        [
                            {
                                "index": row,
                                "text": token.delta,
                                "logprobs": logprobs,
                                "finish_reason": None,
                            }
                        ]
                    )
            elif kind == "end":
                yield self.chunk(
                    [
                        {
                            "index": event[1],
                            "text": event[3],
                            "logprobs": None,
                            "finish_reason": event[2],
                        }
                    ]
                )
            elif kind == "done":
                stats = event[1]
        if not body.max_tokens and body.echo:  # scoring only: every choice ends here
            yield self.chunk(
                [{"index": r, "text": "", "logprobs": None, "finish_reason": "length"}
                 for r in range(len(self.prompts) * body.n)]
            )  # fmt: skip
        if body.stream_options is not None and body.stream_options.include_usage:
            usage = _usage(self.prompt_tokens, stats)
            reply = self.chunk([], usage)
            reply["x_gatelab"] = _x_gatelab(stats)
            yield reply


class _Chat:
    """``/v1/chat/completions``: one job of ``n`` rows over the rendered conversation."""

    def __init__(self, body: ChatRequest, served: ServedModel) -> None:
        self.body, self.served = body, served
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = served.chat_ids(messages)
        asked = body.max_completion_tokens or body.max_tokens
        max_new = _max_new(asked, MAX_TOKENS, len(ids), served)
        self.k = (body.top_logprobs or 0) if body.logprobs else 0
        self.job = Job(served, [Prompt(ids)], _sampling(body, max_new, self.k))
        self.prompt_tokens = len(ids)
        self.rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"

    @staticmethod
    def _entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    def content_logprobs(self, tokens: list[TokenOut]) -> list[dict]:
        return [
            {
                **self._entry(t.text, t.logprob),
                "top_logprobs": [self._entry(piece, v) for piece, v in t.top],
            }
            for t in tokens
        ]

    def response(self, got: _Collected) -> dict:
        choices = []
        for row in range(self.body.n):
            logprobs = None
            if self.body.logprobs:
                logprobs = {"content": self.content_logprobs(got.tokens.get(row, []))}
            message = {"role": "assistant", "content": got.text.get(row, "")}
            choices.append(
                {
                    "index": row,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": got.finish.get(row, "length"),
                }
            )
        reply = _envelope(
            "chat.completion", self.served, self.rid, choices, _usage(self.prompt_tokens, got.stats)
        )
        reply["x_gatelab"] = _x_gatelab(got.stats)
        return reply

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        return _envelope("chat.completion.chunk", self.served, self.rid, choices, usage)

    async def stream(self, events: AsyncIterator[tuple]) -> AsyncIterator[dict]:
        yield self.chunk(
            [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}
                for i in range(self.body.n)
            ]
        )  # fmt: skip
        stats: dict = {}
        async for event in events:
            kind = event[0]
            if kind == "token":
                token = event[2]
                logprobs = (
                    {"content": self.content_logprobs([token])} if self.body.logprobs else None
                )
                if token.delta or logprobs:
                    yield self.chunk(
                        [{"index": event[1], "delta": {"content": token.delta},
                          "logprobs": logprobs, "finish_reason": None}]
                    )  # fmt: skip
            elif kind == "end":
                delta = {"content": event[3]} if event[3] else {}
                yield self.chunk(
                    [
                        {
                            "index": event[1],
                            "delta": delta,
                            "logprobs": None,
                            "finish_reason": event[2],
                        }
                    ]
                )
            elif kind == "done":
                stats = event[1]
        if self.body.stream_options is not None and self.body.stream_options.include_usage:
            reply = self.chunk([], _usage(self.prompt_tokens, stats))
            reply["x_gatelab"] = _x_gatelab(stats)
            yield reply


def build_app(
    models: dict[str, ServedModel],
    engine: Engine | None = None,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    timeout_s: float = TIMEOUT_S,
) -> FastAPI:
    """A FastAPI app serving ``models`` (name -> variant) with the OpenAI endpoints.

    Args:
        models: the variants served, by name.
        engine: the worker that runs them (default: ``Engine()``: 8 rows batched, 32 queued).
        api_key: if set, clients must send ``Authorization: Bearer <api_key>``.
        max_body_bytes: the largest request body (413 above).
        timeout_s: per-request limit, queueing included (504 after it).
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    engine = engine or Engine()
    runner = _Runner(models, engine, timeout_s)
    app = FastAPI(title="gatelab edge expert", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    install_error_handlers(app)
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=max_body_bytes)

    def card(name: str) -> dict:
        served = models[name]
        return {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "gatelab",
            "max_model_len": served.context,  # vLLM's field: the context in tokens
        }

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": sorted(models), "load": engine.load()}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [card(n) for n in sorted(models)]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict:
        _model(models, name)
        return card(name)

    async def serve(request: Request, work: _Completions | _Chat) -> Any:
        runner.submit(work.job)
        if work.body.stream:
            events = runner.events(work.job, None)  # Starlette cancels the stream on disconnect
            return sse_response(work.stream(events), on_close=work.job.cancel)
        return work.response(await runner.collect(work.job, request))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = validate(CompletionRequest, await read_json(request))
        body.check()
        work = _Completions(body, _model(models, body.model))
        return await serve(request, work)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = validate(ChatRequest, await read_json(request))
        body.check()
        return await serve(request, _Chat(body, _model(models, body.model)))

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
        self.app = app
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
        """Ask uvicorn to exit, wait for the thread, stop the engine's worker."""
        self._server.should_exit = True
        self._thread.join(timeout=10)
        engine = getattr(self.app.state, "engine", None)
        if engine is not None:
            engine.stop()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
