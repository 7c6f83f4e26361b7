"""``edge collect --in-process`` against the real peer: the same questions asked over HTTP of
gatelab's server (tiny random models) and scored in process give the same records; the option
sums also match a naive float64 full-sequence forward, and a rerun asks only missing pairs."""

import copy

import pytest
import torch

from gatelab.edge.client import EdgeExpert
from gatelab.edge.collect import InProcessExpert, collect, read_cache
from gatelab.edge.costs import PROFILES
from gatelab.edge.data import format_cloze, generate_suite
from gatelab.edge.served import load_served_models
from gatelab.edge.server import BackgroundServer, build_app

NAMES = ["tiny-random", "tiny-random-chat", "tiny-random-l1-fewshot"]
QUESTIONS = generate_suite(1, seed=3)  # five short questions, one per generated category
SAME = ("prompt_tokens", "completion_tokens", "flops", "modelled_delay_s", "modelled_energy_j",
        "method", "letters_found", "option_tokens", "backend", "ok")  # fmt: skip


@pytest.fixture(scope="module")
def models():
    return load_served_models(NAMES, int4_decode=False)


def _in_process(models):
    return [InProcessExpert(models[n], PROFILES["cpu"]) for n in NAMES]


def test_in_process_records_equal_the_http_path(models, tmp_path):
    with BackgroundServer(build_app(models)) as server:
        http = [EdgeExpert(n, server.url, PROFILES["cpu"], backend="gatelab") for n in NAMES]
        assert collect(http, QUESTIONS, tmp_path / "http.jsonl")["ok"] == 15
    assert collect(_in_process(models), QUESTIONS, tmp_path / "local.jsonl")["ok"] == 15
    over_http, local = read_cache(tmp_path / "http.jsonl"), read_cache(tmp_path / "local.jsonl")
    assert over_http.keys() == local.keys() and len(local) == 15
    for key, want in over_http.items():
        got = local[key]
        assert set(got) == set(want)  # the same fields
        assert {k: got[k] for k in SAME} == {k: want[k] for k in SAME}, key
        assert got["probs"] == pytest.approx(want["probs"], abs=1e-6), key
        assert got["option_logprobs"] == pytest.approx(want["option_logprobs"], abs=1e-5), key


def test_option_sums_match_a_naive_float64_forward(models):
    """Zero-shot tiny-random: sum of log p(option token | everything before), whole sequence."""
    served = models["tiny-random"]
    reference = copy.deepcopy(served.model).double()
    expert = InProcessExpert(served, PROFILES["cpu"])
    for q in QUESTIONS:
        context = format_cloze(q.question)
        prompts = [f"{context} {o}" for o in q.options]
        sums, counts, _, _ = expert.scores(context, prompts)
        for prompt, got, n in zip(prompts, sums, counts, strict=True):
            ids = served.encode(prompt)
            n_context = len(served.encode(context))
            with torch.no_grad():
                lp = torch.log_softmax(reference(torch.tensor([ids])).logits[0], -1)
            want = sum(float(lp[i - 1, ids[i]]) for i in range(n_context, len(ids)))
            assert n == len(ids) - n_context
            assert got == pytest.approx(want, abs=1e-4)


def test_rerun_asks_only_missing_pairs(models, tmp_path):
    cache = tmp_path / "answers.jsonl"
    experts = _in_process(models)
    assert collect(experts, QUESTIONS[:2], cache)["asked"] == 6
    assert collect(experts, QUESTIONS, cache)["asked"] == 9  # the three new questions only
    assert collect(experts, QUESTIONS, cache)["asked"] == 0
    lines = cache.read_text().splitlines()
    assert len(lines) == 15 and len(read_cache(cache)) == 15


def test_cli_in_process_refuses_other_pools_in_one_line():
    from typer.testing import CliRunner

    from gatelab.cli import app

    for extra in (["--method", "letters"], ["--experts", "experts.yaml"]):
        result = CliRunner().invoke(app, ["edge", "collect", "--in-process", *extra])
        assert result.exit_code == 2
        assert "--in-process scores the demo pool by continuation" in result.output
