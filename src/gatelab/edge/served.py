r"""The served model: one named expert variant over shared base weights, its prompting and tokens.

:class:`ServedModel` applies the variant's prompting (:mod:`gatelab.edge.names`) and turns
requests into the model's input ids: :meth:`ServedModel.completion_ids` for ``/v1/completions``
(with ``echo`` after the variant's scoring head, otherwise after :meth:`ServedModel.render`) and
:meth:`ServedModel.chat_ids` for ``/v1/chat/completions``. The serving engine
(:mod:`gatelab.edge.engine`) runs them with a KV cache; :meth:`ServedModel.score` scores
prompts synchronously with the same code (tests, scripts). The HTTP app is
:mod:`gatelab.edge.server`.
"""

from __future__ import annotations

from itertools import accumulate
from typing import Any

import torch
from torch import nn

from gatelab.edge.costs import llama_forward_flops
from gatelab.edge.generate import Records, new_cache, prefill_chunk, score_chunk_size
from gatelab.edge.names import parse_model_name
from gatelab.edge.weights import load_base, truncate_layers

FEWSHOT_PREFIX = (
    "Question: What is 2 + 2?\nA. 3\nB. 5\nC. 4\nD. 6\nAnswer: C\n\n"
    "Question: Which of these is an animal?\nA. dog\nB. table\nC. blue\nD. seven\nAnswer: A\n\n"
    "Question: Which word means the opposite of hot?\nA. warm\nB. red\nC. big\nD. cold\n"
    "Answer: D\n\n"
)
CHAT_INSTRUCTION = "Reply with the letter of the correct option only."
# Few-shot examples for scoring (echo) requests: question/answer pairs in the cloze format of
# :func:`gatelab.edge.data.format_cloze`, so the scored continuation follows the same pattern.
FEWSHOT_CLOZE_PREFIX = (
    "Question: What is the opposite of up?\nAnswer: down\n\n"
    "Question: Which of these is an animal?\nAnswer: dog\n\n"
    "Question: What number comes next: 2, 4, 6, 8?\nAnswer: 10\n\n"
)
CHAT_SCORE_INSTRUCTION = "Answer the question with a few words."


