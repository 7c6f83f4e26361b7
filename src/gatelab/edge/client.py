r"""Talking to edge experts over the OpenAI-compatible API, and what each answer costs.

**Option distribution** (two methods, ``EdgeExpert.method``).

``"continuation"`` (default; what lm-eval-harness does for multiple choice): the context is
:func:`~gatelab.edge.data.format_cloze` (``Question: ...\nAnswer:``, options not listed) and each
option is scored as its continuation: :math:`\ell_i = \sum_t \log p(c_{i,t} \mid
\text{context}, c_{i,<t})` over the tokens of ``" " + option``. The four context+continuation
texts go in ONE ``/v1/completions`` request (a list of prompts) with ``echo: true, max_tokens: 0,
logprobs: 0`` (the legacy OpenAI scoring semantics; gatelab's own server implements them, and so
does vLLM's completions API, but llama.cpp's server does not: use ``"letters"`` there); the
continuation's tokens are those whose ``text_offset`` is at or after the end of the context. With
``normalize="chars"`` the score is divided by the option's length in characters (lm-eval's
``acc_norm``); ``"tokens"`` divides by its token count; ``"none"`` keeps the sum. Then
:math:`p_i = e^{\ell_i} / \sum_j e^{\ell_j}`. The raw sums and token counts are kept in
:attr:`ExpertAnswer.option_logprobs` / ``option_tokens``, so any normalisation can be recomputed.
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
``flops_per_token`` x tokens for servers that do not report them) are converted by a
:class:`~gatelab.edge.costs.DeviceProfile`. API keys are read only from the environment variable
named by ``api_key_env`` and never stored in reprs or logs.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from dataclasses import dataclass, field

import httpx

from gatelab.cost import Cost
from gatelab.edge.costs import DeviceProfile
from gatelab.edge.data import LETTERS, format_cloze, format_prompt


class ExpertError(ConnectionError):
    """An expert could not be reached or kept failing after all retries."""


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
        flops_per_token: FLOPs per token for servers that do not report ``x_gatelab.flops``.
        api_key_env: name of an environment variable holding a bearer token (never the key).
        transport: an ``httpx`` transport (tests inject faults with ``httpx.MockTransport``).
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

    def __post_init__(self) -> None:
        if self.api not in ("completions", "chat"):
            raise ValueError(
                f"EdgeExpert {self.name}: api must be 'completions' or 'chat', got {self.api!r}"
            )
        if self.method not in ("continuation", "letters"):
            raise ValueError(
                f"EdgeExpert {self.name}: method must be 'continuation' or 'letters', "
                f"got {self.method!r}"
            )
        if self.method == "continuation" and self.api == "chat":
            raise ValueError(
                f"EdgeExpert {self.name}: continuation scoring needs api='completions' (echo)"
            )
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"EdgeExpert {self.name}: normalize must be one of {NORMALIZATIONS}")
        if self.timeout_s <= 0 or self.max_retries < 0 or self.backoff_s < 0:
            raise ValueError(
                f"EdgeExpert {self.name}: need timeout_s > 0, max_retries, backoff_s >= 0"
            )

    def _request(self, prompt: str | list[str]) -> tuple[str, dict]:
        if self.method == "continuation":
            body = {"model": self.model or self.name, "prompt": prompt, "max_tokens": 0}
            return "/v1/completions", body | {"echo": True, "logprobs": 0, "temperature": 0}
        body: dict = {"model": self.model or self.name, "max_tokens": 1, "temperature": 0}
        if self.api == "chat":
            body |= {"messages": [{"role": "user", "content": prompt}], "logprobs": True}
            return "/v1/chat/completions", body | {"top_logprobs": self.top_logprobs}
        return "/v1/completions", body | {"prompt": prompt, "logprobs": self.top_logprobs}

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def _post(self, client: httpx.AsyncClient, path: str, body: dict) -> dict:
        url = self.base_url.rstrip("/") + path
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = await client.post(
                    url, json=body, headers=self._headers(), timeout=self.timeout_s
                )
            except httpx.TimeoutException as error:
                last = ExpertTimeout(
                    f"expert {self.name} at {self.base_url}: timed out after {self.timeout_s} s"
                )
                last.__cause__ = error
                continue
            except httpx.TransportError as error:
                last = ExpertError(
                    f"expert {self.name}: cannot reach {self.base_url} ({type(error).__name__})"
                )
                continue
            if response.status_code == 429 or response.status_code >= 500:
                last = ExpertError(
                    f"expert {self.name}: HTTP {response.status_code} from {self.base_url}"
                )
                continue
            if response.status_code >= 400:  # a client error will not improve by retrying
                raise ExpertError(
                    f"expert {self.name}: HTTP {response.status_code}: {response.text[:200]}"
                )
            try:
                return response.json()
            except ValueError:
                last = ExpertError(f"expert {self.name}: response is not JSON")
        raise last  # type: ignore[misc]

    def _parse_echo(self, payload: dict, context: str, n: int) -> tuple[list[float], list[int]]:
        """Summed logprobs and token counts of each prompt's tokens past ``len(context)``."""
        try:
            choices = sorted(payload["choices"], key=lambda c: c["index"])
            if len(choices) != n:
                raise ExpertError(f"expert {self.name}: expected {n} choices, got {len(choices)}")
            sums, counts = [], []
            for choice in choices:
                lp = choice["logprobs"]
                pairs = [
                    v
                    for offset, v in zip(lp["text_offset"], lp["token_logprobs"], strict=True)
                    if offset >= len(context)
                ]
                if not pairs or any(v is None for v in pairs):
                    raise ExpertError(f"expert {self.name}: no logprobs for the continuation")
                sums.append(float(sum(pairs)))
                counts.append(len(pairs))
            return sums, counts
        except (KeyError, IndexError, TypeError, ValueError):
            raise ExpertError(f"expert {self.name}: response has no echoed logprobs") from None

    def _parse(self, payload: dict) -> tuple[dict[str, float], dict]:
        try:
            choice = payload["choices"][0]
            if self.api == "chat":
                first = choice["logprobs"]["content"][0]
                top = {t["token"]: t["logprob"] for t in first["top_logprobs"]}
            else:
                top = choice["logprobs"]["top_logprobs"][0]
            return top, payload.get("usage") or {}
        except (KeyError, IndexError, TypeError):
            raise ExpertError(f"expert {self.name}: response has no top logprobs") from None

    async def answer(
        self,
        question: str,
        options: tuple[str, ...] | list[str],
        client: httpx.AsyncClient | None = None,
    ) -> ExpertAnswer:
        """Ask one multiple-choice question; returns the option distribution and its costs.

        Raises:
            ExpertTimeout: no answer within ``timeout_s`` after all retries.
            ExpertError: unreachable, HTTP errors after retries, or a malformed response.
        """
        if len(options) != len(LETTERS):
            raise ValueError(f"expected {len(LETTERS)} options, got {len(options)}")
        context = format_cloze(question)
        if self.method == "continuation":
            path, body = self._request([f"{context} {o.strip()}" for o in options])
        else:
            path, body = self._request(format_prompt(question, options))
        own = client is None
        client = client or httpx.AsyncClient(transport=self.transport)
        try:
            start = time.perf_counter()
            payload = await self._post(client, path, body)
            measured = time.perf_counter() - start
        finally:
            if own:
                await client.aclose()
        sums: list[float] = []
        counts: list[int] = []
        if self.method == "continuation":
            sums, counts = self._parse_echo(payload, context, len(options))
            probs = continuation_distribution(sums, counts, list(options), self.normalize)
            found, usage = len(options), payload.get("usage") or {}
        else:
            top, usage = self._parse(payload)
            probs, found = option_distribution(top, len(options))
        n_prompt = int(usage.get("prompt_tokens", 0))
        n_out = int(usage.get("completion_tokens", 0 if self.method == "continuation" else 1))
        flops = (payload.get("x_gatelab") or {}).get("flops")
        if flops is None:
            if self.flops_per_token is None:
                raise ValueError(
                    f"expert {self.name}: server reports no FLOPs; set flops_per_token"
                )
            flops = self.flops_per_token * (n_prompt + n_out)
        profile = self.device_profile
        return ExpertAnswer(
            self.name,
            tuple(probs),
            found,
            measured,
            n_prompt,
            n_out,
            float(flops),
            profile.delay_s(flops),
            profile.energy_j(flops),
            self.method,
            tuple(sums),
            tuple(counts),
        )


async def ask_experts(
    experts: list[EdgeExpert], question: str, options: tuple[str, ...] | list[str]
) -> dict[str, ExpertAnswer | Exception]:
    """Query all experts concurrently; failures are returned (not raised) per expert."""
    async with httpx.AsyncClient() as shared:

        async def one(expert: EdgeExpert) -> ExpertAnswer:
            if expert.transport is not None:  # an injected transport needs its own client
                return await expert.answer(question, options)
            return await expert.answer(question, options, shared)

        results = await asyncio.gather(*(one(e) for e in experts), return_exceptions=True)
    return {e.name: r for e, r in zip(experts, results, strict=True)}
