"""Query every expert once per question over HTTP and cache the answers (resumable JSONL).

Each line of the cache is one attempt for one ``(qid, expert)`` pair: either ``ok`` with the
option distribution, token counts, FLOPs, measured and modelled costs, or ``ok: false`` with the
error after all retries. On resume, pairs with an ``ok`` line are skipped and failed pairs are
tried again; the last line for a pair wins. Missing answers stay visible as missing
(:class:`AnswerTable.available`), never silently dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from gatelab.edge.client import (
    DEFAULT_NORMALIZE,
    EdgeExpert,
    ExpertAnswer,
    ask_experts,
    continuation_distribution,
)
from gatelab.edge.costs import PROFILES
from gatelab.edge.data import MCQuestion
from gatelab.edge.experts import DEFAULT_POOL

log = logging.getLogger(__name__)


def read_cache(cache: Path) -> dict[tuple[str, str], dict]:
    """The last cache record of every ``(qid, expert)`` pair (empty if no cache yet).

    A torn last line (a writer killed mid-line) is skipped with a warning naming the file and
    line, so its pair counts as missing and is asked again; any other line that is not a cache
    record is an error naming the file and line.

    Raises:
        ValueError: a line other than a torn last one is not a JSON cache record.
    """
    cache = Path(cache)
    records: dict[tuple[str, str], dict] = {}
    if not cache.exists():
        return records
    text = cache.read_text()
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = (record["qid"], record["expert"])
        except (json.JSONDecodeError, KeyError, TypeError):
            if number == len(lines) and not text.endswith("\n"):
                log.warning(
                    "%s:%d: torn last line skipped (its answer is asked again)", cache, number
                )
                break
            raise ValueError(f"{cache}:{number}: not a cache record (qid, expert, ...)") from None
        records[key] = record
    return records


def _drop_torn_tail(cache: Path) -> None:
    """Cut an unterminated last line, so that the next append starts a line of its own."""
    if not cache.exists() or cache.stat().st_size == 0:
        return
    data = cache.read_bytes()
    if data.endswith(b"\n"):
        return
    with cache.open("r+b") as handle:
        handle.truncate(data.rfind(b"\n") + 1)
        handle.flush()
        os.fsync(handle.fileno())


SHIPPED_QUICK_CACHE = Path(__file__).parent / "assets" / "answers_quick.jsonl"


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
        _drop_torn_tail(cache)
        with cache.open("a") as out:
            out.writelines(json.dumps(r) + "\n" for r in new)
    return len(new)


def collect(
    experts: list[EdgeExpert],
    questions: list[MCQuestion],
    cache: str | Path,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Ask every expert every question (experts concurrently), appending to the JSONL ``cache``.

    Returns:
        Counts: ``asked`` (new attempts), ``ok``, ``missing`` (pairs still without an answer).
    """
    cache = Path(cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    done = {key for key, r in read_cache(cache).items() if r["ok"]}
    _drop_torn_tail(cache)
    asked = failed = 0
    with cache.open("a") as out:
        for i, q in enumerate(questions):
            todo = [e for e in experts if (q.qid, e.name) not in done]
            if todo:
                results = asyncio.run(ask_experts(todo, q.question, q.options))
                for name, result in results.items():
                    record = {"qid": q.qid, "expert": name}
                    if isinstance(result, ExpertAnswer):
                        record |= {"ok": True, **asdict(result)}
                    else:
                        record |= {"ok": False, "error": f"{type(result).__name__}: {result}"}
                        failed += 1
                    out.write(json.dumps(record) + "\n")
                    asked += 1
                out.flush()
            if progress:
                progress(i + 1, len(questions))
    return {"asked": asked, "ok": asked - failed, "missing": failed}


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
) -> AnswerTable:
    """Arrange the cache for ``questions`` x ``experts`` (missing pairs marked unavailable).

    ``normalize`` (``"none"``, ``"chars"``, ``"tokens"``) recomputes the distribution of
    continuation-scored answers from their stored per-option sums; None keeps the stored one.
    """
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
                )  # fmt: skip
                for n in names
            ]
    except BaseException:
        for server in servers:
            server.stop()
        raise
    order = [name for name, _ in pool]
    return servers, sorted(experts, key=lambda e: order.index(e.name))
