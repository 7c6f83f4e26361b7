r"""Which expert is best where: accuracy of every expert per category on the test split.

For category :math:`c` and expert :math:`e`, over the test questions :math:`Q_c` of ``c`` that
every expert answered,

.. math::
    \mathrm{acc}_{c,e} = \frac{1}{|Q_c|} \sum_{q \in Q_c} [\arg\max_i p_{q,e,i} = a_q],

with :math:`p_{q,e}` the cached option distribution (first option on ties) and :math:`a_q`
the gold option. The best expert(s) of each category are marked. MoE² (arXiv:2501.09410) rests
on these differing across categories: a fixed best expert everywhere leaves the gate nothing to
learn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gatelab.edge.data import MCQuestion


def category_accuracy(
    records: dict[tuple[str, str], dict],
    questions: list[MCQuestion],
    split: dict[str, str],
    experts: list[str],
    which: str = "test",
) -> dict[str, dict]:
    """Per category: ``n`` questions of split ``which`` answered by all ``experts``, accuracies.

    Args:
        records: :func:`gatelab.edge.collect.read_cache` of the answer cache.
        questions: the question set.
        split: qid -> split name (:func:`gatelab.edge.suites.full_splits`).
        experts: the columns.
        which: the split counted.

    Returns:
        ``{category: {"n": int, "accuracy": {expert: float (NaN when n == 0)}}}``, sorted.
    """
    out: dict[str, dict] = {}
    for category in sorted({q.category for q in questions}):
        rows = []
        for q in questions:
            if q.category != category or split.get(q.qid) != which:
                continue
            answers = [records.get((q.qid, e)) for e in experts]
            if all(r is not None and r["ok"] for r in answers):
                rows.append([int(np.argmax(r["probs"])) == q.answer for r in answers])
        correct = np.array(rows, dtype=float).reshape(len(rows), len(experts))
        means = correct.mean(0) if rows else np.full(len(experts), np.nan)
        out[category] = {
            "n": len(rows),
            "accuracy": dict(zip(experts, means.tolist(), strict=True)),
        }
    return out


def category_table(accuracy: dict[str, dict]) -> str:
    """A markdown table: one row per category, one column per expert, the best in bold."""
    experts = list(next(iter(accuracy.values()))["accuracy"]) if accuracy else []
    lines = [
        "| category | n test | " + " | ".join(experts) + " |",
        "|---" * (len(experts) + 2) + "|",
    ]
    for category, row in accuracy.items():
        values = row["accuracy"]
        best = max((v for v in values.values() if np.isfinite(v)), default=np.nan)
        cells = [
            "–" if not np.isfinite(v) else f"**{v:.2f}**" if v == best else f"{v:.2f}"
            for v in values.values()
        ]
        lines.append(f"| {category} | {row['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shipped_category_table(cache: Path | None = None, seed: int = 0) -> tuple[str, int]:
    """The table of the full set's test split from ``cache`` (default: the shipped one).

    Returns:
        The markdown table and how many test questions it covers.
    """
    from gatelab.edge.collect import SHIPPED_FULL_CACHE, read_cache
    from gatelab.edge.experts import DEFAULT_POOL
    from gatelab.edge.suites import full_questions, full_splits

    questions = full_questions(seed=seed)
    records = read_cache(SHIPPED_FULL_CACHE if cache is None else cache)
    accuracy = category_accuracy(
        records, questions, full_splits(questions, seed), [n for n, _ in DEFAULT_POOL]
    )
    return category_table(accuracy), sum(row["n"] for row in accuracy.values())
