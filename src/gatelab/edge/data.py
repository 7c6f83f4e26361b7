r"""Multiple-choice questions for MoE²: MMLU dev (shipped in ``lm_eval``) and a generated suite.

- :func:`load_mmlu` parses the 281 four-option MMLU dev questions (5 per subject, 57 subjects) that
  the ``lm_eval`` wheel ships as chain-of-thought exemplars in
  ``lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json``, and groups the subjects into the four
  MMLU application categories (STEM, humanities, social sciences, other) using the ``tag`` of each
  subject's task file in ``lm_eval/tasks/mmlu/default``. Pass ``root`` to use another copy of
  the ``lm_eval`` package folder.
- :func:`generate_suite` builds questions a 100M-parameter model answers clearly better than
  chance with continuation scoring (see its docstring for construction and difficulty).

Every question has exactly four options and one gold index; :func:`format_prompt` is the one prompt
format every expert receives (prompting variants live on the server side, see ``serving.py``).
"""

from __future__ import annotations

import calendar
import importlib.util
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

LETTERS = "ABCD"
MMLU_CATEGORIES = ("stem", "humanities", "social_sciences", "other")
GENERATED_CATEGORIES = ("capitals", "antonyms", "kinds", "sequences", "sentences")

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


def format_cloze(question: str) -> str:
    r"""The context for continuation scoring: ``Question: ...\nAnswer:`` (options not listed).

    Each option is then scored as the continuation ``" " + option`` of this context (the "cloze"
    formulation of lm-eval-harness tasks such as ARC and MMLU-cloze).
    """
    if not question.strip():
        raise ValueError("question is empty")
    return f"Question: {question.strip()}\nAnswer:"


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


_CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Russia": "Moscow",
    "England": "London",
    "Egypt": "Cairo",
    "Greece": "Athens",
    "Portugal": "Lisbon",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Hungary": "Budapest",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Argentina": "Buenos Aires",
    "Peru": "Lima",
    "Kenya": "Nairobi",
    "Thailand": "Bangkok",
    "South Korea": "Seoul",
    "India": "New Delhi",
    "Turkey": "Ankara",
    "Cuba": "Havana",
    "the Netherlands": "Amsterdam",
    "Belgium": "Brussels",
    "Chile": "Santiago",
}
_ANTONYMS = {
    "hot": "cold",
    "big": "small",
    "up": "down",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "open": "closed",
    "old": "young",
    "rich": "poor",
    "wet": "dry",
    "early": "late",
    "full": "empty",
    "hard": "soft",
    "loud": "quiet",
    "strong": "weak",
    "thick": "thin",
    "high": "low",
    "long": "short",
    "clean": "dirty",
    "heavy": "light",
    "day": "night",
    "buy": "sell",
    "win": "lose",
    "push": "pull",
    "love": "hate",
    "inside": "outside",
    "true": "false",
    "begin": "end",
    "left": "right",
    "north": "south",
    "give": "take",
    "friend": "enemy",
}
_KINDS = {
    "an animal": ["dog", "cat", "horse", "cow", "lion", "tiger", "sheep", "rabbit", "elephant"],
    "a fruit": ["apple", "banana", "grape", "pear", "cherry", "lemon", "peach", "mango"],
    "a colour": ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown"],
    "a vehicle": ["car", "bus", "train", "bicycle", "truck", "airplane", "boat", "motorcycle"],
    "a part of the body": ["hand", "foot", "nose", "ear", "knee", "elbow", "shoulder", "finger"],
    "a piece of clothing": ["shirt", "jacket", "sock", "dress", "coat", "scarf", "sweater"],
    "a musical instrument": ["piano", "guitar", "violin", "drum", "flute", "trumpet", "cello"],
}
_SENTENCES = (
    ("She was thirsty, so she drank a glass of", "water", ["shoes", "thunder", "paper"]),
    ("He opened the door with a", "key", ["cloud", "banana", "song"]),
    ("At night we sleep in a", "bed", ["river", "spoon", "tree"]),
    ("The sun rises in the", "east", ["kitchen", "pocket", "bottle"]),
    ("Fish live in the", "water", ["sky", "oven", "desert"]),
    ("We cut the bread with a", "knife", ["pillow", "cloud", "sock"]),
    ("When it rains, we open an", "umbrella", ["onion", "envelope", "oven"]),
    ("A cow gives us", "milk", ["glass", "music", "wood"]),
    ("Bees make", "honey", ["bricks", "glass", "paper"]),
    ("He wrote a letter with a", "pen", ["shoe", "carrot", "pillow"]),
    ("To see in the dark, turn on the", "light", ["sand", "cheese", "grass"]),
    ("The baby was crying because she was", "hungry", ["purple", "wooden", "square"]),
    ("Birds fly in the", "sky", ["soup", "drawer", "shoe"]),
    ("We brush our teeth with a", "toothbrush", ["hammer", "ladder", "carpet"]),
    ("In winter the lake turned to", "ice", ["bread", "paper", "music"]),
    ("She wears glasses to help her", "see", ["swim", "sneeze", "bake"]),
    ("The doctor works in a", "hospital", ["volcano", "cloud", "teapot"]),
    ("To pay for the food, he used his", "money", ["nose", "socks", "weather"]),
    ("Plants need sunlight and", "water", ["plastic", "music", "shoes"]),
    ("The teacher wrote on the", "board", ["soup", "bird", "rain"]),
    ("I was tired, so I went to", "sleep", ["school", "lunch", "dance"]),
    ("Ice cream is cold and", "sweet", ["loud", "wooden", "angry"]),
    ("The children played football in the", "park", ["fridge", "bathtub", "envelope"]),
    ("We listen to music with our", "ears", ["knees", "elbows", "toes"]),
    ("A book has many", "pages", ["wheels", "legs", "windows"]),
    ("The farmer grows corn in his", "field", ["pocket", "teacup", "shoe"]),
    ("You can buy bread at the", "bakery", ["ocean", "moon", "forest"]),
    ("The cat chased the", "mouse", ["moon", "bus", "sofa"]),
    ("Snow is cold and", "white", ["hot", "sticky", "loud"]),
    ("He called his mother on the", "phone", ["cloud", "carrot", "stairs"]),
    ("A week has seven", "days", ["months", "feet", "colours"]),
    ("The car stopped at the red", "light", ["apple", "cloud", "song"]),
)


