r"""``gatelab edge route``: the MoE² router as an OpenAI-compatible server (arXiv:2501.09410).

``POST /v1/completions`` and ``POST /v1/chat/completions`` take OpenAI's request bodies
(:mod:`gatelab.edge.openai_api`, strict: an unknown field is a 400 naming it) with ``model:
"moe2"`` and an optional ``x_gatelab`` object of per-request budgets::

    {"energy_budget": J, "delay_budget": s, "category": str, "options": [4 strings]}

(budgets are *modelled*, per query; a missing budget takes the server's default, a missing
category the nearest training centroid of the request's MiniLM embedding).

**Multiple choice.** A request is multiple choice when ``x_gatelab.options`` holds four options
(the prompt, or the last user message, is then the question), or when its text is in the
question format every expert is asked in (:func:`gatelab.edge.data.format_prompt`)::

    Question: <text>
    A. <option>
    B. <option>
    C. <option>
    D. <option>
    Answer:

(``A)`` / ``(A)`` also read as option markers; ``Question:`` and ``Answer:`` are optional).
Then :func:`gatelab.edge.router.ask_async` plans the subset :math:`S^*` under the budgets, asks its
experts concurrently and mixes their option distributions with the gate,
:math:`p(y \mid x) = \sum_{i \in S^*} w_i(x)\, p_i(y \mid x)`. The reply's text is the letter of
the argmax; ``x_gatelab`` holds the distribution, the weights :math:`w_i`, each expert's measured
round trip and modelled costs, the modelled totals :math:`e(S) = \sum_i e_i` and
:math:`d(S) = \max_i d_i + t_\text{agg}` over the experts that answered, and the measured latency.

**Free text.** Anything else is forwarded, unchanged but for ``model``, to the selected expert
with the largest gate weight; if it fails (unreachable, timeout, HTTP error, malformed reply)
the next one is tried, then a subset planned again without the failed experts. With
``stream: true`` the expert's server-sent events are relayed as they arrive (a failure after the
first event ends the stream with an error event; before it, the next expert is tried).

**Failures.** Experts that fail are named with their cause in ``x_gatelab.failed`` and the gate
renormalises over those that answered; when none answers the reply is 502 listing every cause
(400 when every expert refused the request itself with a 4xx). Budgets that no expert fits are a
400 naming the budget. At most ``max_in_flight`` requests run at once and ``max_queue`` wait;
beyond that the reply is 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Annotated, Any

import httpx
import numpy as np
import torch
from fastapi import FastAPI, Request
from pydantic import Field

from gatelab.edge import router
from gatelab.edge.client import EdgeExpert, connect_cause, server_message
from gatelab.edge.data import LETTERS
from gatelab.edge.model import embed_texts, mixture
from gatelab.edge.openai_api import (
    MAX_BODY_BYTES,
    ChatRequest,
    CompletionRequest,
    OpenAIError,
    RequestGuard,
    StrictModel,
    install_error_handlers,
    read_json,
    sse_response,
    validate,
)

ROUTER_MODEL = "moe2"  # the model id clients send
MAX_IN_FLIGHT = 16
MAX_QUEUE = 64
Budget = Annotated[float, Field(ge=0)]


class RouteOptions(StrictModel):
    """``x_gatelab``: per-request budgets (modelled, per query), category, explicit options."""

    energy_budget: Budget | None = None
    delay_budget: Budget | None = None
    category: str | None = None
    options: Annotated[list[str], Field(min_length=4, max_length=4)] | None = None


class RouteCompletionRequest(CompletionRequest):
    """``/v1/completions`` body with ``x_gatelab``."""

    x_gatelab: RouteOptions | None = None


class RouteChatRequest(ChatRequest):
    """``/v1/chat/completions`` body with ``x_gatelab``."""

    x_gatelab: RouteOptions | None = None


_OPTION_LINE = re.compile(r"^\s*\(?([A-D])[.):]\s*(\S.*?)\s*$")


def parse_multiple_choice(text: str) -> tuple[str, list[str]] | None:
    """``(question, options)`` of a prompt in :func:`~gatelab.edge.data.format_prompt`'s layout.

    The options are four consecutive lines marked ``A.``-``D.`` (or ``A)``, ``(A)``), in order,
    after a non-empty question; only an ``Answer:`` line may follow. None otherwise.
    """
    lines = text.strip().splitlines()
    for start in range(len(lines) - 3):
        found = [_OPTION_LINE.match(line) for line in lines[start : start + 4]]
        if not all(found) or "".join(m.group(1) for m in found) != LETTERS:
            continue
        question = "\n".join(lines[:start]).strip()
        question = re.sub(r"^Question:\s*", "", question).strip()
        rest = "\n".join(lines[start + 4 :]).strip()
        if question and rest in ("", "Answer:"):
            return question, [m.group(2) for m in found]
    return None


def _request_text(body: RouteCompletionRequest | RouteChatRequest) -> str:
    """The text a request is about: its prompt, or its last user message (else the last one)."""
    if isinstance(body, RouteChatRequest):
        users = [m for m in body.messages if m.role == "user"] or body.messages
        return users[-1].text()
    prompts = body.prompts()
    if not all(isinstance(p, str) for p in prompts):
        message = "'prompt' as token ids is not supported by the router (send text)"
        raise OpenAIError(400, message, param="prompt")
    return "\n".join(prompts)  # type: ignore[arg-type]


def _finite(value: float) -> float | None:
    """JSON has no infinity: an unbounded budget is null."""
    return value if math.isfinite(value) else None


def check_budgets(
    state: router.RouterState, category: str, energy_budget: float, delay_budget: float
) -> None:
    """Refuse budgets that no single expert of ``category`` fits (400 naming the budget).

    Raises:
        OpenAIError: unknown category, or an infeasible budget.
    """
    if category not in state.categories:
        message = f"x_gatelab.category: unknown category {category!r}; known: "
        raise OpenAIError(400, message + str(sorted(state.categories)), param="x_gatelab.category")
    table = state.categories[category]
    energy = [float(e) for e in table["energy_j"]]
    delay = [float(d) + state.aggregate_s for d in table["delay_s"]]
    if min(energy) > energy_budget:
        raise OpenAIError(
            400,
            f"x_gatelab.energy_budget: {energy_budget:g} J fits no expert for category "
            f"{category!r} (the cheapest needs {min(energy):.4g} J)",
            param="x_gatelab.energy_budget",
            code="budget_infeasible",
        )
    if min(delay) > delay_budget:
        raise OpenAIError(
            400,
            f"x_gatelab.delay_budget: {delay_budget:g} s fits no expert for category "
            f"{category!r} (the fastest needs {min(delay):.4g} s)",
            param="x_gatelab.delay_budget",
            code="budget_infeasible",
        )
    both = zip(energy, delay, strict=True)
    if not any(e <= energy_budget and d <= delay_budget for e, d in both):
        raise OpenAIError(
            400,
            f"x_gatelab.energy_budget and x_gatelab.delay_budget: no expert for category "
            f"{category!r} fits both {energy_budget:g} J and {delay_budget:g} s",
            param="x_gatelab.energy_budget",
            code="budget_infeasible",
        )


def gate_weights(state: router.RouterState, x: np.ndarray, subset: list[int]) -> dict[str, float]:
    """The gate's weights :math:`w_i(x)` over ``subset`` (top-k softmax, zero outside)."""
    allowed = torch.zeros(len(state.experts), dtype=torch.bool)
    allowed[subset] = True
    uniform = torch.full((1, len(state.experts), len(LETTERS)), 0.25, dtype=torch.float64)
    with torch.no_grad():
        logits = state.gate(torch.as_tensor(x, dtype=torch.float64)[None])
        _, weights = mixture(logits, uniform, allowed, state.top_k)
    return {state.experts[i]: float(weights[0, i]) for i in subset}


