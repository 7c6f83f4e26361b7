r"""Multiple-choice questions for MoE²: MMLU dev (shipped in ``lm_eval``) and a generated suite.

- :func:`load_mmlu` parses the 281 four-option MMLU dev questions (5 per subject, 57 subjects) that
  the ``lm_eval`` wheel ships as chain-of-thought exemplars in
  ``lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json``, and groups the subjects into the four
  MMLU application categories (STEM, humanities, social sciences, other) using the ``tag`` of each
  subject's task file in ``lm_eval/tasks/mmlu/default``. Pass ``root`` to use another copy of
  the ``lm_eval`` package folder.
- :func:`generate_suite` builds questions a 100M-parameter model can sometimes answer (see its
  docstring for construction and difficulty).

Every question has exactly four options and one gold index; :func:`format_prompt` is the one prompt
format every expert receives (prompting variants live on the server side, see ``serving.py``).
"""

from __future__ import annotations

import calendar
import importlib.util
import json
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path

LETTERS = "ABCD"
MMLU_CATEGORIES = ("stem", "humanities", "social_sciences", "other")
GENERATED_CATEGORIES = ("arithmetic", "calendar", "alphabet", "words")

_OPTION = re.compile(r"\(([A-E])\)\s*(.*?)(?=\s*\([A-E]\)\s|\s*$)", re.S)
_ANSWER = re.compile(r"The answer is \(([A-E])\)")
_TAG = re.compile(r'"?tag"?:\s*"?mmlu_(\w+?)_tasks"?')


@dataclass(frozen=True)
class MCQuestion:
    """One four-option multiple-choice question.

    Attributes:
        qid: unique id, stable across runs (``mmlu/<subject>/<i>`` or ``gen/<task>/<i>``).
        category: application category (one of ``MMLU_CATEGORIES + GENERATED_CATEGORIES``).
        subject: finer label (MMLU subject or generator task).
        question: the question text.
        options: the four option texts, in letter order A-D.
        answer: index of the gold option (0-3).
    """

    qid: str
    category: str
    subject: str
    question: str
    options: tuple[str, str, str, str]
    answer: int


def format_prompt(question: str, options: tuple[str, ...] | list[str]) -> str:
    """The zero-shot prompt sent to every expert; the next token should be an option letter."""
    if len(options) != len(LETTERS):
        raise ValueError(f"expected {len(LETTERS)} options, got {len(options)}")
    lines = [f"Question: {question.strip()}"]
    lines += [f"{letter}. {text.strip()}" for letter, text in zip(LETTERS, options, strict=True)]
    return "\n".join(lines) + "\nAnswer:"


def _lm_eval_root(root: str | Path | None) -> Path:
    if root is not None:
        return Path(root)
    spec = importlib.util.find_spec("lm_eval")  # located, not imported: lm_eval is heavy
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "lm_eval is not installed: run `make setup` (pip install --no-deps lm_eval==0.4.13) "
            "or pass root= pointing at a copy of the lm_eval package folder"
        )
    return Path(spec.submodule_search_locations[0])


def _subject_categories(root: Path) -> dict[str, str]:
    categories = {}
    for path in sorted((root / "tasks/mmlu/default").glob("mmlu_*.yaml")):
        match = _TAG.search(path.read_text())
        if match:
            categories[path.stem.removeprefix("mmlu_")] = match.group(1)
    return categories


def _parse_block(block: str) -> tuple[str, tuple[str, ...], int] | None:
    """One ``Q: ... (A) .. (D) .. A: ... The answer is (X).`` exemplar, or None if malformed."""
    if "\nA: " not in block or "(A)" not in block:
        return None
    body, reasoning = block.split("\nA: ", 1)
    question, option_text = body.split("(A)", 1)
    options = tuple(text.strip() for _, text in _OPTION.findall("(A)" + option_text))
    letters = "".join(letter for letter, _ in _OPTION.findall("(A)" + option_text))
    answer = _ANSWER.search(reasoning)
    if letters != LETTERS or answer is None or answer.group(1) not in LETTERS:
        return None
    return question.strip(), options, LETTERS.index(answer.group(1))


def load_mmlu(root: str | Path | None = None) -> list[MCQuestion]:
    """The four-option MMLU dev questions shipped in the ``lm_eval`` wheel, with categories.

    Args:
        root: the ``lm_eval`` package folder; by default the installed one.

    Returns:
        Questions sorted by subject; malformed exemplars (five options, broken markup) are skipped.

    Raises:
        FileNotFoundError: ``lm_eval`` is not installed and no ``root`` was given.
    """
    root = _lm_eval_root(root)
    prompts = json.loads((root / "tasks/mmlu/flan_cot_fewshot/_cot_prompts.json").read_text())
    categories = _subject_categories(root)
    questions = []
    for subject in sorted(prompts):
        blocks = prompts[subject].split("\n\nQ: ")[1:]  # [0] is the "The following are ..." header
        for i, block in enumerate(blocks):
            parsed = _parse_block(block)
            if parsed is None:
                continue
            text, options, answer = parsed
            category = categories.get(subject, "other")
            qid = f"mmlu/{subject}/{i}"
            questions.append(MCQuestion(qid, category, subject, text, options, answer))
    return questions


