"""``gatelab edge ...``: serve experts, collect answers, sweep budgets, ask live questions."""

from __future__ import annotations

import json
import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from gatelab import _cli

app = typer.Typer(
    help="MoE²: gated collaboration of edge LLM servers under energy/delay budgets.",
    pretty_exceptions_show_locals=False,
)


class Method(StrEnum):
    """How an expert's option distribution is read (see gatelab.edge.client)."""

    continuation = "continuation"  # score each option's text (echo)
    letters = "letters"  # top logprobs of one generated letter


AllowEnvOption = Annotated[
    list[str] | None,
    typer.Option(
        "--allow-env",
        help="An environment variable api_key_env may name besides GATELAB_* (repeatable).",
    ),
]


def default_out(out: Path | None, quick: bool) -> Path:
    """``--out`` as given, else ``runs/edge`` (``runs/edge/quick`` with ``--quick``)."""
    if out is not None:
        return out
    return Path("runs/edge/quick" if quick else "runs/edge")


@app.command()
def serve(
    model: Annotated[
        list[str],
        typer.Option(help="Model variant to serve (repeatable), e.g. smollm2-135m-l20-fewshot."),
    ],
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8000,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    threads: Annotated[int, typer.Option(help="torch CPU threads.", min=1, max=256)] = 1,
    device: _cli.DeviceOption = "cpu",
    api_key_env: Annotated[
        str | None,
        typer.Option(help="Environment variable holding the API key clients must send."),
    ] = None,
    max_batch: Annotated[
        int,
        typer.Option(help="Sequences decoded together (continuous batching).", min=1, max=1024),
    ] = 8,
    max_queue: Annotated[
        int, typer.Option(help="Requests waiting before new ones get 503.", min=1, max=100_000)
    ] = 32,
    timeout_s: Annotated[
        float,
        typer.Option(
            help="Per-request limit in seconds, queueing included.",
            callback=_cli.finite_float(0, low_open=True),
        ),
    ] = 120.0,
    max_body_bytes: Annotated[
        int, typer.Option(help="Largest request body accepted (413 above).", min=1, max=1 << 31)
    ] = 1 << 20,
    float32_decode: Annotated[
        bool,
        typer.Option(
            help="Decode in float32 like prefill (exact, ~2x slower) instead of running the "
            "GGUF's 4-bit blocks."
        ),
    ] = False,
) -> None:
    """Run an OpenAI-compatible server: /v1/models, /v1/completions, /v1/chat/completions."""
    import uvicorn

    from gatelab.edge.engine import Engine
    from gatelab.edge.served import load_served_models
    from gatelab.edge.server import build_app
    from gatelab.threads import torch_threads

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with _cli.user_errors():
        api_key = None
        if api_key_env is not None:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ValueError(f"--api-key-env: environment variable {api_key_env} is not set")
    with torch_threads(threads):
        with _cli.user_errors():
            models = load_served_models(model, device, int4_decode=not float32_decode)
        engine = Engine(max_batch=max_batch, max_queue=max_queue)
        app = build_app(models, engine, api_key, max_body_bytes, timeout_s)
        auth = f", API key from ${api_key_env}" if api_key_env else ""
        _cli.stderr().print(f"serving {', '.join(models)} on http://{host}:{port}{auth}")
        try:
            uvicorn.run(app, host=host, port=port, log_level="warning")
        finally:
            engine.stop()


