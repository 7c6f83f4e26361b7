"""The per-category expert table against a hand count on a tiny synthetic cache."""

import json
import math

from gatelab.edge.category_table import category_accuracy, category_table, shipped_category_table
from gatelab.edge.collect import read_cache
from gatelab.edge.data import MCQuestion

QUESTIONS = [
    MCQuestion("a/0", "a", "a", "?", ("w", "x", "y", "z"), 0),
    MCQuestion("a/1", "a", "a", "?", ("w", "x", "y", "z"), 1),
    MCQuestion("a/2", "a", "a", "?", ("w", "x", "y", "z"), 2),  # train: not counted
    MCQuestion("b/0", "b", "b", "?", ("w", "x", "y", "z"), 3),
    MCQuestion("b/1", "b", "b", "?", ("w", "x", "y", "z"), 3),  # "e2" failed: not counted
    MCQuestion("c/0", "c", "c", "?", ("w", "x", "y", "z"), 0),  # no test question
]
SPLIT = {"a/0": "test", "a/1": "test", "a/2": "train", "b/0": "test", "b/1": "test", "c/0": "val"}


def _one_hot(i):
    return [0.7 if k == i else 0.1 for k in range(4)]


def _records(tmp_path):
    rows = [  # (qid, expert, predicted option or None for a failure)
        ("a/0", "e1", 0), ("a/0", "e2", 1),
        ("a/1", "e1", 1), ("a/1", "e2", 1),
        ("a/2", "e1", 0), ("a/2", "e2", 2),
        ("b/0", "e1", 0), ("b/0", "e2", 3),
        ("b/1", "e1", 3), ("b/1", "e2", None),
        ("c/0", "e1", 0), ("c/0", "e2", 0),
    ]  # fmt: skip
    cache = tmp_path / "answers.jsonl"
    with cache.open("w") as out:
        for qid, expert, pred in rows:
            record = {"qid": qid, "expert": expert, "ok": pred is not None}
            if pred is not None:
                record["probs"] = _one_hot(pred)
            out.write(json.dumps(record) + "\n")
    return cache


def test_accuracy_per_category_matches_a_hand_count(tmp_path):
    got = category_accuracy(read_cache(_records(tmp_path)), QUESTIONS, SPLIT, ["e1", "e2"])
    # a: test a/0 (e1 right, e2 wrong), a/1 (both right) -> e1 2/2, e2 1/2
    assert got["a"] == {"n": 2, "accuracy": {"e1": 1.0, "e2": 0.5}}
    # b: only b/0 is answered by both (e1 wrong, e2 right)
    assert got["b"] == {"n": 1, "accuracy": {"e1": 0.0, "e2": 1.0}}
    assert got["c"]["n"] == 0 and all(math.isnan(v) for v in got["c"]["accuracy"].values())
    table = category_table(got).splitlines()
    assert table[0] == "| category | n test | e1 | e2 |"
    assert table[2] == "| a | 2 | **1.00** | 0.50 |"
    assert table[3] == "| b | 1 | 0.00 | **1.00** |"
    assert table[4] == "| c | 0 | – | – |"


def test_ties_are_all_marked_and_the_full_set_table_renders(tmp_path):
    got = {"a": {"n": 3, "accuracy": {"e1": 2 / 3, "e2": 2 / 3}}}
    assert category_table(got).splitlines()[2] == "| a | 3 | **0.67** | **0.67** |"
    table, n = shipped_category_table(tmp_path / "empty.jsonl")  # no cache yet: no answers
    assert n == 0 and "| arc_easy | 0 |" in table
