"""The client against the real llama.cpp ``llama-server`` (build 11434) on the SmolLM2 GGUF.

Found by ``GATELAB_LLAMA_SERVER``, ``./tools/llama-server/`` (``make llama-server``) or ``PATH``.
Without one, or when it cannot run on this CPU, every test here is skipped with that reason.
One server (one thread, 127.0.0.1, a free port) serves the module; the mixed-pool tests add
gatelab's server with the tiny random model.
"""

import asyncio
import functools
import json
import math

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from gatelab.cli import app
from gatelab.edge.client import EdgeExpert, ExpertAnswer, ExpertError, ask_experts
from gatelab.edge.collect import collect, read_cache
from gatelab.edge.costs import PROFILES
from gatelab.edge.data import MCQuestion, format_cloze
from gatelab.edge.eval import SweepConfig, questions_for
from gatelab.edge.experts import load_experts
from gatelab.edge.llama_server import (
    IllegalInstructionError,
    LlamaServer,
    find_llama_server,
    free_port,
    smollm2_gguf,
)

QUESTION = MCQuestion(
    "t/capital", "capitals", "capitals", "What is the capital of France?",
    ("Paris", "London", "Berlin", "Rome"), 0,
)  # fmt: skip


def _binary():
    found = find_llama_server()
    if found is None:
        pytest.skip("llama-server not found: run `make llama-server` or set GATELAB_LLAMA_SERVER")
    unusable = _unusable(found)
    if unusable:
        pytest.skip(unusable)
    return found


@functools.cache
def _unusable(binary) -> str | None:
    """Why ``binary`` cannot serve here (a build for another CPU dies of SIGILL), or None."""
    try:
        with LlamaServer(_gguf(), binary=binary, threads=1):
            return None
    except IllegalInstructionError as error:
        return str(error)


def _gguf():
    try:
        path = smollm2_gguf()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    if not path.is_file():
        pytest.skip(f"SmolLM2 GGUF not found: {path}")
    return path


@pytest.fixture(scope="module")
def llama():
    with LlamaServer(_gguf(), binary=_binary(), threads=1) as server:
        yield server


@pytest.fixture(scope="module")
def gatelab_server():
    from gatelab.edge.served import load_served_models
    from gatelab.edge.server import BackgroundServer, build_app

    with BackgroundServer(build_app(load_served_models(["tiny-random"]))) as server:
        yield server


def _experts_file(tmp_path, entries, name="experts.yaml"):
    path = tmp_path / name
    path.write_text(
        "".join(f"- {{name: {n}, base_url: '{url}', device: {d}}}\n" for n, url, d in entries)
    )
    return path


def _post(url, path, body):
    reply = httpx.post(url + path, json=body, timeout=30)
    reply.raise_for_status()
    return reply.json()


def test_minimal_entry_detects_llamacpp_and_scores_like_plain_generation(llama, tmp_path):
    (expert,) = load_experts(_experts_file(tmp_path, [("smollm2-135m", llama.url, "cpu")]))
    # the reference: llama.cpp's own greedy generation (no bias, no forcing) after the context
    context = format_cloze(QUESTION.question)
    ids = _post(llama.url, "/tokenize", {"content": context, "add_special": True})["tokens"]
    body = {"prompt": ids, "n_predict": 2, "n_probs": 1, "temperature": 0, "ignore_eos": True}
    plain = _post(llama.url, "/completion", body)  # (EOS would be the greedy first token)
    steps = plain["completion_probabilities"]
    greedy = "".join(bytes(s["bytes"]).decode() for s in steps)
    full = _post(llama.url, "/tokenize", {"content": context + greedy, "add_special": True})
    assert full["tokens"] == ids + [s["id"] for s in steps]  # the text tokenises back the same
    options = (greedy.strip(), "London", "Berlin", "Rome")
    answer = asyncio.run(expert.answer(QUESTION.question, options))
    assert answer.backend == "llamacpp" and expert.resolved_backend == "llamacpp"
    assert answer.option_logprobs[0] == pytest.approx(sum(s["logprob"] for s in steps), abs=1e-4)
    assert answer.option_tokens[0] == 2
    scores = np.array(answer.option_logprobs) / np.array(answer.option_tokens)  # per token
    assert answer.probs == pytest.approx(np.exp(scores) / np.exp(scores).sum())
    n_params = httpx.get(llama.url + "/v1/models").json()["data"][0]["meta"]["n_params"]
    assert answer.flops == 2 * n_params * answer.prompt_tokens  # modelled: 2 N per token


