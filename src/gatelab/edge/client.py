r"""Talking to edge experts over the OpenAI-compatible API, and what each answer costs.

**Option distribution** (two methods, ``EdgeExpert.method``).

``"continuation"`` (default; what lm-eval-harness does for multiple choice): the context is
:func:`~gatelab.edge.data.format_cloze` (``Question: ...\nAnswer:``, options not listed) and each
option is scored as its continuation: :math:`\ell_i = \sum_t \log p(c_{i,t} \mid
\text{context}, c_{i,<t})` over the tokens of ``" " + option``. How the server is asked depends
on its backend (:mod:`gatelab.edge.backends`): gatelab's server and the OpenAI/vLLM dialect score
the four context+continuation texts in ONE ``/v1/completions`` request with ``echo: true,
max_tokens: 0, logprobs: 0``; llama.cpp's server ignores ``echo``, so there the option tokens are
generated under a grammar that admits only them and their raw-logit log-probabilities are read
(``/tokenize`` + ``/completion``). With ``normalize="chars"`` the score is divided by the
option's length in characters (lm-eval's ``acc_norm``); ``"tokens"`` divides by its token
count; ``"none"`` keeps the sum. Then :math:`p_i = e^{\ell_i} / \sum_j e^{\ell_j}`. The raw
sums and token counts are kept in :attr:`ExpertAnswer.option_logprobs` / ``option_tokens``, so
any normalisation can be recomputed.
The validation-split comparison behind the default is in ``docs/edge.md``.

``"letters"``: the client sends the question as a zero-shot prompt ending in
``Answer:`` and asks for one token with the top-``n`` alternatives (``logprobs=n`` on
``/v1/completions``, ``top_logprobs=n`` on ``/v1/chat/completions``). Each returned token is
stripped of spaces and ``().:`` and upper-cased; the log-probabilities of tokens that read as the
same option letter are combined by log-sum-exp. A letter absent from the top-``n`` gets the
smallest returned log-probability (an upper bound on its true value, since it ranked lower). The
four values are then renormalised with a softmax: :math:`p_i = e^{\ell_i} / \sum_j e^{\ell_j}`.
If no option letter appears at all the distribution is uniform and ``letters_found`` is 0.
Small models barely condition their letter choice on the question (SmolLM2-135M answers "A" to
nearly everything), which is why this is no longer the default.

**Costs.** ``measured_s`` is the wall-clock round trip measured here. ``modelled_delay_s`` and
``modelled_energy_j`` are *modelled*: the FLOPs the server reports (``x_gatelab.flops``; or
``flops_per_token`` x tokens for servers that do not report them, by default 2 N per token for
the parameter count N llama.cpp reports) are converted by a
:class:`~gatelab.edge.costs.DeviceProfile`.

**Failures** raise :class:`ExpertError` (or :class:`ExpertTimeout`) whose message names the
expert, the endpoint and the cause (``HTTP 503: <server message>``, ``timed out after 30 s``,
``connection refused``, ``bad response: ...``) and whose ``kind`` / ``status`` say it in data.

**Secrets.** A key is read only from the environment variable that ``api_key_env`` names, which
must start with ``GATELAB_`` or be allowed explicitly (``allow_env``); it is sent only over https
or to a loopback host, and never stored in reprs or logs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from gatelab.cost import Cost
from gatelab.edge.backends import (
    ALL_TOKENS,
    BACKENDS,
    BadResponse,
    detect_backend,
    echo_request,
    forced_request,
    letters_request,
    parse_echo,
    parse_forced,
    parse_tokens,
    reported_parameters,
    split_continuation,
    tokenize_request,
    top_logprobs,
)
from gatelab.edge.costs import DeviceProfile
from gatelab.edge.data import LETTERS, format_cloze, format_prompt


class ExpertError(ConnectionError):
    """An expert could not be reached, kept failing after all retries, or answered unusably.

    Attributes:
        kind: the cause: ``"http"`` (an HTTP error status), ``"timeout"``, ``"connect"``
            (refused, unresolvable, dropped) or ``"parse"`` (a reply without what the method
            needs).
        status: the HTTP status when ``kind == "http"``, else None.
    """

    def __init__(self, message: str, kind: str = "error", status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


class ExpertTimeout(ExpertError, TimeoutError):
    """An expert did not answer within its timeout after all retries."""


@dataclass(frozen=True)
class ExpertAnswer:
    """One expert's answer to one question (costs labelled measured / modelled)."""

    expert: str
    probs: tuple[float, ...]  # distribution over the options A-D
    letters_found: int  # letters method: option letters in the top logprobs; else options scored
    measured_s: float  # wall-clock round trip measured on this machine
    prompt_tokens: int
    completion_tokens: int
    flops: float
    modelled_delay_s: float  # modelled by the expert's DeviceProfile
    modelled_energy_j: float  # modelled by the expert's DeviceProfile
    method: str = "letters"
    option_logprobs: tuple[float, ...] = ()  # continuation: summed logprob of each option
    option_tokens: tuple[int, ...] = ()  # continuation: tokens scored per option
    backend: str = ""  # the server dialect that answered (gatelab.edge.backends)

    @property
    def cost(self) -> Cost:
        """Modelled cost as a :class:`gatelab.cost.Cost` (seconds and joules are modelled)."""
        return Cost(flops=self.flops, seconds=self.modelled_delay_s, joules=self.modelled_energy_j)


