"""``gatelab comm``: train, evaluate and compare CommFormer and its baselines.

``--quick`` picks :meth:`TrainConfig.preset`'s quick settings; flags given explicitly always win.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gatelab import _cli
from gatelab.comm.config import NATIVE_ENVS, Env, Graph

app = typer.Typer(help="CommFormer: learned sparse communication graphs with temporal gates.")

Memory = Annotated[
    bool, typer.Option(help="Append each agent's previous action to its observation.")
]


@app.command()
def train(
    env: Annotated[
        str,
        typer.Option(
            help=f"{', '.join(NATIVE_ENVS)}, or a PettingZoo module with parallel_env() "
            "(e.g. mpe2.simple_spread_v3)."
        ),  # fmt: skip
    ] = "predator_prey",
    env_arg: Annotated[
        list[str] | None,
        typer.Option(help="KEY=VALUE for a module's parallel_env() (JSON values; repeatable)."),
    ] = None,
    agents: Annotated[int | None, typer.Option(help="Number of agents A (>= 2).")] = None,
    grid: Annotated[int | None, typer.Option(help="Grid side (grid worlds, lbforaging).")] = None,
    vision: Annotated[int | None, typer.Option(help="View radius (grid worlds).")] = None,
    episode_limit: Annotated[int | None, typer.Option(help="Step limit; 0 = env default.")] = None,
    sparsity: Annotated[float, typer.Option(help="S in [0, 1]; k = max(1, round(S(A-1))).")] = 0.4,
    graph: Annotated[Graph, typer.Option(help="Communication graph.")] = Graph.learned,
    temporal_gate: Annotated[bool, typer.Option(help="Per-agent listen gate.")] = False,
    comm_cost: Annotated[
        float, typer.Option(help="Straight-through gates' communication-cost coefficient.")
    ] = 0.0,
    comm_budget: Annotated[
        float, typer.Option(help="> 0: causal temporal gates meeting this comm rate.")
    ] = 0.0,
    memory: Memory = False,
    updates: Annotated[int | None, typer.Option(help="PPO updates.")] = None,
    n_envs: Annotated[int | None, typer.Option(help="Episodes per rollout.")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of everything.")] = 0,
    device: _cli.DeviceOption = "cpu",
    run_dir: Annotated[Path | None, typer.Option(help="Output folder.")] = None,
    fresh: Annotated[
        bool, typer.Option(help="Empty run-dir first (else a rerun of the same run resumes).")
    ] = False,
    quick: Annotated[
        bool, typer.Option(help="Smoke-run defaults for the flags not given (seconds).")
    ] = False,
) -> None:
    """Train one model; writes runs/comm/train/<name>/ (model.safetensors, config.json, plots)."""
    from gatelab.comm.config import TrainConfig
    from gatelab.comm.eval import evaluate
    from gatelab.comm.train import claim
    from gatelab.comm.train import train as run_train

    with _cli.user_errors():
        cfg = TrainConfig.from_flags(
            env, quick, _env_kwargs(env_arg or []), agents=agents, grid=grid, vision=vision,
            episode_limit=episode_limit, sparsity=sparsity, graph=graph,
            temporal_gate=temporal_gate, comm_cost=comm_cost, comm_budget=comm_budget,
            memory=memory, updates=updates, n_envs=n_envs, seed=seed, device=device,
        )  # fmt: skip
        flags = ("_tg" if temporal_gate else "") + ("_mem" if memory else "")
        name = cfg.env.name.replace(".", "_")
        tag = f"{name}_{graph.value}_s{sparsity:g}{flags}_seed{seed}"
        out = run_dir or Path("runs/comm/train") / tag
        claim(cfg, out, fresh)  # bad environments and occupied folders: one line, no bar
        with _cli.progress_bar("comm train", cfg.ppo.updates) as update:
            result = run_train(cfg, out, progress=update)
        metrics = evaluate(result.model, cfg.env, episodes=100, seed=seed)
    typer.echo(f"{out / 'model.safetensors'}: " + _fmt(metrics))


def _env_kwargs(pairs: list[str]) -> dict:
    """``["N=3", "continuous_actions=false"]`` -> ``{"N": 3, "continuous_actions": False}``."""
    import json

    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--env-arg must be KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text  # a plain string
    return out


@app.command("eval")
def eval_(
    checkpoint: Annotated[Path, typer.Option(help="A model.safetensors (carries its config).")],
    episodes: Annotated[int, typer.Option(min=1, help="Evaluation episodes.")] = 100,
    seed: Annotated[int, typer.Option(min=0, help="Evaluation seed.")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write metrics here.")] = None,
    greedy: Annotated[bool, typer.Option(help="Argmax actions instead of sampling.")] = False,
) -> None:
    """Evaluate with the deterministic graph and gates; print (and optionally save) metrics."""
    from gatelab.comm.eval import evaluate
    from gatelab.comm.train import load_model

    with _cli.user_errors():
        model, cfg = load_model(checkpoint)
        metrics = evaluate(model, cfg.env, episodes, seed, greedy=greedy)
    if json_path is not None:
        _cli.write_json(json_path, metrics)
    typer.echo(_fmt(metrics))


@app.command()
def compare(
    quick: Annotated[bool, typer.Option(help="1 seed, small settings (< 5 min).")] = False,
    env: Annotated[list[Env] | None, typer.Option(help="Environments (repeatable).")] = None,
    seeds: Annotated[
        int | None, typer.Option(min=1, max=1000, help="Seeds per variant [3; quick: 1].")
    ] = None,
    updates: Annotated[int, typer.Option(min=0, help="PPO updates per run; 0 = the preset's.")] = 0,
    jobs: Annotated[
        int, typer.Option(min=1, max=256, help="Runs trained in parallel processes.")
    ] = 1,
    max_minutes: Annotated[
        float, typer.Option(help="Time budget per run; 0 = none.", callback=_cli.finite_float(0))
    ] = 0.0,
    comm_cost: Annotated[
        float,
        typer.Option(
            help="Comm cost of commformer_tg's straight-through gates.",
            callback=_cli.finite_float(0),
        ),
    ] = 0.1,
    comm_budget: Annotated[
        float,
        typer.Option(
            help="> 0: commformer_tg meets this comm rate (causal gates).",
            callback=_cli.finite_float(0, 1),
        ),
    ] = 0.0,
    eval_only: Annotated[
        bool, typer.Option(help="Evaluate existing checkpoints, train nothing.")
    ] = False,
    memory: Memory = False,
    runs_dir: Annotated[Path, typer.Option(help="Root of the output.")] = Path("runs"),
) -> None:
    """Train all variants (full, commformer, commformer_tg, random, none) and write runs/comm/."""
    from gatelab.comm.compare import VARIANTS, compare_configs, results_markdown
    from gatelab.comm.compare import compare as run_compare

    with _cli.user_errors():
        configs = compare_configs(
            quick, env, seeds, updates, jobs, max_minutes, comm_cost, eval_only, comm_budget,
            memory,
        )  # fmt: skip
        total = sum(len(c.seeds) for c in configs) * len(VARIANTS)
        done = 0
        with _cli.progress_bar("comm compare", total) as update:
            for cfg in configs:
                summary = run_compare(
                    cfg, runs_dir / "comm", lambda d, _t, o=done: update(o + d, total)
                )
                done += len(cfg.seeds) * len(VARIANTS)
                typer.echo(results_markdown(summary) + "\n")


def _fmt(metrics: dict) -> str:
    keys = ("success_rate", "mean_steps", "mean_return", "comm_rate")
    return ", ".join(f"{k}={metrics[k]:.3f}" for k in keys)
