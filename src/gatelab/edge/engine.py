"""The serving engine: one worker thread, a bounded queue, continuous batching, prefix reuse.

Every request becomes a :class:`Job` (its prompts as token ids and its sampling settings). One
worker thread owns the models and, each turn of its loop:

1. drops jobs whose client went away (:meth:`Job.cancel`) or whose deadline passed;
2. admits waiting jobs while the decoding rows fit in ``max_batch`` (a bigger job runs alone);
3. runs ONE prefill chunk (``chunk_tokens``) of the next prefilling job, round-robin, so a long
   prompt never holds the others back for more than one chunk;
4. runs ONE decode step for every group of rows that share a model (the same base weights and
   layer count): all their sequences in one batched forward over a left-padded KV cache
   (continuous batching: rows join after their prefill and leave when finished).

The queue of jobs not yet admitted is bounded (``max_queue``): :meth:`Engine.submit` raises
:class:`EngineBusy` when full, which the HTTP layer answers 503 with ``Retry-After``.

**Prefix reuse.** After a prompt's prefill its KV states (and, when scored, its per-token
records) go into a small LRU store per model (``prefix_tokens`` tokens in all). A later prompt
that shares a prefix of ``P`` tokens with a stored one starts from a copy of its first
``R = min(P, T) - 1`` positions and reuses the records of tokens ``1..R`` (the distribution at
position ``R - 1`` predicted a token both share; the one at ``R`` may predict a different
token, so position ``R`` is fed again). Options scored against one context (lm-eval's
``loglikelihood``, the ``continuation`` client) thus pay for the context once.

**Costs reported.** ``flops`` is what a server with a KV cache and no prefix store computes for
the request (prefill of every prompt with logits at the positions asked for, then one token per
decode step over its context; :func:`~gatelab.edge.costs.llama_forward_flops`): it does not
depend on what earlier requests left in the store. ``compute_s`` is the measured worker time
spent on the job's own prefill plus its share of each batched decode step.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gatelab.edge.costs import llama_forward_flops
from gatelab.edge.generate import (
    Records,
    TextStream,
    cache_from_states,
    cache_states,
    choose_tokens,
    merge_rows,
    new_cache,
    prefill_chunk,
    score_chunk_size,
    select_rows,
)

CHUNK_TOKENS = 128  # prefill tokens per worker turn: ~0.5 s of one CPU core for SmolLM2-135M


class EngineBusy(RuntimeError):
    """The queue is full (HTTP 503 with ``Retry-After``)."""


class JobFailed(RuntimeError):
    """A job ended without a result: ``status`` is its HTTP status (504 on timeout)."""

    def __init__(self, message: str, status: int = 500, code: str = "internal") -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True)
class Sampling:
    """How a job's rows are decoded (see :mod:`gatelab.edge.generate`)."""

    max_tokens: int = 16  # per row; 0: score the prompts only
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    top_k: int = 0  # alternatives reported per generated token
    n: int = 1  # rows (choices) per prompt
    seed: int | None = None


@dataclass
class Prompt:
    """One prompt of a job: the model's input ids; the first ``n_head`` are not returned."""

    ids: list[int]
    n_head: int = 0
    score: bool = False  # per-token records (echo)


@dataclass
class TokenOut:
    """One generated token as the HTTP layer reports it."""

    token: int
    text: str  # the token's own text
    delta: str  # text newly released by this token (held back text comes out later)
    logprob: float
    top: list[tuple[str, float]]
    offset: int  # character offset of the token's text in the row's text


