"""gatelab edge route in front of real expert servers: gatelab's own (tiny random models) and
llama.cpp's ``llama-server`` (SmolLM2 GGUF; skipped where it is not built), with backends
detected (``auto``) and the official openai client.

References: each expert asked directly (:func:`gatelab.edge.client.ask_experts`, the real peer)
for the option distributions and modelled costs, and the top-weighted expert's own greedy reply
for free text.
"""

import asyncio

import httpx
import numpy as np
import openai
import pytest
import torch
from test_edge_llamacpp import _binary, _gguf

from gatelab.edge import router
from gatelab.edge.client import EdgeExpert, ask_experts
from gatelab.edge.costs import PROFILES
from gatelab.edge.data import format_prompt
from gatelab.edge.llama_server import LlamaServer
from gatelab.edge.model import EdgeGate, GateConfig
from gatelab.edge.route import create_route_app
from gatelab.edge.served import load_served_models
from gatelab.edge.server import BackgroundServer, build_app

QUESTION, OPTIONS = "What is the capital of France?", ["Paris", "London", "Berlin", "Rome"]
GATELAB_NAMES = ["tiny-random", "tiny-random-l1-fewshot"]


@pytest.fixture(scope="module")
def gatelab_server():
    with BackgroundServer(build_app(load_served_models(GATELAB_NAMES))) as server:
        yield server


def state_for(names: list[str], bias: list[float]) -> router.RouterState:
    """All experts in the best subset (quality grows with size); gate logits == ``bias``."""
    gate = EdgeGate(GateConfig(n_experts=len(names), d_hidden=4)).double().eval()
    with torch.no_grad():
        gate.out.bias.copy_(torch.tensor(bias))
    subsets = [[i for i in range(len(names)) if m >> i & 1] for m in range(1, 2 ** len(names))]
    quality = {",".join(map(str, s)): -1.0 / len(s) for s in subsets}
    table = {
        "energy_j": [0.1] * len(names),
        "delay_s": [0.01] * len(names),
        "base_quality": quality,
        "centroid": [1.0] + [0.0] * 383,
    }
    return router.RouterState(gate, names, len(names), 0.0, {"toy": table})


def fixed_embedding(text: str) -> np.ndarray:
    return np.eye(1, 384, dtype=np.float32)[0]


def check_routes(experts: list[EdgeExpert], bias: list[float]) -> None:
    """MC answer and costs vs each expert asked directly; free text vs the top expert's own."""
    names = [e.name for e in experts]
    app = create_route_app(state_for(names, bias), experts, embed=fixed_embedding)
    direct = asyncio.run(ask_experts(experts, QUESTION, OPTIONS))
    assert all(not isinstance(a, Exception) for a in direct.values()), direct
    with BackgroundServer(app) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(model="moe2", prompt=format_prompt(QUESTION, OPTIONS))
        ext = reply.x_gatelab
        w = np.exp(bias) / np.exp(bias).sum()
        mixed = sum(wi * np.array(direct[n].probs) for wi, n in zip(w, names, strict=True))
        assert ext["subset"] == names and ext["failed"] == {}
        assert [ext["weights"][n] for n in names] == pytest.approx(w.tolist())
        assert ext["probs"] == pytest.approx(mixed.tolist(), abs=1e-6)
        assert reply.choices[0].text == "ABCD"[int(np.argmax(mixed))]
        energy = sum(direct[n].modelled_energy_j for n in names)
        delay = max(direct[n].modelled_delay_s for n in names)
        assert ext["modelled_energy_j"] == pytest.approx(energy)
        assert ext["modelled_delay_s"] == pytest.approx(delay)

        top = experts[int(np.argmax(bias))]
        body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
        own = httpx.post(
            top.base_url + "/v1/completions", json=body | {"model": top.name}, timeout=60
        ).json()["choices"][0]["text"]
        chunks = list(client.completions.create(model="moe2", stream=True, **body))
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
        assert streamed == own and chunks[0].x_gatelab["expert"] == top.name


def test_route_over_gatelab_servers(gatelab_server):
    experts = [EdgeExpert(n, gatelab_server.url, PROFILES["rtx-4090"]) for n in GATELAB_NAMES]
    check_routes(experts, [0.3, -0.4])


@pytest.mark.slow  # starts llama-server; forced decoding of each option token by token
def test_route_over_llamacpp_and_gatelab(gatelab_server):
    with LlamaServer(_gguf(), binary=_binary(), threads=1) as llama:
        experts = [
            EdgeExpert("tiny-random", gatelab_server.url, PROFILES["rtx-4090"]),
            EdgeExpert("smollm2-135m", llama.url, PROFILES["jetson-agx-orin"]),
        ]
        check_routes(experts, [-0.5, 0.5])  # llama.cpp is the top-weighted expert
        assert experts[1].resolved_backend == "llamacpp"
