"""Agent-steps per second of the gatelab.comm environments on one core (random actions).

Writes benchmarks/results/comm_env.json. Run: .venv/bin/python benchmarks/comm_env.py
"""

import json
import platform
import time
from pathlib import Path

import numpy as np

import gatelab
from gatelab.comm.envs import make_env
from gatelab.threads import torch_threads

CASES = [  # (env, n_envs, agents, grid)
    ("predator_prey", 1, 5, 10),
    ("predator_prey", 64, 5, 10),
    ("predator_prey", 512, 5, 10),
    ("predator_capture_prey", 64, 5, 10),
    ("simple_spread", 16, 3, 10),
    ("lbforaging", 16, 3, 8),
]
SEED = 0


def measure(name, n_envs, agents, grid, min_seconds=1.0):
    env = make_env(name, n_envs, agents, grid)
    rng = np.random.default_rng(SEED)
    steps, start, episode = 0, time.perf_counter(), 0
    while time.perf_counter() - start < min_seconds:
        env.reset(SEED + episode)
        for _ in range(env.episode_limit):
            env.step(rng.integers(0, env.n_actions, (n_envs, agents)))
            steps += 1
        episode += 1
    elapsed = time.perf_counter() - start
    env.close()
    return steps * n_envs * agents / elapsed


def main():
    rows = []
    for name, n_envs, agents, grid in CASES:
        rate = measure(name, n_envs, agents, grid)
        rows.append({"env": name, "n_envs": n_envs, "agents": agents, "grid": grid,
                     "agent_steps_per_s": round(rate)})  # fmt: skip
        print(f"| {name} | {n_envs} | {agents} | {grid} | {rate:,.0f} |")
    out = Path(__file__).parent / "results" / "comm_env.json"
    out.parent.mkdir(exist_ok=True)
    payload = {
        "benchmark": "comm_env",
        "seed": SEED,
        "gatelab": gatelab.__version__,
        "numpy": np.__version__,
        "hardware": f"{platform.processor() or platform.machine()}, {platform.platform()}",
        "rows": rows,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    with torch_threads(1):
        main()
