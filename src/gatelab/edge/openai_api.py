"""Reusable pieces of an OpenAI-compatible HTTP server: errors, request guard, strict JSON, SSE.

Everything a FastAPI app needs to answer like the OpenAI API does, whatever goes wrong:

- :class:`OpenAIError` and :func:`error_response`: the ``{"error": {"message", "type", "param",
  "code"}}`` body with an HTTP status (and headers such as ``Retry-After``);
  :func:`install_error_handlers` makes every failure of an app answer in that format: request
  validation (400, naming the field), unknown routes (404), wrong methods (405) and unexpected
  exceptions (500, never a plain-text page).
- :class:`RequestGuard`: a pure ASGI middleware that, before any endpoint runs, checks the API
  key (``Authorization: Bearer``, 401), the body size (``Content-Length`` and the bytes actually
  received, 413) and the ``Content-Type`` of POST bodies (``application/json``, 415).
- :func:`parse_json` and :func:`validate`: strict JSON (no ``NaN``/``Infinity``, bounded nesting)
  and pydantic validation whose errors name the field (``extra="forbid"`` models: a field the
  server does not implement is refused with 400 naming it, never silently ignored).
- :class:`CompletionRequest` and :class:`ChatRequest`: the request bodies of
  ``/v1/completions`` and ``/v1/chat/completions`` (strict; a server extends them with its own
  fields and checks).
- :func:`sse_response`: server-sent events in OpenAI's framing (``data: {json}`` events, then
  ``data: [DONE]``).

Used by :mod:`gatelab.edge.server` and the MoE² router :mod:`gatelab.edge.route`.
"""

from __future__ import annotations

import hmac
import inspect
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # 1 MiB: ~8k tokens as text or token ids fit many times over
MAX_JSON_DEPTH = 32  # the deepest valid request (chat content parts) nests 4 levels

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