class ServedModel:
    """One named expert variant: tokenizer, (possibly truncated) model and prompting."""

    def __init__(
        self, name: str, tokenizer: Any, model: nn.Module, decode_model: nn.Module | None = None
    ) -> None:
        self.name = name
        self.spec = parse_model_name(name)
        self.tokenizer = tokenizer
        total = model.config.num_hidden_layers
        self.n_layers = self.spec.n_layers or total
        if self.n_layers > total:
            raise ValueError(f"{name}: the base model has only {total} layers")
        self.model = model if self.n_layers == total else truncate_layers(model, self.n_layers)
        # decode steps after the first token may run another view of the same weights (the
        # GGUF's 4-bit blocks, :mod:`gatelab.edge.quant`); prefill and scoring run `model`
        decode = decode_model or model
        self.decode_model = (
            decode if self.n_layers == total else truncate_layers(decode, self.n_layers)
        )
        self.group = (id(model), self.n_layers)  # variants that can decode in one batch
        self.context = int(model.config.max_position_embeddings)  # longest sequence served
        # Gemma is trained with <bos> first (its tokenizer adds it); SmolLM2's adds nothing.
        marked = tokenizer("a").input_ids
        adds_bos = len(marked) > len(tokenizer("a", add_special_tokens=False).input_ids)
        self.bos_ids = [marked[0]] if adds_bos and marked[0] == tokenizer.bos_token_id else []
        # generation ends at the tokenizer's eos and at every eos of the generation config
        # (chat models end a turn with their own token, e.g. SmolLM2's <|im_end|>)
        ends = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ends = [] if ends is None else [ends] if isinstance(ends, int) else list(ends)
        eos = tokenizer.eos_token_id
        self.stop_ids = frozenset(ends + ([eos] if eos is not None else []))
        self.vocab_size = int(model.config.vocab_size)
        self._pieces: dict[int, str] = {}

    def piece(self, token: int) -> str:
        """The text of one token on its own (cached)."""
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self.tokenizer.decode([token])
        return text

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added."""
        return list(self.tokenizer(text, add_special_tokens=False).input_ids) if text else []

    def head_ids(self) -> list[int]:
        """``<bos>`` (if the model wants it) and the ids of :meth:`scoring_head`."""
        return self.bos_ids + self.encode(self.scoring_head())

    def completion_ids(self, prompt: str | list[int], echo: bool) -> tuple[list[int], int]:
        """Model input of a ``/v1/completions`` prompt and how many leading ids are not its own.

        With ``echo`` the prompt follows the scoring head (its tokens are returned, the head's
        not); otherwise the prompt is :meth:`render` ed. A prompt of token ids is used as given
        after the head or the few-shot prefix; a chat variant wraps prompts in text templates,
        so it needs text.

        Raises:
            ValueError: a token-id prompt for a chat variant without ``echo``.
        """
        if echo:
            head = self.head_ids()
            own = prompt if isinstance(prompt, list) else self.encode(prompt)
            return head + list(own), len(head)
        if isinstance(prompt, list):
            if self.spec.prompting == "chat":
                raise ValueError(
                    f"model {self.name!r} wraps prompts in its chat template: send text, "
                    "not token ids"
                )
            prefix = self.bos_ids + self.encode(self.render(prompt=""))
            return prefix + list(prompt), len(prefix)
        rendered = self.bos_ids + self.encode(self.render(prompt=prompt))
        return rendered, len(self.bos_ids)

    def echo_pieces(self, prompt: str | list[int]) -> tuple[str, list[str], list[int]]:
        """The echoed text of a prompt, its tokens' text pieces and their character offsets.

        Text prompts keep their own characters (pieces cut by the tokenizer's offsets); a prompt
        of token ids is echoed as the concatenation of its tokens' texts.
        """
        if isinstance(prompt, list):
            pieces = [self.piece(t) for t in prompt]
            offsets = list(accumulate(map(len, pieces), initial=0))[:-1]
            return "".join(pieces), pieces, offsets
        enc = self.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        spans = enc.offset_mapping
        return prompt, [prompt[s:e] for s, e in spans], [s for s, _ in spans]

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Model input of a chat request: the variant's rendering of ``messages``."""
        return self.bos_ids + self.encode(self.render(messages=messages))

    def scoring_head(self) -> str:
        """Text put before every prompt of a scoring (``echo``) request, by prompting variant.

        A prefix only, so the scored text keeps its own character offsets: nothing (zero-shot),
        :data:`FEWSHOT_CLOZE_PREFIX` (few-shot), or the chat template up to the start of the
        assistant turn after a user turn holding :data:`CHAT_SCORE_INSTRUCTION` (chat).
        """
        if self.spec.prompting == "fewshot":
            return FEWSHOT_CLOZE_PREFIX
        if self.spec.prompting == "chat":
            messages = [{"role": "user", "content": CHAT_SCORE_INSTRUCTION}]
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        return ""

    @torch.no_grad()
    def score(self, prompts: list[str]) -> dict[str, Any]:
        """Log-probability of every token of every prompt given what precedes it (``echo``).

        The head (:meth:`scoring_head`) and each prompt are tokenised separately and
        concatenated, so prompt tokens never straddle the head; each sequence is fed through
        the KV-cached prefill of the engine (:func:`gatelab.edge.generate.prefill_chunk`).

        Returns:
            per prompt: ``tokens`` (text pieces), ``text_offset`` (character offsets in the
            prompt), ``token_logprobs`` (None for the very first token of the sequence), plus
            ``usage`` and ``x_gatelab`` (FLOPs with logits at every position).
        """
        head = self.head_ids()
        out, flops, n_prompt = [], 0, 0
        chunk = score_chunk_size(self.vocab_size, 256)
        for prompt in prompts:
            enc = self.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
            if not enc.input_ids:
                raise ValueError("prompt is empty")
            ids = head + list(enc.input_ids)
            records, cache = Records.empty(len(ids)), new_cache(self.n_layers)
            for start in range(0, len(ids), chunk):
                prefill_chunk(self.model, cache, ids, start, min(len(ids), start + chunk), records)
            values = [None if i == 0 else float(records.logprobs[i]) for i in range(len(ids))]
            out.append(
                {
                    "tokens": [prompt[s:e] for s, e in enc.offset_mapping],
                    "text_offset": [s for s, _ in enc.offset_mapping],
                    "token_logprobs": values[len(head) :],
                }
            )
            flops += llama_forward_flops(self.model.config, self.n_layers, len(ids), len(ids))
            n_prompt += len(ids)
        return {
            "choices": out,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": 0},
            "x_gatelab": {"flops": flops, "n_layers": self.n_layers},
        }

    def render(self, prompt: str | None = None, messages: list[dict] | None = None) -> str:
        """The text actually fed to the model, after this variant's prompting."""
        prefix = FEWSHOT_PREFIX if self.spec.prompting == "fewshot" else ""
        if messages is None and self.spec.prompting != "chat":
            return prefix + (prompt or "")
        if messages is None:
            messages = [{"role": "user", "content": f"{prompt}\n{CHAT_INSTRUCTION}"}]
        if prefix:
            messages = [
                *messages[:-1],
                {**messages[-1], "content": prefix + messages[-1]["content"]},
            ]
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )


def load_served_models(
    names: list[str],
    device: str | torch.device = "cpu",
    smollm2_dir: str | None = None,
    int4_decode: bool = True,
) -> dict[str, ServedModel]:
    """Build every named variant, loading each base model once (see :func:`load_base`).

    With ``int4_decode`` (and on the CPU) generated tokens after the first are decoded with the
    GGUF's own Q4_1 blocks (:func:`gatelab.edge.quant.int4_decode_model`); otherwise with the
    float32 weights, like prefill and scoring.
    """
    from gatelab.edge.quant import int4_decode_model
    from gatelab.edge.weights import base_gguf

    specs = {name: parse_model_name(name) for name in names}
    bases: dict[str, tuple[Any, nn.Module, nn.Module]] = {}
    for spec in specs.values():
        if spec.base not in bases:
            tokenizer, model = load_base(spec.base, smollm2_dir)
            model = model.to(device)
            gguf = base_gguf(spec.base, smollm2_dir) if int4_decode else None
            decode = int4_decode_model(model, gguf)[0] if gguf else model
            bases[spec.base] = (tokenizer, model, decode)
    return {name: ServedModel(name, *bases[spec.base]) for name, spec in specs.items()}