def _capitals(rng: random.Random) -> tuple[str, str, list[str]]:
    country, *others = rng.sample(sorted(_CAPITALS), 4)
    return f"What is the capital of {country}?", _CAPITALS[country], [_CAPITALS[o] for o in others]


def _antonyms(rng: random.Random) -> tuple[str, str, list[str]]:
    word, *others = rng.sample(sorted(_ANTONYMS), 4)
    distractors = [_ANTONYMS[o] for o in others if _ANTONYMS[o] != _ANTONYMS[word]]
    while len(distractors) < 3:  # "light" is the antonym of two words
        extra = _ANTONYMS[rng.choice(sorted(_ANTONYMS))]
        if extra not in (_ANTONYMS[word], *distractors):
            distractors.append(extra)
    return f"What is the opposite of {word}?", _ANTONYMS[word], distractors


def _kinds(rng: random.Random) -> tuple[str, str, list[str]]:
    target, *others = rng.sample(sorted(_KINDS), 4)
    return (
        f"Which of these is {target}?",
        rng.choice(_KINDS[target]),
        [rng.choice(_KINDS[o]) for o in others],
    )


def _sequences(rng: random.Random) -> tuple[str, str, list[str]]:
    kind = rng.randrange(3)
    if kind == 0:  # arithmetic progression
        a, d = rng.randint(1, 20), rng.randint(1, 5)
        terms = [a + i * d for i in range(5)]
        wrong = [terms[-1] + 1 if d != 1 else terms[-1] + 2, terms[-1] - d, terms[-1] + 3 * d]
        text = ", ".join(map(str, terms[:4]))
        return f"What number comes next: {text}?", str(terms[-1]), [str(w) for w in wrong]
    names = list(calendar.day_name) if kind == 1 else list(calendar.month_name)[1:]
    i, n = rng.randrange(len(names)), len(names)
    unit = "day" if n == 7 else "month"
    return (
        f"Which {unit} comes after {names[i]}?",
        names[(i + 1) % n],
        [names[(i + 3) % n], names[(i - 2) % n], names[(i + 4) % n]],
    )


def _sentences(rng: random.Random) -> tuple[str, str, list[str]]:
    text, correct, wrong = _SENTENCES[rng.randrange(len(_SENTENCES))]
    return f"Complete the sentence: {text} ...", correct, list(wrong)


_MAKERS = {
    "capitals": _capitals,
    "antonyms": _antonyms,
    "kinds": _kinds,
    "sequences": _sequences,
    "sentences": _sentences,
}


def generate_suite(n_per_category: int = 40, seed: int = 0) -> list[MCQuestion]:
    r"""A generated four-option suite in five categories, for continuation scoring.

    Construction (deterministic given ``seed``; options shuffled so gold letters are uniform;
    every option is a short natural-language continuation, scored by
    :class:`~gatelab.edge.client.EdgeExpert` as ``"Answer: <option>"``):

    - ``capitals``: "What is the capital of X?" over 32 well-known countries; distractors are the
      capitals of three other countries.
    - ``antonyms``: "What is the opposite of X?" over 32 antonym pairs; distractors are antonyms
      of three other words.
    - ``kinds``: "Which of these is an animal / a fruit / a colour / a vehicle / a body part / a
      piece of clothing / a musical instrument?"; distractors are members of three other kinds.
    - ``sequences``: the next term of an arithmetic progression (distractors: last + 1 (or + 2),
      last - d, last + 3d), or the day / month after a given one (distractors 3 and 4 on, 2 back).
    - ``sentences``: 32 hand-written everyday sentences with one sensible completion and three
      absurd ones ("She was thirsty, so she drank a glass of water / shoes / ...").

    Difficulty: chance is 25%; per-category accuracy of the full SmolLM2-135M measured with
    continuation scoring is reported in ``docs/edge.md`` (``experts.json`` of a sweep).
    Items are drawn with replacement from the small pools, so the same question text can occur
    more than once (with different distractors); ``split_questions`` can put such twins in
    different splits, which matters only to the gate (it sees the question), not to the experts.

    Args:
        n_per_category: questions per category (>= 1).
        seed: seed of the generator.
    """
    if n_per_category < 1:
        raise ValueError(f"n_per_category must be >= 1, got {n_per_category}")
    rng = random.Random(seed)
    questions = []
    for category, make in _MAKERS.items():
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