def _shuffled(rng: random.Random, correct: str, distractors: list[str]) -> tuple[tuple, int]:
    options = [correct, *distractors]
    rng.shuffle(options)
    return tuple(options), options.index(correct)


_WORD_CLASSES = {
    "a colour": ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"],
    "an animal": ["dog", "cat", "horse", "cow", "lion", "tiger", "sheep", "rabbit"],
    "a fruit": ["apple", "banana", "grape", "pear", "cherry", "lemon", "peach", "plum"],
    "a number": ["one", "two", "three", "four", "five", "six", "seven", "eight"],
}


def _arithmetic(rng: random.Random) -> tuple[str, str, list[str]]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", str(a + b), [str(a + b + d) for d in (1, -1, 2)]
    big, small = max(a, b) + 5, min(a, b)
    return f"What is {big} - {small}?", str(big - small), [str(big - small + d) for d in (1, -1, 2)]


def _calendar(rng: random.Random) -> tuple[str, str, list[str]]:
    names = list(calendar.day_name) if rng.random() < 0.5 else list(calendar.month_name)[1:]
    i, n = rng.randrange(len(names)), len(names)
    kind = "day" if n == 7 else "month"
    return (
        f"Which {kind} comes right after {names[i]}?",
        names[(i + 1) % n],
        [names[(i + 2) % n], names[(i - 1) % n], names[(i + 3) % n]],
    )


def _alphabet(rng: random.Random) -> tuple[str, str, list[str]]:
    letters, i = string.ascii_uppercase, rng.randrange(2, 22)
    return (
        f"Which letter comes right after {letters[i]} in the alphabet?",
        letters[i + 1],
        [letters[i + 2], letters[i - 1], letters[i + 3]],
    )


def _words(rng: random.Random) -> tuple[str, str, list[str]]:
    target, *others = rng.sample(sorted(_WORD_CLASSES), 4)
    return (
        f"Which of these words is {target}?",
        rng.choice(_WORD_CLASSES[target]),
        [rng.choice(_WORD_CLASSES[o]) for o in others[:3]],
    )


def generate_suite(n_per_category: int = 40, seed: int = 0) -> list[MCQuestion]:
    r"""A generated four-option suite in four categories, built from the standard library.

    Construction (deterministic given ``seed``; options shuffled so gold letters are uniform):

    - ``arithmetic``: ``a + b`` or ``(max+5) - min`` with digits 1-9; distractors are the answer
      +1, -1, +2 (so only exact arithmetic helps).
    - ``calendar``: the day (``calendar.day_name``) or month (``calendar.month_name``) right after
      a given one; distractors are the one two and three after, and the one before.
    - ``alphabet``: the letter right after a given capital (``string.ascii_uppercase``);
      distractors are the neighbours two and three on, and the one before.
    - ``words``: which word belongs to a class (colour, animal, fruit, number word); distractors
      come from the three other classes.

    Difficulty: chance is 25%; the items are meant to be within reach of a ~100M model (one-step
    successor, single-digit arithmetic, word classes). Measured with the letter-logprob protocol
    of ``client.py``, however, the SmolLM2-135M variants stay at chance here as on MMLU: their top
    letter barely depends on the question (``runs/edge/experts.json`` after a sweep).

    Args:
        n_per_category: questions per category (>= 1).
        seed: seed of the generator.
    """
    if n_per_category < 1:
        raise ValueError(f"n_per_category must be >= 1, got {n_per_category}")
    rng = random.Random(seed)
    makers = {"arithmetic": _arithmetic, "calendar": _calendar, "alphabet": _alphabet}
    makers["words"] = _words
    questions = []
    for category, make in makers.items():
        for i in range(n_per_category):
            text, correct, distractors = make(rng)
            options, answer = _shuffled(rng, correct, distractors)
            qid = f"gen/{category}/{i}"
            questions.append(MCQuestion(qid, category, category, text, options, answer))
    return questions


def split_questions(
    questions: list[MCQuestion],
    fractions: tuple[float, float, float] = (0.5, 0.2, 0.3),
    seed: int = 0,
) -> dict[str, list[MCQuestion]]:
    """Disjoint train/validation/test splits, stratified by category (each category split alike).

    Raises:
        ValueError: fractions not positive or not summing to 1.
    """
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    rng = random.Random(seed)
    splits: dict[str, list[MCQuestion]] = {"train": [], "val": [], "test": []}
    by_category: dict[str, list[MCQuestion]] = {}
    for q in questions:
        by_category.setdefault(q.category, []).append(q)
    for category in sorted(by_category):
        items = sorted(by_category[category], key=lambda q: q.qid)
        rng.shuffle(items)
        n_train = round(fractions[0] * len(items))
        n_val = round(fractions[1] * len(items))
        splits["train"] += items[:n_train]
        splits["val"] += items[n_train : n_train + n_val]
        splits["test"] += items[n_train + n_val :]
    return splits