@dataclass
class Job:
    """One request: prompts, sampling, a deadline and the channel its events go back through.

    Events, put on :attr:`events` (an ``asyncio.Queue`` of the submitting loop) in order:
    ``("scored", p, Records)`` per scored prompt, ``("token", row, TokenOut)``,
    ``("end", row, finish_reason, held_back_text)`` per row (``row = p * n + choice``), then
    ``("done", stats)`` or ``("error", JobFailed)``.
    """

    served: Any  # a gatelab.edge.served.ServedModel
    prompts: list[Prompt]
    sampling: Sampling
    timeout_s: float = 120.0
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    on_event: Callable[[tuple], None] | None = None  # instead of a loop (synchronous callers)
    cancelled: bool = False
    deadline: float = 0.0
    finished: bool = False
    # worker state
    prompt_index: int = 0
    position: int = 0
    cache: Any = None
    records: Records | None = None
    generators: list[torch.Generator] = field(default_factory=list)
    rows_left: int = 0
    flops: int = 0
    compute_s: float = 0.0
    completion_tokens: int = 0

    @property
    def rows(self) -> int:
        """Decode rows this job occupies."""
        return len(self.prompts) * self.sampling.n if self.sampling.max_tokens else 1

    def cancel(self) -> None:
        """Stop working on this job (its client disconnected); thread-safe."""
        self.cancelled = True

    def emit(self, event: tuple) -> None:
        """Hand one event to the submitter (from the worker thread)."""
        if self.on_event is not None:
            self.on_event(event)
        elif self.loop is not None and self.events is not None:
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody listens any more
                self.cancelled = True


@dataclass
class Row:
    """One sequence being decoded."""

    job: Job
    index: int  # p * n + choice
    stream: TextStream
    generator: torch.Generator
    length: int  # tokens in the sequence (prompt + generated)
    generated: int = 0
    last: int = 0  # the token to feed next


@dataclass
class Group:
    """The rows decoding on one model, batched (left-padded cache, mask ``(B, L)``)."""

    model: torch.nn.Module
    rows: list[Row] = field(default_factory=list)
    cache: Any = None
    mask: torch.Tensor | None = None
    joining: list[tuple[list, int, list[Row]]] = field(default_factory=list)


@dataclass
class _Stored:
    ids: tuple[int, ...]
    states: list
    records: Records | None