def test_a_byte_level_token_is_read_from_the_whole_distribution(llama):
    expert = EdgeExpert("smollm2-135m", llama.url, PROFILES["cpu"], backend="llamacpp")
    options = ("H ⊃ R", "H", "R", "I")  # " ⊃" is three byte-level tokens, the first withheld
    answer = asyncio.run(expert.answer("Symbolise: if H then R.", options))
    assert answer.option_tokens[0] == 5
    assert all(math.isfinite(v) and v < 0 for v in answer.option_logprobs)
    assert math.isclose(sum(answer.probs), 1.0)


def test_letters_read_the_chat_layout_of_v1_completions(llama):
    for api in ("completions", "chat"):
        expert = EdgeExpert("smollm2-135m", llama.url, PROFILES["cpu"], method="letters", api=api)
        answer = asyncio.run(expert.answer(QUESTION.question, QUESTION.options))
        assert answer.letters_found >= 1 and math.isclose(sum(answer.probs), 1.0)
        assert answer.completion_tokens == 1 and answer.prompt_tokens > 10


def test_mixed_pool_collects_and_names_a_killed_server(llama, gatelab_server, tmp_path):
    with LlamaServer(_gguf(), binary=_binary(), alias="smollm2-doomed", threads=1) as doomed:
        path = _experts_file(
            tmp_path,
            [
                ("tiny-random", gatelab_server.url, "rtx-4090"),
                ("smollm2-135m", llama.url, "jetson-agx-orin"),
                ("smollm2-doomed", doomed.url, "cpu"),
            ],
        )
        pool = load_experts(path)
        questions = questions_for(SweepConfig(quick=True))[:1]
        cache = tmp_path / "answers.jsonl"
        assert collect(pool, questions, cache)["missing"] == 0
        doomed.kill()
        doomed_url = doomed.url
    more = questions_for(SweepConfig(quick=True))[1:2]
    pool = load_experts(path)  # fresh clients: the dead one is detected again
    counts = collect(pool, more, cache)
    assert counts["missing"] == 1 and list(counts["errors"]) == ["smollm2-doomed"]
    records = read_cache(cache)
    assert {r["backend"] for r in records.values() if r["ok"]} == {"gatelab", "llamacpp"}
    failed = records[(more[0].qid, "smollm2-doomed")]
    assert failed["ok"] is False and failed["cause"] == "connect"
    assert f"expert smollm2-doomed at {doomed_url}" in failed["error"]
    assert "connection refused" in failed["error"]
    answers = asyncio.run(ask_experts(pool, QUESTION.question, QUESTION.options))
    assert isinstance(answers["tiny-random"], ExpertAnswer)
    assert isinstance(answers["smollm2-135m"], ExpertAnswer)
    assert isinstance(answers["smollm2-doomed"], ExpertError)


def _synthetic_sweep(out, names):
    """A sweep over synthetic answers of ``names`` (the live ask only needs the router)."""
    from gatelab.edge.sweep import run_sweep
    from gatelab.edge.train import TrainConfig

    cfg = SweepConfig(quick=True, n_budgets=3)
    rng = np.random.default_rng(0)
    emb = {}
    with (out / "answers.jsonl").open("w") as f:
        for q in questions_for(cfg):
            v = rng.normal(size=384)
            emb[q.qid] = v / np.linalg.norm(v)
            for j, name in enumerate(names):
                p = np.full(4, 0.1)
                p[q.answer if rng.random() < 0.7 else rng.integers(4)] = 0.7
                record = {
                    "qid": q.qid, "expert": name, "ok": True, "probs": (p / p.sum()).tolist(),
                    "letters_found": 4, "measured_s": 0.1, "prompt_tokens": 40,
                    "completion_tokens": 0, "flops": 1e9, "modelled_delay_s": 0.01 * (j + 1),
                    "modelled_energy_j": 0.1 * (j + 1),
                }  # fmt: skip
                f.write(json.dumps(record) + "\n")
    np.savez(out / "embeddings.npz", **emb)  # skips MiniLM while training
    run_sweep(cfg, out / "answers.jsonl", out, TrainConfig(max_steps=30, patience=10, d_hidden=8))