@app.command()
def collect(
    cache: Annotated[
        Path,
        typer.Option(help="JSONL answer cache (appended; resumable).", callback=_cli.writable_file),
    ] = Path("runs/edge/answers.jsonl"),
    experts: Annotated[
        Path | None, typer.Option(help="experts.yaml; default: serve the demo pool locally.")
    ] = None,
    quick: Annotated[bool, typer.Option(help="A small subset of questions.")] = False,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the generated suite.")] = 0,
    method: Annotated[
        Method, typer.Option(help="Local pool: score the option text, or read the letters.")
    ] = Method.continuation,
    allow_env: AllowEnvOption = None,
    in_process: Annotated[
        bool,
        typer.Option(
            "--in-process",
            help="Score the demo pool in this process (no HTTP servers; continuation only).",
        ),
    ] = False,
    threads: Annotated[
        int, typer.Option(help="torch CPU threads (--in-process).", min=1, max=256)
    ] = 1,
) -> None:
    """Ask every expert every question once and cache distributions, delays, tokens.

    Experts are asked over HTTP (an experts.yaml, or the demo pool served locally) or, with
    ``--in-process``, the demo pool is scored directly (the same records, several times faster).
    Failed pairs are cached with their cause and asked again on the next run; the summary's
    ``errors`` gives each failing expert's last error.
    """
    from gatelab.edge import collect as collect_lib
    from gatelab.edge.eval import SweepConfig, questions_for
    from gatelab.edge.experts import load_experts

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gatelab.threads import torch_threads

    with _cli.user_errors(), torch_threads(threads):
        if in_process and (experts is not None or method != Method.continuation):
            raise ValueError(
                "--in-process scores the demo pool by continuation: drop --experts/--method"
            )
        cfg = SweepConfig(quick=quick, seed=seed)
        questions = questions_for(cfg)
        servers, pool = [], load_experts(experts, allow_env=allow_env or ()) if experts else None
        if in_process:
            pool = collect_lib.start_in_process_pool()
        elif pool is None:
            servers, pool = collect_lib.start_local_pool(method=method.value)
        try:
            with _cli.progress_bar("collect", total=len(questions)) as update:
                counts = collect_lib.collect(pool, questions, cache, update)
        finally:
            for server in servers:
                server.stop()
    typer.echo(json.dumps({"cache": str(cache), "questions": len(questions), **counts}))


@app.command()
def sweep(
    quick: Annotated[
        bool, typer.Option(help="Use the quick question subset (cached answers).")
    ] = False,
    cache: Annotated[Path, typer.Option(help="JSONL answer cache.")] = Path(
        "runs/edge/answers.jsonl"
    ),
    out: Annotated[
        Path | None,
        typer.Option(help="Output folder [default: runs/edge, quick: runs/edge/quick]."),
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed (splits, gate, random baseline).")] = 0,
    top_k: Annotated[int, typer.Option(help="Experts weighted per query inside a subset.")] = 2,
    n_budgets: Annotated[int, typer.Option(help="Budget grid points per axis.")] = 12,
) -> None:
    """Train the gate once on cached answers and sweep energy/delay budgets for all methods."""
    from gatelab.edge.eval import SweepConfig
    from gatelab.edge.sweep import run_sweep

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with _cli.user_errors():
        if not cache.exists():
            raise FileNotFoundError(f"answer cache not found: {cache} (run `gatelab edge collect`)")
        cfg = SweepConfig(quick=quick, seed=seed, top_k=top_k, n_budgets=n_budgets)
        out = default_out(out, quick)
        with _cli.progress_bar("sweep", total=2 * n_budgets) as update:
            summary = run_sweep(cfg, cache, out, progress=update)
    typer.echo(summary["table"])
    typer.echo(json.dumps({"aiq_energy": summary["aiq"]["energy"], "out": str(out)}, indent=2))


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question text.")],
    option: Annotated[
        list[str], typer.Option(help="An answer option (give exactly four, in order A-D).")
    ],
    energy_budget: Annotated[
        float, typer.Option(help="Energy budget per query, J (modelled).")
    ] = float("inf"),
    delay_budget: Annotated[
        float, typer.Option(help="Delay budget per query, s (modelled).")
    ] = float("inf"),
    experts: Annotated[
        Path | None, typer.Option(help="experts.yaml (default: demo pool on 127.0.0.1:8000).")
    ] = None,
    category: Annotated[
        str | None, typer.Option(help="Category (default: nearest centroid).")
    ] = None,
    run_dir: Annotated[Path, typer.Option(help="Folder written by `gatelab edge sweep`.")] = Path(
        "runs/edge"
    ),
    timeout_s: Annotated[
        float,
        typer.Option(
            help="Per-expert request timeout, s.", callback=_cli.finite_float(0, low_open=True)
        ),
    ] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    allow_env: AllowEnvOption = None,
) -> None:
    """Answer a question live with the budget-optimal subset of experts and the trained gate.

    An expert that fails is named with its cause and left out (the gate renormalises); if all
    selected experts fail it exits 1 naming each one's error.
    """
    from dataclasses import asdict

    from gatelab.edge.experts import experts_for
    from gatelab.edge.router import ask as ask_lib
    from gatelab.edge.router import load_router

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with _cli.user_errors():
        pool = experts_for(experts, timeout_s, allow_env=allow_env or ())  # checked first: cheap
        state = load_router(run_dir)
        result = ask_lib(question, option, pool, state, energy_budget, delay_budget, category)
    typer.echo(json.dumps(asdict(result), indent=2) if as_json else result.describe())