class _Admission:
    """At most ``in_flight`` requests running and ``queue`` waiting; beyond that, 503."""

    def __init__(self, in_flight: int, queue: int) -> None:
        self.in_flight, self.limit, self.active = in_flight, in_flight + queue, 0
        self._running: asyncio.Semaphore | None = None  # made in the server's event loop

    def admit(self) -> Callable[[], None]:
        """Take a place (503 when full); returns the idempotent function that gives it back."""
        if self.active >= self.limit:
            raise OpenAIError(
                503,
                f"router busy ({self.active} requests in flight or queued); retry later",
                "server_error",
                code="server_busy",
                headers={"Retry-After": "1"},
            )
        self.active += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released, self.active = True, self.active - 1

        return release

    @property
    def running(self) -> asyncio.Semaphore:
        """The semaphore bounding the requests that run at once."""
        if self._running is None:
            self._running = asyncio.Semaphore(self.in_flight)
        return self._running


class _Router:
    """The request handlers' shared state: router state, experts, defaults, pools, clients."""

    def __init__(
        self,
        state: router.RouterState,
        experts: list[EdgeExpert],
        energy_budget: float,
        delay_budget: float,
        embed: Callable[[str], np.ndarray],
        admission: _Admission,
    ) -> None:
        self.state, self.experts = state, experts
        self.by_name = {e.name: e for e in experts}
        self.energy_budget, self.delay_budget = energy_budget, delay_budget
        self.embed, self.admission = embed, admission
        # embeddings are computed off the event loop (MiniLM, ~20 ms of CPU each)
        self.pool = ThreadPoolExecutor(admission.in_flight, thread_name_prefix="route")
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        """The one client every expert call shares (made in the server's loop, kept open)."""
        if self._client is None:
            self._client = httpx.AsyncClient()
        return self._client

    async def aclose(self) -> None:
        """Close the shared client and the embedding threads (the server's shutdown)."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def in_pool(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    def budgets(self, options: RouteOptions | None) -> tuple[float, float]:
        if options is None:
            return self.energy_budget, self.delay_budget
        energy = options.energy_budget
        delay = options.delay_budget
        return (
            self.energy_budget if energy is None else energy,
            self.delay_budget if delay is None else delay,
        )

    def category(self, options: RouteOptions | None, x: np.ndarray) -> str:
        if options is not None and options.category is not None:
            return options.category
        return router.nearest_category(self.state, x)

    # -- multiple choice -------------------------------------------------------------------

    async def answer_choice(
        self, question: str, options: list[str], route: RouteOptions | None
    ) -> router.AskResult:
        """Embed (in a worker thread), check the budgets, ask the subset concurrently."""
        text = router.query_text(question, options)
        x = np.asarray(await self.in_pool(self.embed, text), dtype=np.float64)
        category = self.category(route, x)
        energy_budget, delay_budget = self.budgets(route)
        check_budgets(self.state, category, energy_budget, delay_budget)
        try:
            return await router.ask_async(
                question,
                options,
                self.experts,
                self.state,
                energy_budget,
                delay_budget,
                category,
                embedding=x,
                client=self.client,
            )
        except ConnectionError as error:
            raise OpenAIError(502, str(error), "server_error", code="experts_failed") from None
        except ValueError as error:
            raise OpenAIError(400, str(error), param="x_gatelab") from None

    def choice_extension(
        self, result: router.AskResult, route: RouteOptions | None, measured_s: float
    ) -> dict:
        energy_budget, delay_budget = self.budgets(route)
        failed = {
            name: info["status"].removeprefix("failed: ")
            for name, info in result.per_expert.items()
            if info["status"] != "ok"
        }
        fields = asdict(result)
        return {
            "kind": "multiple_choice",
            **{k: fields[k] for k in ("answer", "probs", "category", "subset", "weights")},
            "experts": fields["per_expert"],
            "failed": failed,
            "notes": fields["notes"],
            "modelled_energy_j": result.modelled_energy_j,
            "modelled_delay_s": result.modelled_delay_s,
            "measured_s": measured_s,
            "energy_budget": _finite(energy_budget),
            "delay_budget": _finite(delay_budget),
        }

    async def multiple_choice(
        self,
        body: RouteCompletionRequest | RouteChatRequest,
        question: str,
        options: list[str],
        kind: str,
    ) -> Any:
        """The gate-combined letter as an OpenAI reply (or a one-chunk stream)."""
        _refuse_for_choice(body)
        start = time.perf_counter()
        result = await self.answer_choice(question, options, body.x_gatelab)
        if result.answer is None:  # no subset planned, though check_budgets passed singles
            raise OpenAIError(400, "; ".join(result.notes), param="x_gatelab")
        extension = self.choice_extension(result, body.x_gatelab, time.perf_counter() - start)
        if body.stream:
            return sse_response(_choice_stream(kind, result.answer, extension))
        return _choice_reply(kind, result.answer, extension)

    # -- free text -------------------------------------------------------------------------

    async def _open(
        self, expert: EdgeExpert, path: str, payload: dict, stream: bool
    ) -> tuple[httpx.Response | dict | None, str, int | None]:
        """Send ``payload`` to ``expert``.

        Returns:
            the open response (streaming) or the reply's JSON, else None; the cause of a
            failure; its HTTP status, if it was one.
        """
        url = expert.base_url.rstrip("/") + path
        body = payload | {"model": expert.model or expert.name}
        where = f"expert {expert.name} at {expert.base_url}: POST {path}"
        # the expert's key, read from its environment variable only (EdgeExpert's policy)
        request = self.client.build_request(
            "POST", url, json=body, headers=expert.headers(), timeout=expert.timeout_s
        )
        try:
            response = await self.client.send(request, stream=stream)
        except httpx.TimeoutException:
            return None, f"{where}: timed out after {expert.timeout_s:g} s", None
        except httpx.TransportError as error:
            return None, f"{where}: {connect_cause(error)}", None
        status = response.status_code
        if status >= 400:
            await response.aread()
            await response.aclose()
            return None, f"{where}: HTTP {status}: {server_message(response)}", status
        if stream:
            return response, "", status
        try:
            reply = response.json()
        except ValueError:
            reply = None
        if not isinstance(reply, dict) or not isinstance(reply.get("choices"), list):
            return None, f"{where}: bad response: no 'choices' ({response.text[:80]!r})", None
        return reply, "", status

    def _order(self, x: np.ndarray, subset: frozenset[int]) -> tuple[list[str], dict]:
        weights = gate_weights(self.state, x, sorted(subset))
        order = sorted(weights, key=lambda n: (-weights[n], self.state.experts.index(n)))
        return order, weights

    async def free_text(
        self, body: RouteCompletionRequest | RouteChatRequest, path: str, release: Callable
    ) -> Any:
        """Forward to the top-weighted selected expert, falling back (see module doc)."""
        start = time.perf_counter()
        route = body.x_gatelab
        text = _request_text(body)
        x = np.asarray(await self.in_pool(self.embed, text), dtype=np.float64)
        category = self.category(route, x)
        energy_budget, delay_budget = self.budgets(route)
        check_budgets(self.state, category, energy_budget, delay_budget)
        payload = body.model_dump(mode="json", exclude_unset=True, exclude={"x_gatelab"})
        subset = router.plan_subset(self.state, category, energy_budget, delay_budget)
        order, weights = self._order(x, subset)
        failed: dict[str, str] = {}
        statuses: list[int | None] = []
        while order:
            for name in order:
                expert = self.by_name.get(name)
                if expert is None:
                    failed[name] = f"{name} is not in the experts list"
                    statuses.append(None)
                    continue
                answer, cause, status = await self._open(expert, path, payload, body.stream)
                if answer is None:
                    failed[name] = cause
                    statuses.append(status)
                    continue
                extension = {
                    "kind": "free_text",
                    "expert": name,
                    "category": category,
                    "subset": [self.state.experts[i] for i in sorted(subset)],
                    "weights": weights,
                    "failed": failed,
                    "energy_budget": _finite(energy_budget),
                    "delay_budget": _finite(delay_budget),
                }
                if body.stream:
                    extension["measured_s"] = time.perf_counter() - start  # to the first byte

                    async def close(response: httpx.Response = answer) -> None:
                        release()  # first: nothing below may keep the place taken
                        await response.aclose()  # also when the relay never started

                    return sse_response(_relay(expert, answer, extension), on_close=close)
                return self._reply(expert, answer, extension, start)
            # everyone in the subset failed: the best subset without them, same budgets
            exclude = frozenset(self.state.experts.index(n) for n in failed)
            subset = router.plan_subset(self.state, category, energy_budget, delay_budget, exclude)
            subset = subset - exclude
            order, weights = self._order(x, subset) if subset else ([], {})
        causes = "; ".join(failed.values())
        if statuses and all(s is not None and 400 <= s < 500 and s != 429 for s in statuses):
            raise OpenAIError(400, f"every selected expert refused the request: {causes}")
        message = f"all selected experts failed: {causes}"
        raise OpenAIError(502, message, "server_error", code="experts_failed")

    def _reply(self, expert: EdgeExpert, reply: dict, extension: dict, start: float) -> dict:
        """The expert's reply with the routing extension (modelled costs if FLOPs are known)."""
        extension["measured_s"] = time.perf_counter() - start
        reported = reply.get("x_gatelab")
        flops = reported.get("flops") if isinstance(reported, dict) else None
        usage = reply.get("usage")
        tokens = usage.get("total_tokens") if isinstance(usage, dict) else None
        if flops is None and expert.flops_per_token is not None and isinstance(tokens, int):
            flops = expert.flops_per_token * tokens
        if isinstance(flops, int | float) and not isinstance(flops, bool) and flops >= 0:
            extension["modelled_energy_j"] = expert.device_profile.energy_j(flops)
            extension["modelled_delay_s"] = expert.device_profile.delay_s(flops)
        if reported is not None:
            extension["expert_x_gatelab"] = reported
        return reply | {"x_gatelab": extension}