@pytest.mark.slow
def test_ask_names_the_dead_server_and_its_error(llama, gatelab_server, tmp_path):
    names = ["tiny-random", "smollm2-135m"]
    _synthetic_sweep(tmp_path, names)
    dead_port = free_port()
    mixed = _experts_file(
        tmp_path,
        [("tiny-random", gatelab_server.url, "rtx-4090"), ("smollm2-135m", llama.url, "cpu")],
        "mixed.yaml",
    )
    killed = _experts_file(
        tmp_path,
        [
            ("tiny-random", gatelab_server.url, "rtx-4090"),
            ("smollm2-135m", f"http://127.0.0.1:{dead_port}", "cpu"),
        ],
        "killed.yaml",
    )
    args = ["edge", "ask", QUESTION.question, *sum((["--option", o] for o in QUESTION.options), [])]
    args += ["--run-dir", str(tmp_path), "--energy-budget", "100", "--delay-budget", "100"]
    runner = CliRunner()
    both = runner.invoke(app, [*args, "--experts", str(mixed), "--json"])
    assert both.exit_code == 0, both.output
    result = json.loads(both.stdout)
    assert set(result["subset"]) == set(names), result
    assert all(v["status"] == "ok" for v in result["per_expert"].values())
    one = runner.invoke(app, [*args, "--experts", str(killed)])
    assert one.exit_code == 0, one.output
    assert f"smollm2-135m: failed: expert smollm2-135m at http://127.0.0.1:{dead_port}" in (
        one.output
    )
    assert "connection refused" in one.output and "answer: " in one.output
    alone = _experts_file(
        tmp_path, [("smollm2-135m", f"http://127.0.0.1:{dead_port}", "cpu")], "alone.yaml"
    )
    none = runner.invoke(app, [*args, "--experts", str(alone)])
    assert none.exit_code == 1 and "Traceback" not in none.output
    assert "all selected experts failed: " in none.output
    assert "tiny-random is not in the experts list" in none.output
    assert f"expert smollm2-135m at http://127.0.0.1:{dead_port}: GET /props: connection" in (
        none.output
    )


@pytest.mark.slow
def test_collect_sweep_ask_end_to_end_on_a_mixed_pool(tmp_path):
    """The CLI as a user runs it on gatelab + llama.cpp experts (quick set), then with the first
    expert of the chosen subset killed."""
    from gatelab.edge.served import load_served_models
    from gatelab.edge.server import BackgroundServer, build_app

    gguf, binary = _gguf(), _binary()
    with (
        BackgroundServer(build_app(load_served_models(["tiny-random"]))) as own,
        LlamaServer(gguf, binary=binary, alias="smollm2-135m", threads=1) as llama,
    ):
        servers = {"tiny-random": own, "smollm2-135m": llama}
        devices = {"tiny-random": "rtx-4090", "smollm2-135m": "jetson-agx-orin"}
        mixed = _experts_file(
            tmp_path, [(n, s.url, devices.get(n, "cpu")) for n, s in servers.items()], "mixed.yaml"
        )
        runner = CliRunner()
        cache, out = tmp_path / "answers.jsonl", tmp_path / "run"
        collected = runner.invoke(
            app, ["edge", "collect", "--quick", "--experts", str(mixed), "--cache", str(cache)]
        )
        assert collected.exit_code == 0, collected.output
        summary = json.loads(collected.stdout)
        assert summary["missing"] == 0 and summary["asked"] == 2 * summary["questions"]
        swept = runner.invoke(
            app, ["edge", "sweep", "--quick", "--cache", str(cache), "--out", str(out)]
        )
        assert swept.exit_code == 0, swept.output
        args = ["edge", "ask", QUESTION.question]
        args += sum((["--option", o] for o in QUESTION.options), [])
        args += ["--run-dir", str(out), "--experts", str(mixed), "--json"]
        alive = runner.invoke(app, args)
        assert alive.exit_code == 0, alive.output
        subset = json.loads(alive.stdout)["subset"]
        victim = subset[0]
        url = servers[victim].url
        if victim == "tiny-random":
            own.stop()
        else:
            servers[victim].kill()
        asked = runner.invoke(app, args)
    assert asked.exit_code == 0, asked.output  # the others answer (planned again if needed)
    result = json.loads(asked.stdout)
    assert result["answer"] in "ABCD" and result["weights"].get(victim, 0.0) == 0.0
    status = result["per_expert"][victim]["status"]
    assert status.startswith(f"failed: expert {victim} at {url}: GET /props: connection refused")