class OpenAIError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status.

    Args:
        status: HTTP status code.
        message: one line naming the culprit.
        kind: OpenAI's ``type`` (``invalid_request_error``, ``not_found_error``, ...).
        param: the request field at fault, if any.
        code: a short machine-readable code (``invalid_api_key``, ``server_busy``, ...).
        headers: extra response headers (``Retry-After``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code, self.headers = param, code, headers or {}


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(error: OpenAIError) -> JSONResponse:
    """The JSON response of an :class:`OpenAIError`."""
    body = error_body(error.message, error.kind, error.param, error.code)
    return JSONResponse(body, error.status, headers=error.headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "body"}


def _where(loc: tuple) -> str:
    """``("messages", 0, "role")`` -> ``messages[0].role``.

    pydantic puts the member of a union it tried into the location (``str``, ``list[int]``,
    ``TextPart``); fields are snake_case names, so anything else is dropped.
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[a-z_][a-z0-9_]*", part) and part not in _TYPE_TAGS:
            out += ("." if out else "") + part
    return out


def describe_validation(errors: list[dict]) -> tuple[str, str | None]:
    """One line naming the first failing field, and that field (OpenAI's ``param``)."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    where = _where(tuple(first.get("loc", ())))
    if first.get("type") == "extra_forbidden":
        message = f"{where!r} is not supported by this server"
    elif where:
        message = f"{where}: {first['msg']}"
    else:
        message = first["msg"]
    others = {_where(tuple(e.get("loc", ()))) for e in errors[1:]} - {where}
    if others:
        message += f" (also: {', '.join(sorted(others))})"
    return message, where or None


def validate(model: type[BaseModel], data: Any) -> Any:
    """``model.model_validate(data)``, a failure raised as a 400 naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        message, param = describe_validation(error.errors())
        raise OpenAIError(400, message, param=param) from None
    except RecursionError:
        raise OpenAIError(400, "request body is nested too deeply") from None


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, stopping at ``limit + 1`` (iterative: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return deepest


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def parse_json(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict:
    """The request body as a JSON object; anything else is a 400 naming what is wrong.

    ``NaN``, ``Infinity`` and ``-Infinity`` (which Python's ``json`` accepts) are refused, as is
    nesting deeper than ``max_depth`` (the parser itself would overflow the stack at ~1,000).
    """
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise OpenAIError(400, f"request body is nested deeper than {max_depth} levels") from None
    except UnicodeDecodeError:
        raise OpenAIError(400, "request body is not UTF-8") from None
    except ValueError as error:  # JSONDecodeError is a ValueError
        raise OpenAIError(400, f"request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, f"request body must be a JSON object, got {type(data).__name__}")
    if _depth(data, max_depth) > max_depth:
        raise OpenAIError(400, f"request body is nested deeper than {max_depth} levels")
    return data


async def read_json(request: Request, max_depth: int = MAX_JSON_DEPTH) -> dict:
    """:func:`parse_json` of the request's body (already bounded by :class:`RequestGuard`)."""
    return parse_json(await request.body(), max_depth)


class RequestGuard:
    """ASGI middleware: API key (401), body size (413) and JSON Content-Type (415) of requests.

    The body is read here, up to ``max_body_bytes``, and replayed to the app; after it, the
    app's ``receive`` is the server's own, so ``request.is_disconnected()`` keeps working.
    ``GET /health`` needs no key (liveness probes).

    Args:
        app: the wrapped ASGI app.
        api_key: the key clients must send as ``Authorization: Bearer <key>``; None: no auth.
        max_body_bytes: the largest request body accepted.
    """

    def __init__(
        self, app: ASGIApp, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES
    ) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def _refuse(self, send: Callable, error: OpenAIError) -> None:
        body = json.dumps(error_body(error.message, error.kind, error.param, error.code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _check_headers(self, scope: dict) -> OpenAIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and scope["path"] != "/health":
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.api_key.encode()
            ):
                return OpenAIError(
                    401,
                    "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        if scope["method"] == "POST":
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                shown = media or "none"
                return OpenAIError(
                    415, f"Content-Type must be application/json, got {shown}", param="headers"
                )
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return OpenAIError(
                413, f"request body is larger than {self.max_body_bytes} bytes", code="too_large"
            )
        return None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        """Check, read the bounded body, then run the app with it replayed."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = self._check_headers(scope)
        if refused is not None:
            await self._refuse(send, refused)
            return
        chunks, size = [], 0
        while True:  # read the whole body, bounded (a chunked body has no Content-Length)
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                too_large = OpenAIError(
                    413,
                    f"request body is larger than {self.max_body_bytes} bytes",
                    code="too_large",
                )
                await self._refuse(send, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error of ``app`` answer in OpenAI's JSON error format."""

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, error: OpenAIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        message, param = describe_validation(list(error.errors()))
        return error_response(OpenAIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            message = f"no route {request.url.path}"
            return error_response(OpenAIError(404, message, "not_found_error", code="not_found"))
        if error.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
            allowed = dict(error.headers or {})  # Starlette names the allowed methods
            return error_response(
                OpenAIError(405, message, code="method_not_allowed", headers=allowed)
            )
        return error_response(OpenAIError(error.status_code, str(error.detail)))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error")  # the traceback goes to the log, not to the client
        kind = type(error).__name__
        return error_response(
            OpenAIError(500, f"internal server error ({kind})", "server_error", code="internal")
        )


# Request bodies of /v1/completions and /v1/chat/completions (OpenAI's layouts, strict).

MAX_TOKENS = 512  # longest completion served per choice
MAX_CHOICES = 8  # n
MAX_TOP_LOGPROBS = 20  # OpenAI's chat API limit; the legacy API allowed 5
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
TopK = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]


class StrictModel(BaseModel):
    """A request object validated strictly: wrong types and unknown fields are 400s."""

    # strict: "5", 5.0 or true are not integers, NaN/Infinity are not numbers; extra="forbid":
    # a field this server does not implement is refused, never silently ignored
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(StrictModel):
    """``stream_options``."""

    include_usage: bool = False


class SampledRequest(StrictModel):
    """The fields both endpoints share."""

    model: str
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None  # 0 or None: greedy
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: Seed | None = None
    user: str | None = None  # metadata only, as in OpenAI's API
    presence_penalty: float | None = None  # accepted as 0 only
    frequency_penalty: float | None = None  # accepted as 0 only
    logit_bias: dict[str, float] | None = None  # accepted empty only

    def check(self) -> None:
        """Refuse values of the accepted no-op fields that would change the output."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise OpenAIError(400, f"{name!r} is not supported (only 0)", param=name)
        if self.logit_bias:
            raise OpenAIError(400, "'logit_bias' is not supported (only {})", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            message = "'stream_options' is only allowed with 'stream': true"
            raise OpenAIError(400, message, param="stream_options")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if any(not s for s in stops):
            raise OpenAIError(400, "'stop' strings must not be empty", param="stop")

    def stops(self) -> tuple[str, ...]:
        """``stop`` as a tuple."""
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(SampledRequest):
    """Body of ``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS)] | None = None  # default 16
    logprobs: TopK | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1)] | None = None  # accepted equal to n only
    suffix: str | None = None  # accepted empty only

    def check(self) -> None:
        """Semantic checks after the schema (one line naming the field)."""
        super().check()
        if self.best_of is not None and self.best_of != self.n:
            raise OpenAIError(400, "'best_of' is not supported (only equal to n)", param="best_of")
        if self.suffix:
            raise OpenAIError(400, "'suffix' is not supported", param="suffix")
        if self.max_tokens == 0 and not self.echo:
            message = "'max_tokens' must be >= 1 (0 only with 'echo')"
            raise OpenAIError(400, message, param="max_tokens")

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list (a string, or a list of token ids, per prompt)."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TextPart(StrictModel):
    """One part of a chat message's content."""

    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    """One chat turn."""

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(SampledRequest):
    """Body of ``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = None
    logprobs: bool | None = None
    top_logprobs: TopK | None = None
    response_format: dict[str, str] | None = None  # accepted as {"type": "text"} only
    tools: list[dict] | None = None  # accepted empty only
    tool_choice: Literal["none"] | None = None

    def check(self) -> None:
        """Semantic checks after the schema (one line naming the field)."""
        super().check()
        if self.response_format not in (None, {"type": "text"}):
            message = "'response_format' is not supported (only {'type': 'text'})"
            raise OpenAIError(400, message, param="response_format")
        if self.tools:
            raise OpenAIError(400, "'tools' are not supported", param="tools")
        if self.top_logprobs and not self.logprobs:
            message = "'top_logprobs' needs 'logprobs': true"
            raise OpenAIError(400, message, param="top_logprobs")
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            message = "'max_tokens' and 'max_completion_tokens' differ: send one"
            raise OpenAIError(400, message, param="max_completion_tokens")


def sse_event(data: dict | str) -> str:
    """One server-sent event: ``data: <json>`` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class _EventStream(StreamingResponse):
    """A StreamingResponse that runs ``close`` however it ends.

    Starlette starts the body iterator only after sending the headers; a client gone before
    that leaves the iterator unstarted, and its ``finally`` would never run.
    """

    def __init__(self, body: AsyncIterator[str], close: Callable[[], Awaitable[None]]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self.close = close

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.close()


def sse_response(
    events: AsyncIterator[dict], on_close: Callable[[], None | Awaitable[None]] | None = None
) -> StreamingResponse:
    """Stream ``events`` as OpenAI's server-sent events, ending with ``data: [DONE]``.

    An error raised while streaming (after the 200 status is sent) becomes a final
    ``{"error": ...}`` event, as OpenAI's API does. ``on_close`` (a function or a coroutine
    function) runs once however the stream ends, including when the client disconnects (the
    generator is cancelled then) or leaves before the body starts.
    """
    closed = False

    async def close() -> None:
        nonlocal closed
        if closed or on_close is None:
            return
        closed = True
        result = on_close()
        if inspect.isawaitable(result):
            await result

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield sse_event(event)
        except OpenAIError as error:
            yield sse_event(error_body(error.message, error.kind, error.param, error.code))
        finally:
            await close()
        yield sse_event("[DONE]")

    return _EventStream(body(), close)
