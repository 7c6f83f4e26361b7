"""``gatelab demo`` entry for CommFormer, and the settings of ``gatelab comm compare``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from gatelab.comm.compare import (
    VARIANTS,
    CompareConfig,
    budgeted_gates,
    compare,
    results_markdown,
)
from gatelab.comm.train import TrainConfig
from gatelab.report import DemoResult

# Full mode: the Predator-Prey setting (5 predators, 10x10, vision 1, limit 40) and MPE
# simple_spread with 3 agents. Quick mode: IC3Net's "easy" Predator-Prey (3 predators, 5x5,
# limit 20) and a tiny simple_spread, one seed, so every variant trains in seconds.
FULL = {
    "predator_prey": TrainConfig(env="predator_prey", agents=5, grid=10, vision=1, updates=300),
    "simple_spread": TrainConfig(env="simple_spread", agents=3, n_envs=16, updates=60),
}
QUICK = {
    "predator_prey": TrainConfig(
        env="predator_prey", agents=3, grid=5, episode_limit=20, n_envs=32, updates=25
    ),
    "simple_spread": TrainConfig(env="simple_spread", agents=3, n_envs=8, updates=6),
}


def compare_configs(
    quick: bool,
    envs: list[str] | None = None,
    seeds: int = 3,
    updates: int = 0,
    jobs: int = 1,
    max_minutes: float = 0.0,
    comm_cost: float = 0.1,
    eval_only: bool = False,
    comm_budget: float = 0.0,
    memory: bool = False,
    gate_estimator: str = "causal",
) -> list[CompareConfig]:
    """The :class:`CompareConfig` of each environment for ``gatelab comm compare``."""
    table = QUICK if quick else FULL
    envs = envs or list(table)
    unknown = [e for e in envs if e not in table]
    if unknown:
        raise ValueError(f"compare supports {', '.join(table)}; got {unknown[0]!r}")
    if not 0.0 <= comm_budget <= 1.0:
        raise ValueError(f"comm_budget must be in [0, 1], got {comm_budget}")
    if comm_cost < 0:
        raise ValueError(f"comm_cost must be >= 0, got {comm_cost}")
    if comm_budget > 0:
        budgeted_gates(gate_estimator)  # an unknown estimator: one-line error before any run
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    out = []
    for env in envs:
        base = table[env] if not updates else replace(table[env], updates=updates)
        base = replace(base, memory=memory)  # every variant alike
        out.append(
            CompareConfig(
                base=base,
                seeds=(0,) if quick else tuple(range(seeds)),
                eval_episodes=50 if quick else 200,
                jobs=jobs,
                max_minutes=max_minutes,
                comm_cost=comm_cost,
                comm_budget=comm_budget,
                gate_estimator=gate_estimator,
                eval_only=eval_only,
            )
        )
    return out


def run_demo(runs_dir: Path, quick: bool, progress=None) -> DemoResult:
    """Run the comparison (quick or full) and summarise it for the demo report."""
    configs = compare_configs(quick)
    total = sum(len(c.seeds) for c in configs) * len(VARIANTS)
    done, metrics, figures, text = 0, {}, [], []
    for cfg in configs:
        summary = compare(
            cfg, runs_dir / "comm", lambda d, _t, o=done: progress and progress(o + d, total)
        )
        done += len(cfg.seeds) * len(VARIANTS)
        for variant, row in summary["table"].items():
            metrics[f"{cfg.base.env}/{variant}/success_rate"] = row["success_rate"][0]
            metrics[f"{cfg.base.env}/{variant}/comm_rate"] = row["comm_rate"][0]
            metrics[f"{cfg.base.env}/{variant}/mean_return"] = row["mean_return"][0]
        figures += [Path(f) for f in summary["figures"]]
        text.append(results_markdown(summary))
    intro = (
        "CommFormer (learned graph, S = 0.4) against full, random-graph and no communication, "
        "with and without temporal gates; comm rate = active edges / A(A-1) per step."
    )
    return DemoResult("comm", "CommFormer learned communication", metrics, figures,
                      "\n\n".join([intro, *text]))  # fmt: skip
