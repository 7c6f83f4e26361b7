"""lm-evaluation-harness's ``local-completions`` through ``gatelab edge serve`` against its own
``hf`` backend on the same weights: every option's log-likelihood must agree within 1e-3."""

import os

import pytest

from gatelab.edge.served import load_served_models
from gatelab.edge.server import BackgroundServer, build_app

evaluator = pytest.importorskip("lm_eval.evaluator", reason="lm_eval and its deps: make setup")
datasets = pytest.importorskip("datasets")

DOCS = [
    {"question": "What is the capital of France?", "choices": ["Berlin", "Paris", "Rome"],
     "answer": 1},
    {"question": "Which of these is an animal?", "choices": ["dog", "table", "seven"], "answer": 0},
    {"question": "What is the opposite of hot?", "choices": ["warm", "red", "cold"], "answer": 2},
    {"question": "What comes after Monday?", "choices": ["Tuesday", "Friday", "May"], "answer": 0},
    {"question": "How many legs has a spider?", "choices": ["six", "eight", "four"], "answer": 1},
]  # fmt: skip


def mc_task():
    """A small multiple-choice task built in memory (no download): lm-eval's own pipeline."""
    from lm_eval.api.task import ConfigurableTask

    def dataset(**_):
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(DOCS)})

    return ConfigurableTask(
        config={
            "task": "gatelab_mc",
            "custom_dataset": dataset,
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{answer}}",
            "metric_list": [{"metric": "acc"}],
        }
    )


def option_loglikelihoods(lm):
    from lm_eval.tasks import TaskManager

    out = evaluator.simple_evaluate(
        model=lm, tasks=[mc_task()], log_samples=True, bootstrap_iters=0,
        task_manager=TaskManager(include_defaults=False),  # not the 10 s index of every task
    )  # fmt: skip
    samples = sorted(out["samples"]["gatelab_mc"], key=lambda s: s["doc_id"])
    return [[float(r[0][0]) for r in s["resps"]] for s in samples]


def compare(name, tmp_path, batch_size):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    served = load_served_models([name])[name]
    served.tokenizer.save_pretrained(tmp_path)  # lm-eval's client tokenises with it
    hf = HFLM(pretrained=served.model, tokenizer=served.tokenizer, batch_size=1)
    want = option_loglikelihoods(hf)
    with BackgroundServer(build_app({name: served})) as server:
        api = LocalCompletionsAPI(
            base_url=server.url + "/v1/completions", model=name, tokenizer=str(tmp_path),
            tokenizer_backend="huggingface", batch_size=batch_size, max_retries=1,
        )  # fmt: skip
        got = option_loglikelihoods(api)
        assert server.app.state.engine.store.hits > 0  # options reused their context's states
    return got, want


def test_lm_eval_local_completions_equals_hf_backend_tiny(tmp_path):
    got, want = compare("tiny-random", tmp_path, batch_size=1)
    assert len(got) == len(DOCS) and all(len(g) == 3 for g in got)
    worst = max(
        abs(a - b) for gs, ws in zip(got, want, strict=True) for a, b in zip(gs, ws, strict=True)
    )
    assert worst < 1e-3, worst


@pytest.mark.slow
def test_lm_eval_local_completions_equals_hf_backend_smollm2(tmp_path, monkeypatch):
    """SmolLM2-135M from its GGUF (~30 s to load, ~1 min in all on 2 cores)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    got, want = compare("smollm2-135m", tmp_path, batch_size=4)
    worst = max(
        abs(a - b) for gs, ws in zip(got, want, strict=True) for a, b in zip(gs, ws, strict=True)
    )
    print(
        f"smollm2-135m: worst |local-completions - hf| = {worst:.2e} over {len(DOCS) * 3} options"
    )
    assert worst < 1e-3, worst
    assert (
        sum(max(range(3), key=g.__getitem__) == d["answer"] for g, d in zip(got, DOCS, strict=True))
        >= 3
    )
    assert os.environ["HF_HUB_OFFLINE"] == "1"
