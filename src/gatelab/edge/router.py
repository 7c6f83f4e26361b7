"""The live MoE² router: pick the subset for a question's category, ask it, combine with the gate.

Reads what ``gatelab edge sweep`` wrote (``gate.safetensors``, a :mod:`gatelab.runs` checkpoint
whose metadata carries the gate's config, and ``router.json``): the trained gate, per-category
expert costs (modelled), the validation quality of every subset and the category centroids of the
training questions (a question without ``category`` goes to the nearest centroid in MiniLM space).
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

from gatelab import runs
from gatelab.edge.client import EdgeExpert, ExpertAnswer, ask_experts
from gatelab.edge.data import LETTERS
from gatelab.edge.model import EdgeGate, GateConfig, embed_texts, mixture
from gatelab.edge.select import (
    RUN_RULES,
    delay_cost,
    energy_cost,
    monotone_hull,
    select_subset,
    subset_to_run,
)


@dataclass
class RouterState:
    """A trained gate and the per-category tables needed to choose subsets."""

    gate: EdgeGate
    experts: list[str]
    top_k: int
    aggregate_s: float
    categories: dict[str, dict]
    run_rule: str = "hull_argmax"  # gatelab.edge.select.subset_to_run (sweeps before it: argmax)


@dataclass
class AskResult:
    """The combined answer and what each expert contributed (delay/energy are *modelled*)."""

    category: str
    subset: list[str]
    answer: str | None
    probs: list[float]
    weights: dict[str, float]
    per_expert: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    modelled_energy_j: float = 0.0
    modelled_delay_s: float = 0.0

    def describe(self) -> str:
        """Human-readable lines: answer, per-expert weight and costs, totals, notes."""
        lines = [
            f"answer: {self.answer}  (category {self.category}; "
            f"subset {', '.join(self.subset) or 'none'})"
        ]
        for name, info in self.per_expert.items():
            if info["status"] != "ok":
                lines.append(f"  {name}: {info['status']}")
                continue
            lines.append(
                f"  {name}: weight {self.weights.get(name, 0):.3f}, modelled delay "
                f"{info['modelled_delay_s'] * 1e3:.1f} ms, "
                f"modelled energy {info['modelled_energy_j']:.3f} J, "
                f"measured {info['measured_s'] * 1e3:.0f} ms"
            )
        lines.append(
            f"total: modelled energy {self.modelled_energy_j:.3f} J, modelled delay "
            f"{self.modelled_delay_s * 1e3:.1f} ms"
        )
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


def load_router(run_dir: str | Path) -> RouterState:
    """Load ``gate.safetensors`` + ``router.json`` from a sweep folder.

    Raises:
        FileNotFoundError: the sweep has not been run.
    """
    run_dir = Path(run_dir)
    for name in ("gate.safetensors", "router.json"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir / name} not found: run `gatelab edge sweep` first")
    info = runs.read_json(run_dir / "router.json")
    path = run_dir / "gate.safetensors"
    config = json.loads(runs.read_checkpoint_metadata(path).get("config", "{}"))
    if "gate" not in config:
        raise ValueError(f"{path}: no gate config in its metadata (rerun `gatelab edge sweep`)")
    gate = EdgeGate(GateConfig(**config["gate"])).double()
    runs.load_checkpoint(path, modules={"gate": gate})
    gate.eval()
    rule = info.get("run_rule", "hull_argmax")
    if rule not in RUN_RULES:
        raise ValueError(f"{run_dir / 'router.json'}: unknown run_rule {rule!r}; known {RUN_RULES}")
    return RouterState(
        gate, info["experts"], info["top_k"], info["aggregate_s"], info["categories"], rule
    )


def plan_subset(
    state: RouterState,
    category: str,
    energy_budget: float,
    delay_budget: float,
    exclude: frozenset[int] = frozenset(),
) -> frozenset[int]:
    """The subset MoE² runs for ``category`` under the budgets (exact selector on the hull).

    What runs is the sweep's rule applied to the selected set
    (:func:`gatelab.edge.select.subset_to_run`). ``exclude``: experts that must not be chosen
    (they failed): a subset holding one is worth only what its other members are worth, so the
    hull's argmax never returns it, and they are removed from the selected set.
    """
    if category not in state.categories:
        raise ValueError(f"unknown category {category!r}; known: {sorted(state.categories)}")
    table = state.categories[category]
    base = table["base_quality"]
    quality, argmax = monotone_hull(
        lambda s: base[",".join(map(str, sorted(s)))] if s and not s & exclude else -math.inf
    )
    constraints = [
        (energy_cost(table["energy_j"]), energy_budget),
        (delay_cost(table["delay_s"], state.aggregate_s), delay_budget),
    ]
    chosen = select_subset(len(state.experts), quality, constraints).subset
    return subset_to_run(state.run_rule, chosen, argmax) - exclude


def nearest_category(state: RouterState, x: np.ndarray) -> str:
    """Category whose training centroid is closest (cosine) to the embedding ``x``."""
    names = sorted(state.categories)
    centroids = np.array([state.categories[c]["centroid"] for c in names])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    return names[int(np.argmax(centroids @ x))]


def query_text(question: str, options: list[str]) -> str:
    """The text the gate embeds for a question: the question and its options."""
    return question + " " + " | ".join(options)


def ask(
    question: str,
    options: list[str],
    experts: list[EdgeExpert],
    state: RouterState,
    energy_budget: float,
    delay_budget: float,
    category: str | None = None,
) -> AskResult:
    """:func:`ask_async` run to completion (its own event loop and HTTP client)."""
    return asyncio.run(
        ask_async(question, options, experts, state, energy_budget, delay_budget, category)
    )


async def ask_async(
    question: str,
    options: list[str],
    experts: list[EdgeExpert],
    state: RouterState,
    energy_budget: float,
    delay_budget: float,
    category: str | None = None,
    embedding: np.ndarray | None = None,
    client: httpx.AsyncClient | None = None,
) -> AskResult:
    """Answer one question live (see module doc); failed experts are dropped and renormalised.

    If every expert of the chosen subset fails, the subset is planned again without them.
    ``embedding``: the MiniLM embedding of :func:`query_text`, if the caller already has it;
    ``client``: an HTTP client to share (a server's), else one per call.

    Raises:
        ValueError: not four options, or a bad category.
        ConnectionError: every expert that fits the budgets failed (each cause named).
    """
    if len(options) != len(LETTERS):
        raise ValueError(f"give exactly {len(LETTERS)} options, got {len(options)}")
    if energy_budget < 0 or delay_budget < 0:
        raise ValueError("budgets must be >= 0")
    if embedding is None:
        embedding = embed_texts([query_text(question, options)])[0]
    x = np.asarray(embedding, dtype=np.float64)
    category = category or nearest_category(state, x)
    subset = sorted(plan_subset(state, category, energy_budget, delay_budget))
    by_name = {e.name: e for e in experts}
    result = AskResult(category, [state.experts[i] for i in subset], None, [0.25] * 4, {})
    if not subset:
        result.notes.append("no expert fits these budgets: no answer")
        return result
    # Ask the subset; if every expert in it fails, plan again without the failed ones (the next
    # best subset under the same budgets) until one answers or none is left.
    replies: dict[str, ExpertAnswer | BaseException | None] = {}
    while True:
        names = [state.experts[i] for i in subset]
        todo = [n for n in names if n not in replies]
        for n in todo:
            if n not in by_name:
                result.notes.append(f"{n} is not in the experts list: treated as failed")
        reachable = [by_name[n] for n in todo if n in by_name]
        answers = await ask_experts(reachable, question, options, client) if reachable else {}
        replies |= {n: answers.get(n) for n in todo}
        if any(isinstance(replies[n], ExpertAnswer) for n in names):
            break
        failed = frozenset(state.experts.index(n) for n in replies)
        retry = sorted(plan_subset(state, category, energy_budget, delay_budget, failed) - failed)
        if not retry:
            causes = [str(replies[n] or f"{n} is not in the experts list") for n in replies]
            raise ConnectionError(f"all selected experts failed: {'; '.join(causes)}")
        result.notes.append(
            f"{', '.join(names)} failed: planned again without them: "
            f"{', '.join(state.experts[i] for i in retry)}"
        )
        subset = retry
    result.subset = names
    available = torch.zeros(len(state.experts), dtype=torch.bool)
    probs = torch.full((len(state.experts), 4), 0.25, dtype=torch.float64)
    for n, reply in replies.items():
        if isinstance(reply, ExpertAnswer):
            i = state.experts.index(n)
            available[i], probs[i] = True, torch.tensor(reply.probs, dtype=torch.float64)
            result.per_expert[n] = {
                "status": "ok",
                "measured_s": reply.measured_s,
                "modelled_delay_s": reply.modelled_delay_s,
                "modelled_energy_j": reply.modelled_energy_j,
            }
        else:  # the cause names the expert, the endpoint and the error
            result.per_expert[n] = {"status": f"failed: {reply}" if reply else "failed"}
            if n in names:
                result.notes.append(f"{n} failed; gate weights renormalised over the others")
    with torch.no_grad():
        logits = state.gate(torch.as_tensor(x)[None])  # (1, E)
        mixed, weights = mixture(logits, probs[None], available, state.top_k)
    result.probs = mixed[0].tolist()
    result.answer = LETTERS[int(mixed[0].argmax())]
    result.weights = {n: float(weights[0, state.experts.index(n)]) for n in names}
    ok = [v for v in result.per_expert.values() if v["status"] == "ok"]
    result.modelled_energy_j = sum(v["modelled_energy_j"] for v in ok)
    result.modelled_delay_s = max(v["modelled_delay_s"] for v in ok) + state.aggregate_s
    return result
