"""``gatelab moe ...``: train the SparseMoE-vs-dense language models and evaluate checkpoints."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from gatelab import _cli


class RouterChoice(StrEnum):
    """The routing rules of :class:`gatelab.moe.SparseMoE`."""

    softmax = "softmax"
    noisy = "noisy"
    sigmoid = "sigmoid"
    expert_choice = "expert_choice"


app = typer.Typer(
    help="Sparse top-K mixture-of-experts layer: training demo and evaluation.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.command()
def train(
    quick: Annotated[
        bool, typer.Option(help="Small run: 600 steps per arm, about 1 min on 1 thread.")
    ] = False,
    steps: Annotated[int | None, typer.Option(help="Optimiser steps (default by --quick).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for weights and batches.")] = 0,
    device: _cli.DeviceOption = "cpu",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default by --quick).")] = (
        None
    ),
    n_experts: Annotated[int | None, typer.Option(help="Experts per MoE layer.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Experts per token.")] = None,
    router: Annotated[RouterChoice, typer.Option(help="SparseMoE routing rule.")] = (
        RouterChoice.softmax
    ),
    corpus_dir: Annotated[
        Path | None, typer.Option(help="Folder of .py files (default: the stdlib).")
    ] = None,
    run_dir: Annotated[
        Path, typer.Option(help="Output folder; a rerun resumes the run it holds.")
    ] = Path("runs/moe-train"),
    fresh: Annotated[
        bool, typer.Option(help="Delete what --run-dir holds and start over.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
) -> None:
    """Train a SparseMoE LM and a dense LM with equal active parameters; compare held-out loss.

    ``--quick`` picks the defaults of the options left out; an option given explicitly wins.
    """
    import dataclasses

    from gatelab.moe.train import quick_configs, train_pair

    with _cli.user_errors():
        model_cfg, train_cfg = quick_configs(quick)
        overrides = {"n_experts": n_experts, "top_k": top_k, "router": router.value}
        model_cfg = dataclasses.replace(
            model_cfg, **{k: v for k, v in overrides.items() if v is not None}
        )
        train_cfg = dataclasses.replace(
            train_cfg,
            seed=seed,
            device=device,
            corpus_dir=str(corpus_dir) if corpus_dir else None,
            **({"steps": steps} if steps is not None else {}),
            **({"threads": threads} if threads is not None else {}),
        )
        if corpus_dir is not None and not corpus_dir.is_dir():
            raise FileNotFoundError(f"--corpus-dir {corpus_dir} is not a directory")
        with _cli.progress_bar("moe train (moe, then dense)", 2 * train_cfg.steps) as update:
            result = train_pair(model_cfg, train_cfg, run_dir, update, fresh=fresh)
    summary = {arm: _headline(result[arm]) for arm in ("moe", "dense")}
    summary["step_time_ratio"] = result["step_time_ratio"]
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for arm in ("moe", "dense"):
        typer.echo(f"{arm:5s} " + "  ".join(f"{k}={v}" for k, v in summary[arm].items()))
    if result["step_time_ratio"] is not None:
        typer.echo(f"MoE step / dense step (CPU time): {result['step_time_ratio']:.2f}")
    typer.echo(f"figures: {', '.join(str(f) for f in result['figures'])}")


@app.command("eval")
def evaluate(
    run_dir: Annotated[Path, typer.Option(help="A folder written by `gatelab moe train`.")] = Path(
        "runs/moe-train"
    ),
) -> None:
    """Re-evaluate the saved MoE and dense checkpoints on the held-out files."""
    from gatelab.moe.eval import evaluate_checkpoint

    with _cli.user_errors():
        for arm in ("moe", "dense"):
            metrics = evaluate_checkpoint(run_dir / arm)
            typer.echo(f"{arm:5s} " + "  ".join(f"{k}={v}" for k, v in _headline(metrics).items()))


def _headline(metrics: dict) -> dict:
    keys = (
        "eval/loss", "eval/bits_per_byte", "params/active", "params/total", "perf/tokens_per_s",
        "perf/step_ms", "perf/step_cpu_ms",
    )  # fmt: skip
    return {k: round(metrics[k], 4) for k in keys if k in metrics}