async def _relay(
    expert: EdgeExpert, response: httpx.Response, extension: dict
) -> AsyncIterator[dict]:
    """The expert's SSE events as dicts (routing info added to the first), until ``[DONE]``."""
    first = True
    try:
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments, event names
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                return
            try:
                event = json.loads(data)
            except ValueError:
                message = f"expert {expert.name} sent a malformed event: {data[:80]!r}"
                raise OpenAIError(502, message, "server_error", code="experts_failed") from None
            if first and isinstance(event, dict):
                event["x_gatelab"], first = extension, False
            yield event
    except httpx.HTTPError as error:
        cause = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        message = f"expert {expert.name} at {expert.base_url}: stream broke: {cause}"
        raise OpenAIError(502, message, "server_error", code="experts_failed") from None
    finally:
        await response.aclose()


def _default_embed(text: str) -> np.ndarray:
    return embed_texts([text])[0]


def _choice_reply(kind: str, answer: str, extension: dict) -> dict:
    """A one-choice OpenAI reply carrying the letter ``answer``."""
    rid = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex[:24]
    if kind == "text_completion":
        choice = {"index": 0, "text": answer, "logprobs": None, "finish_reason": "stop"}
    else:
        message = {"role": "assistant", "content": answer}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    reply = {"id": rid, "object": kind, "created": int(time.time()), "model": ROUTER_MODEL}
    return reply | {"choices": [choice], "x_gatelab": extension}