@app.command()
def route(
    run_dir: Annotated[
        Path, typer.Option("--run", "--run-dir", help="Folder written by `gatelab edge sweep`.")
    ] = Path("runs/edge"),
    experts: Annotated[
        Path | None, typer.Option(help="experts.yaml (default: demo pool on 127.0.0.1:8000).")
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8100,
    energy_budget: Annotated[
        float | None,
        typer.Option(
            help="Default energy budget per query, J (modelled); unbounded if not given.",
            callback=_cli.finite_float(0),
        ),
    ] = None,
    delay_budget: Annotated[
        float | None,
        typer.Option(
            help="Default delay budget per query, s (modelled); unbounded if not given.",
            callback=_cli.finite_float(0),
        ),
    ] = None,
    timeout_s: Annotated[
        float | None,
        typer.Option(
            help="Per-expert request timeout, s; default: each expert's own.",
            callback=_cli.finite_float(0, low_open=True),
        ),
    ] = None,
    max_in_flight: Annotated[
        int, typer.Option(help="Requests answered at once.", min=1, max=1024)
    ] = 16,
    max_queue: Annotated[
        int,
        typer.Option(
            help="Requests waiting beyond those before new ones get 503.", min=0, max=100_000
        ),
    ] = 64,
    api_key_env: Annotated[
        str | None,
        typer.Option(help="Environment variable holding the API key clients must send."),
    ] = None,
    threads: Annotated[
        int, typer.Option(help="torch CPU threads (gate, MiniLM).", min=1, max=256)
    ] = 1,
    allow_env: AllowEnvOption = None,
) -> None:
    """Serve the MoE² router as an OpenAI-compatible API (model "moe2"; see docs/edge.md).

    Multiple-choice requests get the gate-combined answer of the budget-optimal subset; free
    text is forwarded to its top-weighted expert. Per-request budgets go in `x_gatelab`.
    """
    import math

    import uvicorn

    from gatelab.edge.experts import experts_for
    from gatelab.edge.route import create_route_app
    from gatelab.edge.router import load_router
    from gatelab.threads import torch_threads

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with _cli.user_errors():
        api_key = None
        if api_key_env is not None:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ValueError(f"--api-key-env: environment variable {api_key_env} is not set")
        pool = experts_for(experts, timeout_s, allow_env=allow_env or ())
        state = load_router(run_dir)
        app = create_route_app(
            state,
            pool,
            math.inf if energy_budget is None else energy_budget,
            math.inf if delay_budget is None else delay_budget,
            max_in_flight,
            max_queue,
            api_key=api_key,
        )
    with torch_threads(threads):
        names = ", ".join(e.name for e in pool)
        _cli.stderr().print(f"routing over {names} on http://{host}:{port} (model moe2)")
        uvicorn.run(app, host=host, port=port, log_level="warning")
