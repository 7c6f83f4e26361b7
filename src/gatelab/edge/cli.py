"""``gatelab edge ...``: serve experts, collect answers, sweep budgets, ask live questions."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from gatelab import _cli

app = typer.Typer(help="MoE²: gated collaboration of edge LLM servers under energy/delay budgets.")


@app.command()
def serve(
    model: Annotated[
        list[str],
        typer.Option(help="Model variant to serve (repeatable), e.g. smollm2-135m-l20-fewshot."),
    ],
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 1,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
) -> None:
    """Run an OpenAI-compatible server: /v1/models, /v1/completions, /v1/chat/completions."""
    import torch
    import uvicorn

    from gatelab.edge.server import build_app
    from gatelab.edge.serving import load_served_models

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with _cli.user_errors():
        if not 0 < port < 65536:
            raise ValueError(f"--port must be in [1, 65535], got {port}")
        torch.set_num_threads(threads)
        models = load_served_models(model, device, os.environ.get("GATELAB_SMOLLM2_DIR"))
    _cli.stderr().print(f"serving {', '.join(models)} on http://{host}:{port}")
    uvicorn.run(build_app(models), host=host, port=port, log_level="warning")


@app.command()
def collect(
    cache: Annotated[Path, typer.Option(help="JSONL answer cache (appended; resumable).")] = Path(
        "runs/edge/answers.jsonl"
    ),
    experts: Annotated[
        Path | None, typer.Option(help="experts.yaml; default: serve the demo pool locally.")
    ] = None,
    quick: Annotated[bool, typer.Option(help="A small subset of questions.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the generated suite.")] = 0,
) -> None:
    """Ask every expert every question once over HTTP and cache distributions, delays, tokens."""
    from gatelab.edge import collect as collect_lib
    from gatelab.edge.eval import SweepConfig, questions_for

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with _cli.user_errors():
        cfg = SweepConfig(quick=quick, seed=seed)
        questions = questions_for(cfg)
        servers, pool = [], collect_lib.load_experts(experts) if experts else None
        if pool is None:
            servers, pool = collect_lib.start_local_pool()
        try:
            with _cli.progress_bar("collect", total=len(questions)) as update:
                counts = collect_lib.collect(pool, questions, cache, update)
        finally:
            for server in servers:
                server.stop()
    typer.echo(json.dumps({"cache": str(cache), "questions": len(questions), **counts}))