def option_distribution(top: dict[str, float], n_options: int = 4) -> tuple[list[float], int]:
    """Probabilities of the option letters from one position's top logprobs (see module doc)."""
    if not top:
        return [1.0 / n_options] * n_options, 0
    letters = tuple(LETTERS[:n_options])  # a tuple: "" or "AB" must not match
    found: dict[str, list[float]] = {}
    for token, logprob in top.items():
        key = token.strip().strip("().:").upper()
        if key in letters:
            found.setdefault(key, []).append(logprob)
    floor = min(top.values())
    scores = []
    for letter in letters:
        values = found.get(letter)
        if values:
            m = max(values)
            scores.append(m + math.log(sum(math.exp(v - m) for v in values)))
        else:
            scores.append(floor)
    m = max(scores)
    weights = [math.exp(s - m) for s in scores]
    total = sum(weights)
    return [w / total for w in weights], len(found)


NORMALIZATIONS = ("none", "chars", "tokens")
DEFAULT_NORMALIZE = "tokens"  # chosen on the validation split (docs/edge.md, quick set)


def continuation_distribution(
    sums: list[float], n_tokens: list[int], options: list[str], normalize: str = "none"
) -> list[float]:
    """Softmax over the options' (optionally length-normalised) continuation log-likelihoods."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    lengths = {
        "none": [1] * len(sums),
        "chars": [max(1, len(" " + o.strip())) for o in options],
        "tokens": [max(1, n) for n in n_tokens],
    }[normalize]
    scores = [s / n for s, n in zip(sums, lengths, strict=True)]
    m = max(scores)
    weights = [math.exp(s - m) for s in scores]
    total = sum(weights)
    return [w / total for w in weights]


KEY_ENV_PREFIX = "GATELAB_"  # api_key_env may name these, or variables the user allows


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ``::1`` (where a plain-http key stays local)."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def connect_cause(error: httpx.TransportError) -> str:
    """Why a connection failed, in words: the innermost OS error, not httpx's summary."""
    inner: BaseException | None = error
    while inner is not None:
        if isinstance(inner, ConnectionRefusedError):
            return "connection refused"
        if isinstance(inner, socket.gaierror):
            return f"cannot resolve the host ({inner})"
        inner = inner.__cause__ or inner.__context__
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def server_message(response: httpx.Response) -> str:
    """The error message of a reply: OpenAI's ``error.message``, FastAPI's ``detail``, or text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message = response.text
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            message = str(error["message"])
        elif isinstance(error, str):
            message = error
        elif "detail" in body:
            message = str(body["detail"])
    message = " ".join(message.split())
    return (message[:300] + "...") if len(message) > 300 else message or response.reason_phrase


@dataclass
class EdgeExpert:
    """An LLM expert behind an OpenAI-compatible endpoint on some edge device.

    Args:
        name: expert name (also the ``model`` field sent, unless ``model`` is given).
        base_url: server root, e.g. ``http://127.0.0.1:8001`` (``/v1/...`` is appended).
        device_profile: the device it runs on, for modelled delay and energy.
        model: model id on the server; defaults to ``name``.
        api: ``"completions"`` or ``"chat"`` (``"chat"`` only with ``method="letters"``).
        method: ``"continuation"`` (score each option's text, default) or ``"letters"``.
        normalize: length normalisation of continuation scores: ``"none"``, ``"chars"``,
            ``"tokens"`` (see module doc).
        timeout_s: per-request timeout.
        max_retries: retries after the first attempt on transport errors, timeouts, 429 and 5xx.
        backoff_s: first retry delay; doubles each retry.
        top_logprobs: alternatives requested per token.
        flops_per_token: FLOPs per token for servers that do not report ``x_gatelab.flops``
            (default for llama.cpp: twice the parameter count it reports).
        api_key_env: name of an environment variable holding a bearer token (never the key):
            ``GATELAB_*`` or one listed in ``allow_env``; the key is sent only over https or to
            a loopback host.
        transport: an ``httpx`` transport (tests inject faults with ``httpx.MockTransport``).
        backend: the server's dialect, ``"gatelab"``, ``"llamacpp"``, ``"openai"`` or
            ``"auto"`` (detected once, on the first answer; :mod:`gatelab.edge.backends`).
        allow_env: environment variables ``api_key_env`` may name besides ``GATELAB_*``.

    Raises:
        ValueError: a bad value, naming the expert and the field.
    """

    name: str
    base_url: str
    device_profile: DeviceProfile
    model: str | None = None
    api: str = "completions"
    method: str = "continuation"
    normalize: str = DEFAULT_NORMALIZE
    timeout_s: float = 30.0
    max_retries: int = 2
    backoff_s: float = 0.2
    top_logprobs: int = 20
    flops_per_token: float | None = None
    api_key_env: str | None = None
    transport: httpx.AsyncBaseTransport | None = field(default=None, repr=False)
    backend: str = "auto"
    allow_env: tuple[str, ...] = ()
    _detected: str | None = field(default=None, init=False, repr=False, compare=False)
    _models: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        who = f"EdgeExpert {self.name}"
        if self.api not in ("completions", "chat"):
            raise ValueError(f"{who}: api must be 'completions' or 'chat', got {self.api!r}")
        if self.method not in ("continuation", "letters"):
            raise ValueError(
                f"{who}: method must be 'continuation' or 'letters', got {self.method!r}"
            )
        if self.method == "continuation" and self.api == "chat":
            raise ValueError(f"{who}: continuation scoring needs api='completions'")
        if self.backend not in BACKENDS:
            raise ValueError(f"{who}: backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"{who}: normalize must be one of {NORMALIZATIONS}")
        if not self.timeout_s > 0 or self.max_retries < 0 or not self.backoff_s >= 0:
            raise ValueError(f"{who}: need timeout_s > 0, max_retries, backoff_s >= 0")
        if not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"{who}: top_logprobs must be in [0, 20], got {self.top_logprobs}")
        if self.flops_per_token is not None and not self.flops_per_token > 0:
            raise ValueError(f"{who}: flops_per_token must be > 0, got {self.flops_per_token}")
        try:
            url = httpx.URL(self.base_url)
        except (httpx.InvalidURL, TypeError):
            raise ValueError(f"{who}: base_url {self.base_url!r} is not a URL") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(
                f"{who}: base_url must be http(s)://host[:port], got {self.base_url!r}"
            )
        if isinstance(self.allow_env, str):
            self.allow_env = (self.allow_env,)  # one name, not its characters
        self.allow_env = tuple(self.allow_env)
        if self.api_key_env is not None:
            key = self.api_key_env
            if not isinstance(key, str) or not key:
                raise ValueError(f"{who}: api_key_env must name a variable, got {key!r}")
            if not key.startswith(KEY_ENV_PREFIX) and key not in self.allow_env:
                raise ValueError(
                    f"{who}: api_key_env {key!r} may not be read: name a {KEY_ENV_PREFIX}* "
                    f"variable or allow this one (--allow-env {key}, allow_env=)"
                )
            if url.scheme != "https" and not is_loopback(url.host):
                raise ValueError(
                    f"{who}: refusing to send the key of {key} over plain http to {url.host}: "
                    "use https or a loopback host"
                )

    @property
    def resolved_backend(self) -> str | None:
        """The backend in use: ``backend`` unless auto, then what was detected (None: not yet)."""
        return self.backend if self.backend != "auto" else self._detected

    def headers(self) -> dict[str, str]:
        """The request headers: the bearer key from ``api_key_env``, when that variable is set."""
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def _send(
        self, client: httpx.AsyncClient, method: str, path: str, body: dict | None = None
    ) -> Any:
        """One request with retries; returns the JSON reply.

        Raises:
            ExpertError: naming the expert, the endpoint and the cause (see its ``kind``).
        """
        where = f"expert {self.name} at {self.base_url}: {method} {path}"
        url = self.base_url.rstrip("/") + path
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = await client.request(
                    method, url, json=body, headers=self.headers(), timeout=self.timeout_s
                )
            except httpx.TimeoutException:
                kind, status, cause = "timeout", None, f"timed out after {self.timeout_s:g} s"
                continue
            except httpx.TransportError as error:
                kind, status, cause = "connect", None, connect_cause(error)
                continue
            status = response.status_code
            if status >= 400:
                kind, cause = "http", f"HTTP {status}: {server_message(response)}"
                if status == 429 or status >= 500:
                    continue
                raise ExpertError(f"{where}: {cause}", kind, status)  # retrying will not help
            try:
                return response.json()
            except ValueError:
                kind, cause = "parse", f"bad response: not JSON ({response.text[:80]!r})"
        tries = f" ({attempts} attempts)" if attempts > 1 else ""
        error_type = ExpertTimeout if kind == "timeout" else ExpertError
        raise error_type(f"{where}: {cause}{tries}", kind, status if kind == "http" else None)

    async def _probe(self, client: httpx.AsyncClient, path: str) -> Any:
        """``GET path``'s JSON, or None where the server does not serve it (HTTP 4xx)."""
        try:
            return await self._send(client, "GET", path)
        except ExpertError as error:
            if error.kind == "http" and error.status is not None and error.status < 500:
                return None
            if error.kind == "parse":
                return None
            raise

    async def _resolve(self, client: httpx.AsyncClient) -> str:
        """The backend, detected once from ``/props`` and ``/v1/models`` when ``auto``."""
        if self.backend != "auto":
            return self.backend
        if self._detected is None:
            props = await self._probe(client, "/props")
            if detect_backend(props, None) != "llamacpp":
                self._models = await self._probe(client, "/v1/models")
            self._detected = detect_backend(props, self._models)
        return self._detected

    async def _flops_per_token(self, client: httpx.AsyncClient) -> float:
        """``flops_per_token``, else 2 N for the parameter count N the server reports."""
        if self.flops_per_token is not None:
            return float(self.flops_per_token)
        if self._models is None:
            self._models = await self._probe(client, "/v1/models")
        n_params = reported_parameters(self._models, self.model or self.name)
        if n_params is None:
            raise ValueError(
                f"expert {self.name}: the server reports neither FLOPs (x_gatelab.flops) nor a "
                "parameter count (/v1/models meta.n_params); set flops_per_token"
            )
        return 2.0 * n_params  # forward FLOPs per token ~ 2 N (Kaplan et al. 2020, 2001.08361)

    def _read(self, parse: Callable[..., Any], *args: Any) -> Any:
        """``parse(*args)`` with a malformed reply reported as this expert's parse error."""
        try:
            return parse(*args)
        except BadResponse as error:
            raise ExpertError(
                f"expert {self.name} at {self.base_url}: bad response: {error}", "parse"
            ) from None

    async def _score_forced(
        self, client: httpx.AsyncClient, context: str, options: list[str]
    ) -> tuple[list[float], list[int], int]:
        """llama.cpp continuation scores by forced decoding (see :mod:`gatelab.edge.backends`).

        Returns:
            per-option summed logprobs and token counts, and the tokens an echo request would
            have scored (context + option, summed over options) for the modelled cost.
        """
        context_ids = self._read(
            parse_tokens, await self._send(client, "POST", "/tokenize", tokenize_request(context))
        )
        splits = []
        for option in options:
            reply = await self._send(
                client, "POST", "/tokenize", tokenize_request(f"{context} {option.strip()}")
            )
            full_ids = self._read(parse_tokens, reply)
            splits.append(self._read(split_continuation, context_ids, full_ids))

        async def score(prefix: list[int], continuation: list[int]) -> float:
            total = 0.0  # one forced token per request, each prefix extending the last
            for t, token in enumerate(continuation):
                body = forced_request(prefix + continuation[:t], token)
                reply = await self._send(client, "POST", "/completion", body)
                value = self._read(parse_forced, reply, token)
                if value is None:  # withheld: generate a complete token, read this one among all
                    body = forced_request(prefix + continuation[:t], context_ids[-1], ALL_TOKENS)
                    reply = await self._send(client, "POST", "/completion", body)
                    value = self._read(parse_forced, reply, token)
                if value is None:
                    raise ExpertError(
                        f"expert {self.name} at {self.base_url}: bad response: /completion "
                        f"withholds the probabilities of token {token}",
                        "parse",
                    )
                total += value
            return total

        results = await asyncio.gather(
            *(score(prefix, cont) for prefix, cont in splits), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        sums = [float(r) for r in results]
        counts = [len(cont) for _, cont in splits]
        return sums, counts, sum(len(prefix) + len(cont) for prefix, cont in splits)

    async def answer(
        self,
        question: str,
        options: tuple[str, ...] | list[str],
        client: httpx.AsyncClient | None = None,
    ) -> ExpertAnswer:
        """Ask one multiple-choice question; returns the option distribution and its costs.

        Raises:
            ExpertTimeout: no answer within ``timeout_s`` after all retries.
            ExpertError: unreachable, HTTP errors after retries, or a malformed response
                (``kind`` and the message say which).
            ValueError: not four options, or no way to model the FLOPs (set flops_per_token).
        """
        if len(options) != len(LETTERS):
            raise ValueError(f"expected {len(LETTERS)} options, got {len(options)}")
        options = list(options)
        context, model = format_cloze(question), self.model or self.name
        sums: list[float] = []
        counts: list[int] = []
        own = client is None
        client = client or httpx.AsyncClient(transport=self.transport)
        try:
            backend = await self._resolve(client)
            start = time.perf_counter()
            if self.method == "letters":
                prompt = format_prompt(question, options)
                path, body = letters_request(self.api, model, prompt, self.top_logprobs)
                payload = await self._send(client, "POST", path, body)
                probs, found = option_distribution(self._read(top_logprobs, payload), len(options))
                usage = self._read(_usage, payload, 1)
            elif backend == "llamacpp":
                sums, counts, n_scored = await self._score_forced(client, context, options)
                payload, usage = {}, (n_scored, 0)
            else:
                prompts = [f"{context} {o.strip()}" for o in options]
                body = echo_request(model, prompts)
                payload = await self._send(client, "POST", "/v1/completions", body)
                sums, counts = self._read(parse_echo, payload, context, prompts)
                usage = self._read(_usage, payload, 0)
            measured = time.perf_counter() - start
            if self.method == "continuation":
                probs = continuation_distribution(sums, counts, options, self.normalize)
                found = len(options)
            flops = self._read(_reported_flops, payload)
            if flops is None:
                flops = await self._flops_per_token(client) * sum(usage)
        finally:
            if own:
                await client.aclose()
        profile = self.device_profile
        return ExpertAnswer(
            self.name,
            tuple(probs),
            found,
            measured,
            usage[0],
            usage[1],
            float(flops),
            profile.delay_s(flops),
            profile.energy_j(flops),
            self.method,
            tuple(sums),
            tuple(counts),
            backend,
        )


def _usage(payload: Any, default_completion: int) -> tuple[int, int]:
    """``(prompt_tokens, completion_tokens)`` of a reply's ``usage`` (0 / default if absent)."""
    usage = payload.get("usage") if isinstance(payload, dict) else None
    usage = usage if isinstance(usage, dict) else {}
    try:
        return int(usage.get("prompt_tokens", 0)), int(
            usage.get("completion_tokens", default_completion)
        )
    except (TypeError, ValueError):
        raise BadResponse(f"usage is not token counts: {usage!r}") from None


def _reported_flops(payload: Any) -> float | None:
    """The ``x_gatelab.flops`` extension of gatelab's server, None when the server reports none."""
    extension = payload.get("x_gatelab") if isinstance(payload, dict) else None
    flops = extension.get("flops") if isinstance(extension, dict) else None
    if flops is None:
        return None
    if isinstance(flops, bool) or not isinstance(flops, int | float) or not flops >= 0:
        raise BadResponse(f"x_gatelab.flops is not a FLOP count: {flops!r}")
    return float(flops)


async def ask_experts(
    experts: list[EdgeExpert],
    question: str,
    options: tuple[str, ...] | list[str],
    client: httpx.AsyncClient | None = None,
) -> dict[str, ExpertAnswer | Exception]:
    """Query all experts concurrently; failures are returned (not raised) per expert.

    ``client``: a client to share (a server's, kept open); by default one made for this call.
    """

    async def one(expert: EdgeExpert, shared: httpx.AsyncClient) -> ExpertAnswer:
        if expert.transport is not None:  # an injected transport needs its own client
            return await expert.answer(question, options)
        return await expert.answer(question, options, shared)

    async def ask_all(shared: httpx.AsyncClient) -> list:
        return await asyncio.gather(*(one(e, shared) for e in experts), return_exceptions=True)

    if client is not None:
        results = await ask_all(client)
    else:
        async with httpx.AsyncClient() as own:  # ~40 ms of CPU to make: share one where you can
            results = await ask_all(own)
    return {e.name: r for e, r in zip(experts, results, strict=True)}