class PrefixStore:
    """LRU of recent prompts' KV states per model group, ``max_tokens`` tokens in all."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.entries: OrderedDict[tuple, _Stored] = OrderedDict()
        self.hits = 0

    def _tokens(self) -> int:
        return sum(len(e.ids) for e in self.entries.values())

    def add(self, group: Any, ids: list[int], states: list, records: Records | None) -> None:
        """Remember a prefilled prompt (a copy of its states, exactly its length)."""
        if len(ids) > self.max_tokens:
            return
        states = [(k.clone(), v.clone()) for k, v in states]  # not the buffers' spare room
        key = (group, tuple(ids))
        old = self.entries.pop(key, None)
        if old is not None and old.records is not None and records is None:
            records = old.records
        self.entries[key] = _Stored(tuple(ids), states, records)
        while self._tokens() > self.max_tokens:
            self.entries.popitem(last=False)

    def lookup(self, group: Any, ids: list[int], need_records: bool) -> tuple[int, _Stored | None]:
        """The longest reusable prefix ``R`` (see module doc) and its entry, or ``(0, None)``."""
        best, found = 0, None
        for (g, _), entry in self.entries.items():
            if g != group or (need_records and entry.records is None):
                continue
            n = min(len(entry.ids), len(ids))
            common = next((i for i in range(n) if entry.ids[i] != ids[i]), n)
            reuse = min(common, len(ids)) - 1
            if reuse > best:
                best, found = reuse, entry
        if found is not None:
            self.entries.move_to_end((group, found.ids))
            self.hits += 1
        return best, found


class Engine:
    """The worker thread serving every :class:`Job` (see module doc).

    Args:
        max_batch: rows decoded together (continuous batching); also the admission limit.
        max_queue: jobs waiting for admission before :meth:`submit` refuses.
        chunk_tokens: prefill tokens per worker turn.
        prefix_tokens: tokens kept in the prefix store (0: no reuse).
    """

    def __init__(
        self,
        max_batch: int = 8,
        max_queue: int = 32,
        chunk_tokens: int = CHUNK_TOKENS,
        prefix_tokens: int = 2048,
    ) -> None:
        if max_batch < 1 or max_queue < 0 or chunk_tokens < 1 or prefix_tokens < 0:
            raise ValueError(
                "need max_batch >= 1, max_queue >= 0, chunk_tokens >= 1, prefix_tokens >= 0"
            )
        self.max_batch, self.max_queue = max_batch, max_queue
        self.chunk_tokens = chunk_tokens
        self.store = PrefixStore(prefix_tokens)
        self.waiting: list[Job] = []
        self.prefilling: list[Job] = []
        self.groups: dict[Any, Group] = {}
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.busy_s = 0.0  # worker time spent computing (for the benchmark)
        self._load = {"waiting": 0, "prefilling": 0, "decoding": 0}
        self.peak_rows = 0  # most rows decoded in one batched forward
        self.cancelled = 0  # jobs dropped because their client went away

    # -- the submitting side --------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`EngineBusy` when ``max_queue`` jobs already wait."""
        job.deadline = time.monotonic() + job.timeout_s
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise EngineBusy(f"{len(self.waiting)} requests are waiting")
            self.waiting.append(job)
            self.cond.notify()
        self.start()

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        with self.cond:
            if self.thread is None or not self.thread.is_alive():
                self.stopping = False
                self.thread = threading.Thread(target=self._run, name="gatelab-engine", daemon=True)
                self.thread.start()

    def stop(self) -> None:
        """Fail every job left and end the worker thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def load(self) -> dict[str, int]:
        """Jobs waiting and prefilling, rows decoding, as of the worker's last turn."""
        with self.cond:
            return dict(self._load, waiting=len(self.waiting))

    # -- the worker -------------------------------------------------------------------------
    def _decoding_rows(self) -> int:
        groups = self.groups.values()
        return sum(len(g.rows) + sum(len(x[2]) for x in g.joining) for g in groups)

    def _rows_in_use(self) -> int:
        return self._decoding_rows() + sum(j.rows for j in self.prefilling)

    def _admit(self) -> None:
        while self.waiting:
            job, used = self.waiting[0], self._rows_in_use()
            if used and used + job.rows > self.max_batch:
                return
            self.waiting.pop(0)
            self._begin(job)
            self.prefilling.append(job)

    def _run(self) -> None:
        while True:
            with self.cond:
                self._reap()
                if self.stopping:
                    break
                self._admit()
                self._load = {
                    "waiting": len(self.waiting),
                    "prefilling": len(self.prefilling),
                    "decoding": self._decoding_rows(),
                }
                if not self.prefilling and not self._decoding_rows():
                    self.cond.wait(timeout=0.5)
                    continue
            start = time.perf_counter()
            if self.prefilling:
                job = self.prefilling.pop(0)
                try:
                    done = self._prefill_step(job)
                except Exception as error:  # a bug or an OOM: this job fails, the engine lives
                    self._fail(job, JobFailed(f"prefill failed: {type(error).__name__}: {error}"))
                    done = True
                if not done:
                    self.prefilling.append(job)  # round-robin over prefilling jobs
            for key in list(self.groups):
                group = self.groups[key]
                if group.rows or group.joining:
                    try:
                        self._decode_step(group)
                    except Exception as error:
                        for job in {id(r.job): r.job for r in group.rows}.values():
                            self._fail(job, JobFailed(f"decode failed: {type(error).__name__}"))
                        self.groups.pop(key)
            self.busy_s += time.perf_counter() - start
        for job in self.waiting + self.prefilling:
            self._fail(job, JobFailed("the server is shutting down", 503, "shutting_down"))

    def _reap(self) -> None:
        """Fail expired jobs (504) and drop cancelled ones wherever they are."""
        now = time.monotonic()
        jobs = self.waiting + self.prefilling
        for group in self.groups.values():
            jobs += [r.job for r in group.rows] + [x[2][0].job for x in group.joining]
        for job in jobs:
            if not job.cancelled and now > job.deadline:
                message = f"the request did not finish within {job.timeout_s:g} s"
                self._fail(job, JobFailed(message, 504, "timeout"))
            elif job.cancelled and not job.finished:  # its client went away
                job.finished = True
                self.cancelled += 1
        self.waiting = [j for j in self.waiting if not j.cancelled]
        self.prefilling = [j for j in self.prefilling if not j.cancelled]
        for group in self.groups.values():
            group.joining = [x for x in group.joining if not x[2][0].job.cancelled]
            keep = [i for i, r in enumerate(group.rows) if not r.job.cancelled]
            if len(keep) < len(group.rows):
                self._keep_rows(group, keep)

    def _fail(self, job: Job, error: JobFailed) -> None:
        if not job.finished:
            job.cancelled = job.finished = True
            job.emit(("error", error))

    def _begin(self, job: Job) -> None:
        seed = job.sampling.seed
        base = torch.Generator().manual_seed(seed) if seed is not None else torch.Generator()
        if seed is None:
            base.seed()
        job.generators = [base]
        job.rows_left = len(job.prompts) * job.sampling.n if job.sampling.max_tokens else 0
        self._start_prompt(job)

    def _start_prompt(self, job: Job) -> None:
        prompt = job.prompts[job.prompt_index]
        served = job.served
        reuse, entry = self.store.lookup(served.group, prompt.ids, prompt.score)
        room = job.sampling.max_tokens + 1
        if entry is not None and reuse > 0:
            states = [(k[..., :reuse, :], v[..., :reuse, :]) for k, v in entry.states]
            job.cache = cache_from_states(states, len(prompt.ids) - reuse + room)
            job.position = reuse
        else:
            job.cache, job.position = new_cache(served.n_layers), 0
        job.records = None
        if prompt.score:
            job.records = Records.empty(len(prompt.ids))
            if entry is not None and reuse > 0 and entry.records is not None:
                for name in ("logprobs", "top_values", "top_ids"):
                    getattr(job.records, name)[: reuse + 1] = getattr(entry.records, name)[
                        : reuse + 1
                    ]
        config = served.model.config
        job.flops += llama_forward_flops(
            config, served.n_layers, len(prompt.ids), len(prompt.ids) if prompt.score else 1
        )

    def _prefill_step(self, job: Job) -> bool:
        """One chunk of the current prompt; True when the job left the prefill stage."""
        prompt, served = job.prompts[job.prompt_index], job.served
        limit = self.chunk_tokens
        if prompt.score:
            limit = score_chunk_size(served.model.config.vocab_size, limit)
        end = min(len(prompt.ids), job.position + limit)
        start_s = time.perf_counter()
        last = prefill_chunk(served.model, job.cache, prompt.ids, job.position, end, job.records)
        job.compute_s += time.perf_counter() - start_s
        job.position = end
        if end < len(prompt.ids):
            return False
        states = cache_states(job.cache)
        self.store.add(served.group, prompt.ids, states, job.records)
        if prompt.score:
            job.emit(("scored", job.prompt_index, job.records))
        if job.sampling.max_tokens:
            self._first_tokens(job, prompt, states, last)
        job.cache = job.records = None
        job.prompt_index += 1
        if job.prompt_index < len(job.prompts):
            self._start_prompt(job)
            return False
        self._maybe_done(job)
        return True

    def _first_tokens(self, job: Job, prompt: Prompt, states: list, logprobs: torch.Tensor) -> None:
        """Sample the first token of each of the prompt's ``n`` rows from the prefill's output."""
        s, served = job.sampling, job.served
        rows = []
        for choice in range(s.n):
            stream = TextStream(served.tokenizer, s.stop)
            index = job.prompt_index * s.n + choice
            rows.append(Row(job, index, stream, job.generators[0], len(prompt.ids)))
        logits = logprobs[None].expand(len(rows), -1)  # (n, V): log-probs are shifted logits
        alive = self._advance(rows, logits)
        if alive:
            group = self.groups.setdefault(served.group, Group(served.decode_model))
            group.joining.append((states, len(prompt.ids), alive))

    def _advance(self, rows: list[Row], logprobs: torch.Tensor) -> list[Row]:
        """Sample, report and finish rows after one forward; returns the rows still going."""
        s = [r.job.sampling for r in rows]
        tokens = choose_tokens(
            logprobs, [x.temperature for x in s], [x.top_p for x in s], [r.generator for r in rows]
        )
        alive = []
        for b, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            job, served = row.job, row.job.served
            row.generated += 1
            job.completion_tokens += 1
            row.last = token
            finish = None
            if token in served.stop_ids:
                finish = "stop"
            else:
                delta = row.stream.push(token)
                k = job.sampling.top_k
                top = []
                if k:
                    values, ids = torch.topk(logprobs[b], k)
                    top = [
                        (served.piece(int(i)), float(v)) for v, i in zip(values, ids, strict=True)
                    ]
                out = TokenOut(
                    token, served.piece(token), delta, float(logprobs[b, token]), top,
                    row.stream.offsets[-1],
                )  # fmt: skip
                if not row.stream.stopped or out.offset < len(row.stream.text):
                    job.emit(("token", row.index, out))  # not a token inside the stop string
                if row.stream.stopped:
                    finish = "stop"
            if finish is None and (
                row.generated >= job.sampling.max_tokens or row.length + 1 >= served.context
            ):
                finish = "length"
            if finish is None:
                alive.append(row)
                continue
            job.emit(("end", row.index, finish, row.stream.finish()))
            job.rows_left -= 1
            self._maybe_done(job)
        return alive

    def _maybe_done(self, job: Job) -> None:
        """Report the job's totals once every prompt is prefilled and every row has ended."""
        if job.finished or job.prompt_index < len(job.prompts) or job.rows_left:
            return
        job.finished = True
        stats = {"flops": job.flops, "compute_s": job.compute_s, "n_layers": job.served.n_layers}
        stats["completion_tokens"] = job.completion_tokens
        job.emit(("done", stats))

    def _keep_rows(self, group: Group, keep: list[int]) -> None:
        if not keep:
            group.rows, group.cache, group.mask = [], None, None
            return
        group.cache, group.mask = select_rows(group.cache, group.mask, keep)
        group.rows = [group.rows[i] for i in keep]

    def _merge_joining(self, group: Group) -> None:
        states, lengths, rows = [], [], []
        if group.rows:
            real = group.mask.sum(dim=1).tolist()
            batched = cache_states(group.cache)
            for b, row in enumerate(group.rows):
                states.append([(k[b : b + 1], v[b : b + 1]) for k, v in batched])
                lengths.append(int(real[b]))
                rows.append(row)
        for joined_states, length, joined_rows in group.joining:
            for row in joined_rows:
                states.append(joined_states)
                lengths.append(length)
                rows.append(row)
        room = max(r.job.sampling.max_tokens - r.generated for r in rows) + 1
        group.cache, group.mask = merge_rows(states, lengths, room)
        group.rows, group.joining = rows, []

    def _decode_step(self, group: Group) -> None:
        if group.joining:
            self._merge_joining(group)
        if not group.rows:
            return
        served_model = group.model
        device = group.mask.device
        ids = torch.tensor([[r.last] for r in group.rows], device=device)  # (B, 1)
        mask = torch.cat([group.mask, group.mask.new_ones(len(group.rows), 1)], dim=1)  # (B, L+1)
        padded = not bool(mask.all())
        positions = (mask.sum(dim=1, keepdim=True) - 1) if padded else None  # (B, 1)
        start = time.perf_counter()
        with torch.no_grad():
            logits = served_model(
                ids,
                attention_mask=mask if padded else None,
                position_ids=positions,
                cache=group.cache,
                use_cache=True,
            ).logits[:, -1]  # (B, V)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        seconds = time.perf_counter() - start
        group.mask = mask
        self.peak_rows = max(self.peak_rows, len(group.rows))
        for row in group.rows:
            row.job.compute_s += seconds / len(group.rows)
            config, served = row.job.served.model.config, row.job.served
            row.job.flops += llama_forward_flops(config, served.n_layers, 1, 1, n_past=row.length)
            row.length += 1
        alive = {id(r) for r in self._advance(group.rows, logprobs)}
        keep = [i for i, r in enumerate(group.rows) if id(r) in alive]
        if len(keep) < len(group.rows):
            self._keep_rows(group, keep)
