"""``gatelab comm``: train, evaluate and compare CommFormer and its baselines."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from gatelab import _cli

app = typer.Typer(help="CommFormer: learned sparse communication graphs with temporal gates.")

QUICK = {"updates": 20, "n_envs": 32}  # --quick: a smoke-sized run (seconds to a minute)


Memory = Annotated[
    bool, typer.Option(help="Append each agent's previous action to its observation.")
]
Estimator = Annotated[
    str, typer.Option(help="Budgeted gates' estimator: causal | hybrid (with --comm-budget).")
]


@app.command()
def train(
    env: Annotated[
        str, typer.Option(help="predator_prey | predator_capture_prey | simple_spread | lbforaging")
    ] = "predator_prey",
    agents: Annotated[int, typer.Option(help="Number of agents A (>= 2).")] = 5,
    grid: Annotated[int, typer.Option(help="Grid side (grid worlds, lbforaging).")] = 10,
    vision: Annotated[int, typer.Option(help="View radius (grid worlds).")] = 1,
    episode_limit: Annotated[int, typer.Option(help="Step limit; 0 = env default.")] = 0,
    sparsity: Annotated[float, typer.Option(help="S in [0, 1]; k = max(1, round(S(A-1))).")] = 0.4,
    graph: Annotated[str, typer.Option(help="learned | random | full | none")] = "learned",
    temporal_gate: Annotated[bool, typer.Option(help="Per-agent listen gate.")] = False,
    comm_cost: Annotated[float, typer.Option(help="Communication-cost coefficient.")] = 0.0,
    comm_budget: Annotated[
        float, typer.Option(help="> 0: budgeted temporal gates meeting this comm rate.")
    ] = 0.0,
    memory: Memory = False,
    gate_estimator: Estimator = "causal",
    updates: Annotated[int, typer.Option(help="PPO updates.")] = 300,
    n_envs: Annotated[int, typer.Option(help="Episodes per rollout.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of everything.")] = 0,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    run_dir: Annotated[Path | None, typer.Option(help="Output folder.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from run-dir's checkpoint.")] = False,
    quick: Annotated[bool, typer.Option(help="A short smoke run.")] = False,
) -> None:
    """Train one model; writes runs/comm/train/<name>/ (model.safetensors, config.json, plots)."""
    from gatelab.comm.eval import evaluate
    from gatelab.comm.train import TrainConfig
    from gatelab.comm.train import train as run_train

    with _cli.user_errors():
        cfg = TrainConfig(
            env=env, agents=agents, grid=grid, vision=vision, episode_limit=episode_limit,
            graph=graph, sparsity=sparsity, temporal_gate=temporal_gate, comm_cost=comm_cost,
            updates=updates, n_envs=n_envs, seed=seed, device=device, memory=memory,
        )  # fmt: skip
        if comm_budget > 0:
            from gatelab.comm.compare import budgeted_gates

            gates = {**budgeted_gates(gate_estimator), "comm_cost": comm_cost}
            cfg = replace(cfg, **gates, comm_budget=comm_budget)
        if quick:
            cfg = replace(cfg, **QUICK)
        flags = ("_tg" if temporal_gate else "") + ("_mem" if memory else "")
        tag = f"{env}_a{agents}_{graph}_s{sparsity:g}{flags}_seed{seed}"
        out = run_dir or Path("runs/comm/train") / tag
        with _cli.progress_bar("comm train", cfg.updates) as update:
            result = run_train(cfg, out, progress=update, resume=resume)
        metrics = evaluate(result.model, {**cfg.__dict__}, episodes=100, seed=seed)
    typer.echo(f"{out / 'model.safetensors'}: " + _fmt(metrics))


@app.command("eval")
def eval_(
    checkpoint: Annotated[Path, typer.Option(help="A model.safetensors (config.json beside).")],
    episodes: Annotated[int, typer.Option(help="Evaluation episodes.")] = 100,
    seed: Annotated[int, typer.Option(help="Evaluation seed.")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write metrics here.")] = None,
    greedy: Annotated[bool, typer.Option(help="Argmax actions instead of sampling.")] = False,
) -> None:
    """Evaluate with the deterministic graph and gates; print (and optionally save) metrics."""
    from gatelab.comm.checkpoint import load_model
    from gatelab.comm.eval import evaluate

    with _cli.user_errors():
        model, train_cfg = load_model(checkpoint)
        metrics = evaluate(model, train_cfg, episodes, seed, greedy=greedy)
    if json_path is not None:
        _cli.write_json(json_path, metrics)
    typer.echo(_fmt(metrics))


@app.command()
def compare(
    quick: Annotated[bool, typer.Option(help="1 seed, small settings (< 5 min).")] = False,
    env: Annotated[list[str] | None, typer.Option(help="Environments (repeatable).")] = None,
    seeds: Annotated[int, typer.Option(help="Seeds per variant (full mode).")] = 3,
    updates: Annotated[int, typer.Option(help="PPO updates per run; 0 = default.")] = 0,
    jobs: Annotated[int, typer.Option(help="Runs trained in parallel processes.")] = 1,
    max_minutes: Annotated[float, typer.Option(help="Time budget per run; 0 = none.")] = 0.0,
    comm_cost: Annotated[float, typer.Option(help="Comm cost of commformer_tg.")] = 0.1,
    comm_budget: Annotated[
        float, typer.Option(help="> 0: commformer_tg meets this comm rate (budgeted gates).")
    ] = 0.0,
    eval_only: Annotated[
        bool, typer.Option(help="Evaluate existing checkpoints, train nothing.")
    ] = False,
    memory: Memory = False,
    gate_estimator: Estimator = "causal",
    runs_dir: Annotated[Path, typer.Option(help="Root of the output.")] = Path("runs"),
) -> None:
    """Train all variants (full, commformer, commformer_tg, random, none) and write runs/comm/."""
    from gatelab.comm.compare import compare as run_compare
    from gatelab.comm.compare import results_markdown
    from gatelab.comm.demo import compare_configs

    with _cli.user_errors():
        configs = compare_configs(
            quick, env, seeds, updates, jobs, max_minutes, comm_cost, eval_only, comm_budget,
            memory, gate_estimator,
        )  # fmt: skip
        total = sum(len(c.seeds) for c in configs) * 5
        done = 0
        with _cli.progress_bar("comm compare", total) as update:
            for cfg in configs:
                summary = run_compare(
                    cfg, runs_dir / "comm", lambda d, _t, o=done: update(o + d, total)
                )
                done += len(cfg.seeds) * 5
                typer.echo(results_markdown(summary) + "\n")


def _fmt(metrics: dict) -> str:
    keys = ("success_rate", "mean_steps", "mean_return", "comm_rate")
    return ", ".join(f"{k}={metrics[k]:.3f}" for k in keys)
