"""``router.ask`` when experts fail: each cause is named, and a subset that failed entirely is
planned again without its experts (same budgets) before giving up.

A hand-made router state of three experts: the best subset for the category is {0} alone, the
next best {1}, then {2}; experts answer through fake in-process servers (httpx.MockTransport),
and the question embedding is fixed (no MiniLM).
"""

import json

import httpx
import numpy as np
import pytest
import torch

from gatelab.edge import router
from gatelab.edge.client import EdgeExpert
from gatelab.edge.costs import PROFILES
from gatelab.edge.model import EdgeGate, GateConfig

NAMES = ["first", "second", "third"]
OPTIONS = ["a", "b", "c", "d"]


def _state():
    torch.manual_seed(0)
    gate = EdgeGate(GateConfig(n_experts=3, d_hidden=4)).double().eval()
    quality = {"0": -0.5, "1": -0.8, "2": -1.0, "0,1": -0.6, "0,2": -0.6, "1,2": -0.9}
    quality["0,1,2"] = -0.7  # alone, expert 0 is best: the hull picks {0}
    table = {
        "energy_j": [1.0, 1.0, 1.0],
        "delay_s": [0.01, 0.01, 0.01],
        "base_quality": quality,
        "centroid": [1.0] + [0.0] * 383,
    }
    return router.RouterState(gate, NAMES, 2, 0.0, {"toy": table})


def _alive(request):
    prompts = json.loads(request.content)["prompt"]
    choices = [
        {
            "index": i,
            "logprobs": {
                "tokens": [p],
                "text_offset": [len(p) - 2],
                "token_logprobs": [-1.0 - i],
            },
        }
        for i, p in enumerate(prompts)
    ]
    return httpx.Response(200, json={"choices": choices, "x_gatelab": {"flops": 1e9}})


def _refused(request):  # what httpx raises for a closed port
    refused = ConnectionRefusedError(111, "Connect call failed")
    raise httpx.ConnectError("All connection attempts failed", request=request) from refused


def _experts(alive):
    def expert(name):
        transport = httpx.MockTransport(_alive if name in alive else _refused)
        url = f"http://127.0.0.1:{8000 + NAMES.index(name)}"
        return EdgeExpert(
            name, url, PROFILES["cpu"], backend="gatelab", transport=transport, backoff_s=0.0
        )

    return [expert(n) for n in NAMES]


@pytest.fixture(autouse=True)
def fixed_embedding(monkeypatch):
    monkeypatch.setattr(router, "embed_texts", lambda texts: np.eye(1, 384, dtype=np.float32))


def test_a_failed_subset_is_planned_again_without_it():
    state = _state()
    assert router.plan_subset(state, "toy", 10.0, 10.0) == frozenset({0})
    assert router.plan_subset(state, "toy", 10.0, 10.0, frozenset({0})) == frozenset({1})
    result = router.ask("q?", OPTIONS, _experts({"second", "third"}), state, 10.0, 10.0, "toy")
    assert result.subset == ["second"] and result.answer in "ABCD"
    assert result.weights == {"second": pytest.approx(1.0)}
    assert result.per_expert["first"]["status"] == (
        "failed: expert first at http://127.0.0.1:8000: POST /v1/completions: connection "
        "refused (3 attempts)"
    )
    assert "first failed: planned again without them: second" in result.notes
    text = result.describe()
    assert "first: failed: expert first at http://127.0.0.1:8000" in text
    assert result.modelled_energy_j == pytest.approx(
        result.per_expert["second"]["modelled_energy_j"]
    )


def test_all_failing_names_every_cause():
    experts = _experts(set())[:2]  # "third" is not in the experts list at all
    with pytest.raises(ConnectionError) as error:
        router.ask("q?", OPTIONS, experts, _state(), 10.0, 10.0, "toy")
    message = str(error.value)
    assert message.startswith("all selected experts failed: expert first at http://127.0.0.1:8000")
    assert "expert second at http://127.0.0.1:8001: POST /v1/completions: connection" in message
    assert message.endswith("third is not in the experts list")


def test_budgets_still_hold_when_planning_again():
    state = _state()
    state.categories["toy"]["energy_j"] = [1.0, 5.0, 1.0]  # "second" no longer fits 2 J
    result = router.ask("q?", OPTIONS, _experts({"second", "third"}), state, 2.0, 10.0, "toy")
    assert result.subset == ["third"]


def test_selected_set_rule_runs_the_selected_set_without_failed_experts():
    state = _state()
    state.run_rule = "selected_set"  # the hull's best value is {0}'s; every superset ties it
    assert router.plan_subset(state, "toy", 10.0, 10.0) == frozenset({0, 1, 2})
    assert router.plan_subset(state, "toy", 10.0, 10.0, frozenset({0})) == frozenset({1, 2})
    pair = router.plan_subset(state, "toy", 2.0, 10.0)  # two of the 1 J experts fit
    assert len(pair) == 2 and 0 in pair
