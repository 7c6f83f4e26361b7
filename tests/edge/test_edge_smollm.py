import asyncio
import math

import pytest

from gatelab.edge.client import EdgeExpert
from gatelab.edge.costs import PROFILES, llama_forward_flops
from gatelab.edge.served import load_served_models
from gatelab.edge.server import BackgroundServer, build_app


@pytest.mark.slow
def test_real_smollm2_variants_over_http(monkeypatch):
    """Loads the 135M GGUF (~20-30 s): the real experts answer and report their FLOPs."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = load_served_models(["smollm2-135m", "smollm2-135m-l16-fewshot"])
    with BackgroundServer(build_app(models)) as server:
        answers = {}
        for name in models:
            expert = EdgeExpert(name, server.url, PROFILES["jetson-agx-orin"], method="letters")
            answers[name] = asyncio.run(expert.answer("What is 2 + 3?", ["4", "5", "6", "7"]))
        scorer = EdgeExpert("smollm2-135m", server.url, PROFILES["cpu"])
        capital = asyncio.run(
            scorer.answer("What is the capital of France?", ["Berlin", "Paris", "Rome", "Madrid"])
        )
    full, short = answers["smollm2-135m"], answers["smollm2-135m-l16-fewshot"]
    config = models["smollm2-135m"].model.config
    assert config.num_hidden_layers == 30
    assert full.flops == llama_forward_flops(config, 30, full.prompt_tokens)
    assert short.flops == llama_forward_flops(config, 16, short.prompt_tokens)
    assert short.prompt_tokens > full.prompt_tokens  # the few-shot prefix
    assert full.letters_found >= 2  # the instruct model puts option letters in its top 20
    assert max(capital.probs) == capital.probs[1]  # continuation scoring knows this one
    assert all(n >= 1 for n in capital.option_tokens)
    for answer in answers.values():
        assert math.isclose(sum(answer.probs), 1.0)


@pytest.mark.slow
def test_real_gemma3_over_http(monkeypatch):
    """Loads Gemma 3 270M from its GGUF packages (~1-3 min): a second, different model family."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = load_served_models(["gemma3-270m", "gemma3-270m-l12"])
    config = models["gemma3-270m"].model.config
    assert (config.num_hidden_layers, config.hidden_size, config.head_dim) == (18, 640, 256)
    assert models["gemma3-270m"].bos_ids == [models["gemma3-270m"].tokenizer.bos_token_id]
    with BackgroundServer(build_app(models)) as server:
        scorer = EdgeExpert("gemma3-270m", server.url, PROFILES["cpu"])
        capital = asyncio.run(
            scorer.answer("What is the capital of France?", ["Berlin", "Paris", "Rome", "Madrid"])
        )
    assert max(range(4), key=lambda i: capital.probs[i]) == 1
    assert capital.flops > 0 and math.isclose(sum(capital.probs), 1.0)
