"""The model-name grammar of the served experts: ``<base>[-l<L>][-fewshot|-chat]``.

Several genuinely different experts share one set of weights:

- base ``smollm2-135m`` (SmolLM2-135M-Instruct, 30 layers, width 576), ``gemma3-270m`` (the
  Gemma 3 270M *base* model, 18 layers, width 640, 262k vocabulary: another family, tokenizer and
  training set) or ``tiny-random`` (a 2-layer random Llama for tests, no files needed);
- ``-l<L>``: only the first ``L`` decoder layers, then the model's own final norm and LM head
  (an early-exit truncation: fewer FLOPs, weaker answers);
- prompting: none (``zero``, the prompt as sent), ``-fewshot`` (three worked examples first) or
  ``-chat`` (the model's chat template with an instruction).
"""

from __future__ import annotations

from dataclasses import dataclass

BASES = ("smollm2-135m", "gemma3-270m", "tiny-random")
PROMPTINGS = ("zero", "fewshot", "chat")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model name: base weights, number of layers kept, prompting variant."""

    base: str
    n_layers: int | None  # None: all layers
    prompting: str


def parse_model_name(name: str) -> ModelSpec:
    """``smollm2-135m-l20-fewshot`` -> ``ModelSpec("smollm2-135m", 20, "fewshot")``.

    Raises:
        ValueError: unknown base, bad layer count or unknown prompting suffix.
    """
    base = next((b for b in BASES if name == b or name.startswith(b + "-")), None)
    if base is None:
        raise ValueError(
            f"unknown model {name!r}: expected <base>[-l<L>][-fewshot|-chat], base in {BASES}"
        )
    n_layers, prompting = None, "zero"
    for part in filter(None, name[len(base) :].split("-")):
        if part in PROMPTINGS[1:]:
            prompting = part
        elif part[0] == "l" and part[1:].isdigit() and int(part[1:]) >= 1:
            n_layers = int(part[1:])
        else:
            raise ValueError(
                f"model {name!r}: unknown suffix {part!r} (use -l<L>, -fewshot, -chat)"
            )
    return ModelSpec(base, n_layers, prompting)
