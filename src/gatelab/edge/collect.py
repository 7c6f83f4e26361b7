"""Query every expert once per question and cache the answers (resumable JSONL).

Experts are asked over HTTP (:class:`~gatelab.edge.client.EdgeExpert`) or, for the local demo
pool, in this process (:class:`InProcessExpert`: the serving engine without the HTTP layer, the
same records).

Each line of the cache is one attempt for one ``(qid, expert)`` pair: either ``ok`` with the
option distribution, token counts, FLOPs, measured and modelled costs and the backend that
answered, or ``ok: false`` with the error after all retries and its cause
(:func:`failure_record`: HTTP status and server message, timeout, connection refused, parse
error). On resume, pairs with an ``ok`` line are skipped and failed pairs are
tried again; the last line for a pair wins. Missing answers stay visible as missing
(:class:`AnswerTable.available`), never silently dropped.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from gatelab import runs
from gatelab.edge.client import (
    DEFAULT_NORMALIZE,
    EdgeExpert,
    ExpertAnswer,
    ExpertError,
    ask_experts,
    continuation_distribution,
)
from gatelab.edge.costs import PROFILES, DeviceProfile
from gatelab.edge.data import LETTERS, MCQuestion, format_cloze
from gatelab.edge.experts import DEFAULT_POOL


def read_cache(cache: Path) -> dict[tuple[str, str], dict]:
    """The last cache record of every ``(qid, expert)`` pair (empty if no cache yet).

    A torn last line (a writer killed mid-line) is skipped with a warning naming the file and
    line, so its pair counts as missing (:func:`gatelab.runs.read_jsonl`).

    Raises:
        ValueError: another line is not JSON, or a record lacks ``qid`` / ``expert``.
    """
    records: dict[tuple[str, str], dict] = {}
    what = "cache record (qid, expert, ...)"
    for number, record in enumerate(runs.read_jsonl(cache, what), start=1):
        if not isinstance(record, dict) or not {"qid", "expert"} <= record.keys():
            raise ValueError(f"{cache}: record {number} is not a {what}")
        records[(record["qid"], record["expert"])] = record
    return records


SHIPPED_QUICK_CACHE = Path(__file__).parent / "assets" / "answers_quick.jsonl"
# every (question, demo expert) pair of the full set: `gatelab edge collect --in-process --cache
# src/gatelab/edge/assets/answers_full.jsonl` (docs/edge.md, "Data", states its time)
SHIPPED_FULL_CACHE = Path(__file__).parent / "assets" / "answers_full.jsonl"


def seed_from_shipped(
    cache: Path, questions: list[MCQuestion], shipped: Path = SHIPPED_QUICK_CACHE
) -> int:
    """Append the shipped answers of demo-pool experts that ``cache`` lacks; returns how many.

    The package ships the quick set's answers (``gatelab edge collect --quick``, regenerate with
    that command), so the quick demo needs no model serving. Local answers always win: only
    ``(qid, expert)`` pairs without an ``ok`` record are seeded.
    """
    if not shipped.is_file():
        return 0
    runs.drop_torn_tail(cache)  # before reading, so a cut pair is seeded again
    done = {key for key, record in read_cache(cache).items() if record["ok"]}
    wanted = {q.qid for q in questions}
    pool = {name for name, _ in DEFAULT_POOL}
    new = [
        r
        for key, r in read_cache(shipped).items()
        if r["ok"] and key not in done and key[0] in wanted and key[1] in pool
    ]
    if new:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with cache.open("a") as out:
            out.writelines(json.dumps(r) + "\n" for r in new)
    return len(new)


def failure_record(error: BaseException) -> dict:
    """The cache fields of a failed attempt: the message and its cause in data.

    ``error`` is ``"<ExceptionType>: <message>"`` (the message names the expert, the endpoint and
    the cause); ``cause`` is :attr:`~gatelab.edge.client.ExpertError.kind` (``http``,
    ``timeout``, ``connect``, ``parse``) or the exception type for other errors (e.g. a
    ``ValueError`` asking for ``flops_per_token``); ``http_status`` is the status or None.
    """
    return {
        "ok": False,
        "error": f"{type(error).__name__}: {error}",
        "cause": error.kind if isinstance(error, ExpertError) else type(error).__name__,
        "http_status": error.status if isinstance(error, ExpertError) else None,
    }


def _append(out: TextIO, record: dict) -> None:
    """Write one cache line and flush it: a kill loses at most the line being written."""
    out.write(json.dumps(record) + "\n")
    out.flush()


class InProcessExpert:
    r"""A served variant scored in this process: the HTTP path's continuation answer, no HTTP.

    :meth:`answer` scores the four prompts that :meth:`EdgeExpert.answer
    <gatelab.edge.client.EdgeExpert.answer>` sends in its ``echo`` request (``c_i =
    format_cloze(question) + " " + option_i``, each after the variant's scoring head) and sums
    :math:`\log p(t_j \mid t_{<j})` over the tokens whose character offset lies in the option
    part, the same tokens :func:`~gatelab.edge.backends.parse_echo` reads from the server's reply.
    It computes only what those sums need: the head's KV states once per expert, the prefix the
    four prompts share once per question (logits at its last position only), then the four
    option suffixes as one batch of 4 over copies of that cache (logits at their own positions).
    Usage and FLOPs are those the server reports for the request (every prompt prefilled with
    logits everywhere, :func:`~gatelab.edge.costs.llama_forward_flops`), so the cache record
    holds the HTTP path's fields and values; only ``measured_s`` (wall-clock here) differs.
    """

    def __init__(
        self,
        served,  # a gatelab.edge.served.ServedModel
        device_profile: DeviceProfile,
        normalize: str = DEFAULT_NORMALIZE,
    ) -> None:
        self.name, self.served = served.name, served
        self.device_profile, self.normalize = device_profile, normalize
        self._head_states = None  # KV states of the scoring head, computed on first use

    def _head(self) -> tuple[list[int], list]:
        from gatelab.edge.generate import cache_states, new_cache, prefill_chunk

        head = self.served.head_ids()
        if self._head_states is None:
            cache = new_cache(self.served.n_layers)
            if head:
                prefill_chunk(self.served.model, cache, head, 0, len(head))
            self._head_states = cache_states(cache) if head else []
        return head, self._head_states

    @torch.no_grad()
    def scores(self, context: str, prompts: list[str]) -> tuple[list[float], list[int], int, int]:
        """Per prompt the summed log-probability and count of its tokens after ``context``.

        Returns:
            ``(sums, counts, prompt_tokens, flops)``, the last two as the server reports them.
        """
        from transformers.cache_utils import Cache

        from gatelab.edge.costs import llama_forward_flops
        from gatelab.edge.generate import GrowingLayer, cache_from_states, new_cache, prefill_chunk

        served, model = self.served, self.served.model
        head, head_states = self._head()
        ids, wanted = [], []  # per prompt: model input; indices of the tokens summed
        for prompt in prompts:
            enc = served.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
            ids.append(head + list(enc.input_ids))
            wanted.append(
                [len(head) + j for j, (s, _) in enumerate(enc.offset_mapping)
                 if len(context) <= s < len(prompt)]
            )  # fmt: skip
        if any(not w or w[0] == 0 for w in wanted):
            raise ExpertError(f"expert {self.name} (in process): nothing to score", "parse")
        shared = min(len(x) for x in ids)
        shared = next((i for i in range(shared) if len({x[i] for x in ids}) > 1), shared)
        start = min(shared, min(w[0] for w in wanted))  # tokens [0, start) run once
        cache = cache_from_states(head_states) if head_states else new_cache(served.n_layers)
        # log-probs predicting token `start` (the prefix reaches past the head: context is text)
        last = prefill_chunk(model, cache, ids[0], len(head), start).double()  # (V,)
        longest = max(len(x) for x in ids) - start - 1  # suffix tokens fed per row
        rows = None
        if longest > 0:
            batch = torch.zeros(len(ids), longest, dtype=torch.long)  # right-padded (B, S)
            for b, x in enumerate(ids):
                feed = x[start:-1]
                batch[b, : len(feed)] = torch.tensor(feed, dtype=torch.long)
            layers = [
                GrowingLayer(
                    layer.keys.expand(len(ids), -1, -1, -1).contiguous(),
                    layer.values.expand(len(ids), -1, -1, -1).contiguous(),
                    longest,
                )
                for layer in cache.layers
            ]
            out = model(batch, cache=Cache(layers=layers), use_cache=True, logits_to_keep=0)
            wide = torch.float64 if out.logits.dtype == torch.float64 else torch.float32
            rows = torch.log_softmax(out.logits.to(wide), dim=-1).double()  # (B, S, V)
        sums, counts = [], []
        for b, (x, w) in enumerate(zip(ids, wanted, strict=True)):
            values = [
                float(last[x[i]]) if i == start else float(rows[b, i - start - 1, x[i]]) for i in w
            ]
            sums.append(float(sum(values)))
            counts.append(len(values))
        config = model.config
        flops = sum(llama_forward_flops(config, served.n_layers, len(x), len(x)) for x in ids)
        return sums, counts, sum(len(x) for x in ids), flops

    async def answer(self, question: str, options: tuple[str, ...] | list[str]) -> ExpertAnswer:
        """The :class:`ExpertAnswer` of the HTTP path's ``continuation`` method."""
        if len(options) != len(LETTERS):
            raise ValueError(f"expected {len(LETTERS)} options, got {len(options)}")
        options = list(options)
        context = format_cloze(question)
        prompts = [f"{context} {o.strip()}" for o in options]  # as EdgeExpert.answer sends them
        start = time.perf_counter()
        sums, counts, prompt_tokens, flops = self.scores(context, prompts)
        measured = time.perf_counter() - start
        probs = continuation_distribution(sums, counts, options, self.normalize)
        profile = self.device_profile
        return ExpertAnswer(
            self.name, tuple(probs), len(options), measured, prompt_tokens, 0, float(flops),
            profile.delay_s(flops), profile.energy_j(flops),
            "continuation", tuple(sums), tuple(counts), "gatelab",
        )  # fmt: skip


def start_in_process_pool(
    pool: tuple[tuple[str, str], ...] = DEFAULT_POOL,
    smollm2_dir: str | None = None,
    device: str = "cpu",
    normalize: str = DEFAULT_NORMALIZE,
    models: dict | None = None,
) -> list[InProcessExpert]:
    """``pool`` as :class:`InProcessExpert` s (weights loaded once per base, or ``models``)."""
    from gatelab.edge.served import load_served_models

    if models is None:
        names = [n for n, _ in pool]
        models = load_served_models(names, device, smollm2_dir, int4_decode=False)
    return [InProcessExpert(models[n], PROFILES[p], normalize) for n, p in pool]


async def _ask_in_turn(
    experts: list, question: str, options: tuple[str, ...]
) -> dict[str, ExpertAnswer | Exception]:
    """In-process experts one after another (one thread computes them all)."""
    results: dict[str, ExpertAnswer | Exception] = {}
    for expert in experts:
        try:
            results[expert.name] = await expert.answer(question, options)
        except Exception as error:  # noqa: BLE001 - cached as this pair's failure
            results[expert.name] = error
    return results


def collect(
    experts: list[EdgeExpert] | list[InProcessExpert],
    questions: list[MCQuestion],
    cache: str | Path,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Ask every expert every question (HTTP ones concurrently), appending to the JSONL ``cache``.

    Returns:
        Counts: ``asked`` (new attempts), ``ok``, ``missing`` (pairs still without an answer),
        and ``errors``: the last error of each expert that failed in this call (its cause).
    """
    cache = Path(cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    runs.drop_torn_tail(cache)  # before reading, so a cut pair is asked again
    done = {key for key, r in read_cache(cache).items() if r["ok"]}
    asked = failed = 0
    errors: dict[str, str] = {}
    with cache.open("a") as out:
        for i, q in enumerate(questions):
            todo = [e for e in experts if (q.qid, e.name) not in done]
            if todo:
                ask = _ask_in_turn if isinstance(todo[0], InProcessExpert) else ask_experts
                results = asyncio.run(ask(todo, q.question, q.options))
                for name, result in results.items():
                    record = {"qid": q.qid, "expert": name}
                    if isinstance(result, ExpertAnswer):
                        record |= {"ok": True, **asdict(result)}
                    else:
                        record |= failure_record(result)
                        errors[name] = record["error"]
                        failed += 1
                    _append(out, record)
                    asked += 1
            if progress:
                progress(i + 1, len(questions))
    return {"asked": asked, "ok": asked - failed, "missing": failed, "errors": errors}


@dataclass
class AnswerTable:
    """Cached answers as arrays over questions ``N`` and experts ``E``.

    Attributes:
        qids: question ids ``(N,)``; experts: expert names ``(E,)``.
        probs: option distributions ``(N, E, 4)`` (uniform where missing).
        available: ``(N, E)`` bool, False where the expert never answered.
        answer: gold option ``(N,)``.
        delay_s, energy_j: *modelled* per-answer delay and energy ``(N, E)`` (NaN where missing).
        measured_s: measured wall-clock ``(N, E)``; flops, prompt_tokens ``(N, E)``.
    """

    qids: list[str]
    experts: list[str]
    probs: np.ndarray
    available: np.ndarray
    answer: np.ndarray
    delay_s: np.ndarray
    energy_j: np.ndarray
    measured_s: np.ndarray
    flops: np.ndarray
    prompt_tokens: np.ndarray
    option_logprobs: np.ndarray | None = None  # (N, E, 4) continuation sums (NaN: letters/missing)
    option_tokens: np.ndarray | None = None  # (N, E, 4) continuation token counts


def load_answers(
    cache: str | Path,
    questions: list[MCQuestion],
    experts: list[str],
    normalize: str | None = None,
    records: dict[tuple[str, str], dict] | None = None,
) -> AnswerTable:
    """Arrange the cache for ``questions`` x ``experts`` (missing pairs marked unavailable).

    ``normalize`` (``"none"``, ``"chars"``, ``"tokens"``) recomputes the distribution of
    continuation-scored answers from their stored per-option sums; None keeps the stored one.
    ``records`` is :func:`read_cache` of ``cache`` when the caller has already read it.
    """
    if records is None:
        records = read_cache(Path(cache))
    n, e = len(questions), len(experts)
    probs = np.full((n, e, 4), 0.25)
    available = np.zeros((n, e), dtype=bool)
    fields = {
        k: np.full((n, e), np.nan)
        for k in ("delay_s", "energy_j", "measured_s", "flops", "prompt_tokens")
    }
    for i, q in enumerate(questions):
        for j, name in enumerate(experts):
            r = records.get((q.qid, name))
            if r is None or not r["ok"]:
                continue
            available[i, j] = True
            probs[i, j] = r["probs"]
            fields["delay_s"][i, j] = r["modelled_delay_s"]
            fields["energy_j"][i, j] = r["modelled_energy_j"]
            fields["measured_s"][i, j] = r["measured_s"]
            fields["flops"][i, j] = r["flops"]
            fields["prompt_tokens"][i, j] = r["prompt_tokens"]
    sums, counts = np.full((n, e, 4), np.nan), np.full((n, e, 4), np.nan)
    for i, q in enumerate(questions):
        for j, name in enumerate(experts):
            r = records.get((q.qid, name))
            if r is not None and r["ok"] and r.get("option_logprobs"):
                sums[i, j], counts[i, j] = r["option_logprobs"], r["option_tokens"]
                if normalize is not None:
                    probs[i, j] = continuation_distribution(
                        r["option_logprobs"], r["option_tokens"], list(q.options), normalize
                    )
    answer = np.array([q.answer for q in questions])
    return AnswerTable(
        [q.qid for q in questions], list(experts), probs, available, answer, **fields,
        option_logprobs=sums, option_tokens=counts,
    )  # fmt: skip


def start_local_pool(
    pool: tuple[tuple[str, str], ...] = DEFAULT_POOL,
    smollm2_dir: str | None = None,
    device: str = "cpu",
    method: str = "continuation",
    normalize: str = DEFAULT_NORMALIZE,
) -> tuple[list, list[EdgeExpert]]:
    """Serve ``pool`` on 127.0.0.1 (one HTTP server per device profile, weights loaded once).

    Returns:
        The started :class:`~gatelab.edge.server.BackgroundServer` list (stop them when done)
        and the matching :class:`EdgeExpert` clients.
    """
    from gatelab.edge.served import load_served_models
    from gatelab.edge.server import BackgroundServer, build_app

    if method not in ("continuation", "letters"):  # before minutes of model loading
        raise ValueError(f"method must be 'continuation' or 'letters', got {method!r}")
    models = load_served_models([name for name, _ in pool], device=device, smollm2_dir=smollm2_dir)
    servers, experts = [], []
    try:
        for profile in dict.fromkeys(p for _, p in pool):
            names = [n for n, p in pool if p == profile]
            server = BackgroundServer(build_app({n: models[n] for n in names})).start()
            servers.append(server)
            experts += [
                EdgeExpert(
                    n,
                    server.url,
                    PROFILES[profile],
                    method=method,
                    normalize=normalize,
                    timeout_s=120.0,
                    backend="gatelab",
                )  # fmt: skip
                for n in names
            ]
    except BaseException:
        for server in servers:
            server.stop()
        raise
    order = [name for name, _ in pool]
    return servers, sorted(experts, key=lambda e: order.index(e.name))
