import json
from pathlib import Path

import pytest
import torch
from tokenizers import processors

from gatelab.edge.collect import DEFAULT_POOL, SHIPPED_QUICK_CACHE, read_cache, seed_from_shipped
from gatelab.edge.data import MCQuestion
from gatelab.edge.eval import SweepConfig, questions_for
from gatelab.edge.served import ServedModel
from gatelab.edge.weights import build_tiny_model


def _record(qid: str, expert: str, p: float, ok: bool = True) -> dict:
    return {"qid": qid, "expert": expert, "ok": ok, "probs": [p, 1 - p, 0.0, 0.0]}


def test_shipped_quick_cache_covers_the_quick_demo():
    """Every (quick question, demo expert) pair ships, so the quick demo serves no model."""
    shipped = read_cache(SHIPPED_QUICK_CACHE)
    pairs = {(q.qid, n) for q in questions_for(SweepConfig(quick=True)) for n, _ in DEFAULT_POOL}
    assert {k for k, r in shipped.items() if r["ok"]} >= pairs
    assert SHIPPED_QUICK_CACHE.stat().st_size < 1_000_000


def test_seeding_keeps_local_answers_and_only_adds_wanted_pairs(tmp_path: Path):
    name, other = DEFAULT_POOL[0][0], DEFAULT_POOL[1][0]
    shipped = tmp_path / "shipped.jsonl"
    rows = [
        _record("a", name, 0.9),
        _record("a", other, 0.8),
        _record("b", name, 0.7),
        _record("a", "not-in-pool", 0.6),
        _record("c", name, 0.5),  # not a wanted question
    ]
    shipped.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = tmp_path / "runs" / "answers.jsonl"
    cache.parent.mkdir()
    cache.write_text(json.dumps(_record("a", name, 0.1)) + "\n")  # a local answer
    wanted = [MCQuestion(q, "c", "c", "?", ("w", "x", "y", "z"), 0) for q in ("a", "b")]
    assert seed_from_shipped(cache, wanted, shipped) == 2
    got = read_cache(cache)
    assert got[("a", name)]["probs"][0] == 0.1  # local wins
    assert got[("a", other)]["probs"][0] == 0.8 and got[("b", name)]["probs"][0] == 0.7
    assert set(got) == {("a", name), ("a", other), ("b", name)}
    assert seed_from_shipped(cache, wanted, shipped) == 0  # idempotent
    assert seed_from_shipped(cache, wanted, tmp_path / "none.jsonl") == 0


def test_bos_adding_tokenizer_scores_with_bos_first():
    """A Gemma-like tokenizer that adds <bos>: echo scores every prompt token after <bos>."""
    tokenizer, model = build_tiny_model()
    bos = tokenizer.convert_tokens_to_ids("<unk>")  # any id works as a stand-in <bos>
    tokenizer.bos_token = "<unk>"
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<unk> $A", special_tokens=[("<unk>", bos)]
    )
    served = ServedModel("tiny-random", tokenizer, model.double())
    assert served.bos_ids == [bos]
    prompt = "Question: hi\nAnswer: yes"
    got = served.score([prompt])["choices"][0]["token_logprobs"]
    ids = [bos] + tokenizer(prompt, add_special_tokens=False).input_ids
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    want = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert got == pytest.approx(want, abs=1e-9) and len(got) == len(prompt)
    plain, _ = build_tiny_model()
    assert ServedModel("tiny-random", plain, model).bos_ids == []
