r"""The served model: one named expert variant over shared base weights, scoring and decoding.

:class:`ServedModel` applies the variant's prompting (:mod:`gatelab.edge.names`) and runs the
(possibly truncated, :mod:`gatelab.edge.weights`) model: :meth:`ServedModel.score` gives the
log-probability of every prompt token (what ``echo: true, max_tokens: 0`` returns, in one batched
forward) and :meth:`ServedModel.generate` decodes, greedy at ``temperature=0`` and sampled
otherwise. Both report the forward FLOPs (:func:`gatelab.edge.costs.llama_forward_flops`) and the
measured compute seconds, which the HTTP app (:mod:`gatelab.edge.server`) returns as
``x_gatelab``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
from torch import nn

from gatelab.edge.costs import llama_forward_flops
from gatelab.edge.names import parse_model_name
from gatelab.edge.weights import load_base, truncate_layers

MAX_TOP_LOGPROBS = 20  # OpenAI's chat API limit; the legacy API allowed 5
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

    def __init__(self, name: str, tokenizer: Any, model: nn.Module) -> None:
        self.name = name
        self.spec = parse_model_name(name)
        self.tokenizer = tokenizer
        total = model.config.num_hidden_layers
        self.n_layers = self.spec.n_layers or total
        if self.n_layers > total:
            raise ValueError(f"{name}: the base model has only {total} layers")
        self.model = model if self.n_layers == total else truncate_layers(model, self.n_layers)
        self.lock = threading.Lock()  # one forward at a time: predictable CPU use and timings
        # Gemma is trained with <bos> first (its tokenizer adds it); SmolLM2's adds nothing.
        marked = tokenizer("a").input_ids
        adds_bos = len(marked) > len(tokenizer("a", add_special_tokens=False).input_ids)
        self.bos_ids = [marked[0]] if adds_bos and marked[0] == tokenizer.bos_token_id else []

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

        The head (:meth:`scoring_head`) and each prompt are tokenised separately and concatenated,
        so prompt tokens never straddle the head. All prompts run in ONE right-padded forward pass
        (causal attention: real tokens never see the padding, whose outputs are discarded).

        Returns:
            per prompt: ``tokens`` (text pieces), ``text_offset`` (character offsets in the
            prompt), ``token_logprobs`` (None for the very first token of the sequence), plus
            ``usage`` and ``x_gatelab`` (FLOPs with logits at every position, unpadded lengths).
        """
        device = next(self.model.parameters()).device
        head = self.scoring_head()
        head_ids = self.bos_ids + (
            self.tokenizer(head, add_special_tokens=False).input_ids if head else []
        )
        rows, spans = [], []
        for prompt in prompts:
            enc = self.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
            if not enc.input_ids:
                raise ValueError("prompt is empty")
            rows.append(list(head_ids) + list(enc.input_ids))
            spans.append(enc.offset_mapping)
        width = max(map(len, rows))
        pad = self.tokenizer.eos_token_id or 0
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)  # (B, T)
        start = time.perf_counter()
        with self.lock:
            logits = self.model(ids, use_cache=False).logits  # (B, T, V)
        # log p(t_i | t_<i) = logit - logsumexp, one row at a time in float64 (a 262k vocabulary
        # over B x T positions would not fit in memory at once)
        nxt = torch.empty(ids.shape[0], ids.shape[1] - 1, dtype=torch.float64, device=device)
        for b in range(ids.shape[0]):
            row_logits = logits[b, :-1].double()  # (T-1, V), converted once
            nxt[b] = row_logits.gather(-1, ids[b, 1:, None])[:, 0] - torch.logsumexp(
                row_logits, dim=-1
            )
        seconds = time.perf_counter() - start
        out, flops, n_prompt = [], 0, 0
        config, n_head = self.model.config, len(head_ids)
        for b, (row, offsets) in enumerate(zip(rows, spans, strict=True)):
            values = [None if i == 0 else float(nxt[b, i - 1]) for i in range(len(row))]
            out.append(
                {
                    "tokens": [prompts[b][s:e] for s, e in offsets],
                    "text_offset": [s for s, _ in offsets],
                    "token_logprobs": values[n_head:],
                }
            )
            flops += llama_forward_flops(config, self.n_layers, len(row), len(row))
            n_prompt += len(row)
        return {
            "choices": out,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": 0},
            "x_gatelab": {"flops": flops, "compute_s": seconds, "n_layers": self.n_layers},
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

    @torch.no_grad()
    def generate(
        self, text: str, max_tokens: int, top_n: int, temperature: float = 0.0, seed: int = 0
    ) -> dict[str, Any]:
        """Decode up to ``max_tokens`` tokens with each token's logprob and top-n alternatives."""
        device = next(self.model.parameters()).device
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        ids = torch.tensor([self.bos_ids + list(ids)], device=device)  # (1, T)
        n_prompt = ids.shape[1] - len(self.bos_ids)
        if n_prompt == 0:
            raise ValueError("prompt is empty")
        generator = torch.Generator(device=device).manual_seed(seed)
        steps, flops, start = [], 0, time.perf_counter()
        with self.lock:
            for _ in range(max_tokens):
                logits = self.model(ids, use_cache=False, logits_to_keep=1).logits[0, -1]  # (V,)
                flops += llama_forward_flops(self.model.config, self.n_layers, ids.shape[1])
                logprobs = torch.log_softmax(logits.double(), dim=-1)  # (V,)
                if temperature > 0:
                    probs = torch.softmax(logits.double() / temperature, dim=-1)
                    token = int(torch.multinomial(probs, 1, generator=generator))
                else:
                    token = int(torch.argmax(logprobs))
                top = torch.topk(logprobs, top_n) if top_n else None
                steps.append((token, float(logprobs[token]), top))
                ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)  # (1, T+1)
                if token == self.tokenizer.eos_token_id:
                    break
        seconds = time.perf_counter() - start
        decode = self.tokenizer.decode
        return {
            "text": decode([t for t, _, _ in steps], skip_special_tokens=True),
            "tokens": [decode([t]) for t, _, _ in steps],
            "token_logprobs": [lp for _, lp, _ in steps],
            "top": [
                []
                if top is None
                else [
                    (decode([int(i)]), float(v))
                    for v, i in zip(top.values, top.indices, strict=True)
                ]
                for _, _, top in steps
            ],
            "finish_reason": "stop"
            if steps and steps[-1][0] == self.tokenizer.eos_token_id
            else "length",
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(steps)},
            "x_gatelab": {"flops": flops, "compute_s": seconds, "n_layers": self.n_layers},
        }


def load_served_models(
    names: list[str], device: str | torch.device = "cpu", smollm2_dir: str | None = None
) -> dict[str, ServedModel]:
    """Build every named variant, loading each base model once (see :func:`load_base`)."""
    specs = {name: parse_model_name(name) for name in names}
    bases: dict[str, tuple[Any, nn.Module]] = {}
    for spec in specs.values():
        if spec.base not in bases:
            tokenizer, model = load_base(spec.base, smollm2_dir)
            bases[spec.base] = (tokenizer, model.to(device))
    return {name: ServedModel(name, *bases[spec.base]) for name, spec in specs.items()}