def _choice_stream(kind: str, answer: str, extension: dict) -> AsyncIterator[dict]:
    """The multiple-choice reply as one streamed chunk (and its closing one)."""

    async def events() -> AsyncIterator[dict]:
        reply = _choice_reply(kind, answer, extension)
        if kind == "text_completion":
            yield reply
            return
        reply["object"] = "chat.completion.chunk"
        choice = reply["choices"][0]
        delta = {"role": "assistant", "content": answer}
        reply["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]
        yield reply
        end = {k: reply[k] for k in ("id", "object", "created", "model")}
        yield end | {
            "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]
        }

    return events()


def _multiple_choice(
    body: RouteCompletionRequest | RouteChatRequest,
) -> tuple[str, list[str]] | None:
    """``(question, options)`` when the request is multiple choice (see module doc)."""
    text = _request_text(body)
    route = body.x_gatelab
    if route is not None and route.options is not None:
        parsed = parse_multiple_choice(text)
        return (parsed[0] if parsed else text.strip()), list(route.options)
    return parse_multiple_choice(text)


def _refuse_for_choice(body: RouteCompletionRequest | RouteChatRequest) -> None:
    """Fields that have no meaning for a gate-combined letter (400 naming them)."""
    if body.n != 1:
        raise OpenAIError(400, "'n' must be 1 for a multiple-choice request", param="n")
    if isinstance(body, RouteCompletionRequest):
        if body.echo:
            raise OpenAIError(400, "'echo' is not supported for multiple choice", param="echo")
        if len(body.prompts()) != 1:
            raise OpenAIError(400, "one prompt per multiple-choice request", param="prompt")
    if body.logprobs:
        message = "'logprobs' is not supported for multiple choice (see x_gatelab.probs)"
        raise OpenAIError(400, message, param="logprobs")


def create_route_app(
    state: router.RouterState,
    experts: list[EdgeExpert],
    energy_budget: float = math.inf,
    delay_budget: float = math.inf,
    max_in_flight: int = MAX_IN_FLIGHT,
    max_queue: int = MAX_QUEUE,
    embed: Callable[[str], np.ndarray] | None = None,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The router's FastAPI app (see module doc).

    Args:
        state: the trained gate and per-category tables (:func:`gatelab.edge.router.load_router`).
        experts: the expert servers (:func:`gatelab.edge.experts.load_experts`); each one's
            ``timeout_s`` bounds each of its calls.
        energy_budget: default energy budget per query, J (modelled), when a request gives none.
        delay_budget: default delay budget per query, s (modelled).
        max_in_flight: requests answered at once.
        max_queue: requests waiting beyond those before new ones get 503 + ``Retry-After``.
        embed: text -> the gate's input embedding (default: MiniLM, loaded once).
        api_key: if set, clients must send ``Authorization: Bearer <api_key>``.
        max_body_bytes: the largest request body (413 above).

    Raises:
        ValueError: non-positive bounds, negative budgets, or an expert the router state
            does not know.
    """
    if max_in_flight < 1 or max_queue < 0:
        raise ValueError(
            f"need max_in_flight >= 1, max_queue >= 0, got {max_in_flight}, {max_queue}"
        )
    if not (energy_budget >= 0 and delay_budget >= 0):
        raise ValueError(f"budgets must be >= 0, got {energy_budget}, {delay_budget}")
    unknown = [e.name for e in experts if e.name not in state.experts]
    if unknown:
        raise ValueError(f"experts {unknown} are not in the router's pool {state.experts}")
    admission = _Admission(max_in_flight, max_queue)
    routes = _Router(
        state, experts, energy_budget, delay_budget, embed or _default_embed, admission
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await routes.aclose()

    app = FastAPI(
        title="gatelab MoE² router",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.router = routes
    install_error_handlers(app)
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=max_body_bytes)
    card = {"id": ROUTER_MODEL, "object": "model", "created": 0, "owned_by": "gatelab"}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "experts": [e.name for e in experts], "load": admission.active}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [card]}

    async def handle(body: RouteCompletionRequest | RouteChatRequest, path: str, kind: str) -> Any:
        body.check()
        if body.model != ROUTER_MODEL:
            raise OpenAIError(
                404,
                f"model {body.model!r} not found; this router serves {ROUTER_MODEL!r}",
                "not_found_error",
                param="model",
                code="model_not_found",
            )
        release = admission.admit()
        streaming = False
        try:
            async with admission.running:
                choice = _multiple_choice(body)
                if choice is not None:
                    return await routes.multiple_choice(body, *choice, kind)
                reply = await routes.free_text(body, path, release)
                streaming = body.stream
                return reply
        finally:
            if not streaming:  # a relayed stream gives its place back when it ends
                release()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = validate(RouteCompletionRequest, await read_json(request))
        return await handle(body, "/v1/completions", "text_completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = validate(RouteChatRequest, await read_json(request))
        return await handle(body, "/v1/chat/completions", "chat.completion")

    return app
