"""Training throughput of gatelab.comm: agent-steps per second of process CPU time, one thread.

The workload is one training run of ``commformer`` and of ``commformer_tg`` (causal temporal
gates, budget 0.22) on Predator-Prey as in docs/comm.md (5 predators, 10x10, 64 episodes per
update, ``--memory``), with the graph's alpha steps and the gates on from the first update, so
every measured update does the full work. Update 1 (imports, first allocations) is not timed.
The policy is untrained, so every episode runs its 40 steps: the early-training regime.

``python benchmarks/comm_train.py`` (what ``make bench`` runs): this checkout, 4 updates, one
repetition; writes benchmarks/results/comm_train.json. ``--peer-src DIR`` also measures the
``src`` folder of another checkout (e.g. an old commit in a temporary worktree), each repetition
running the peer and this checkout back to back in fresh processes (the machine is shared: CPU
time, not wall clock, and interleaved repeats); the table gives the medians.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("commformer", "commformer_tg")
SRC = Path(__file__).resolve().parents[1] / "src"


def child(variant: str, updates: int) -> dict:
    """Train one run in this process; CPU seconds and agent-steps of updates 2..N."""
    from dataclasses import fields

    import torch

    from gatelab.comm.config import PPOConfig, TrainConfig
    from gatelab.comm.train import train

    ppo = {"updates": updates, "alpha_warmup_updates": 0}
    if "target_kl" in {f.name for f in fields(PPOConfig)}:
        ppo["target_kl"] = 0.0  # the same work per update as a trainer without a KL guard
    cfg = {"env": {"memory": True}, "ppo": ppo, "seed": 0, "torch_threads": 1}
    if variant == "commformer_tg":
        cfg["model"] = {"temporal_gate": True}
        cfg["gate"] = {"comm_budget": 0.22, "budget_lr": 0.2, "warmup": 0.0, "temp_min": 0.1}
    ticks = []
    torch.set_num_threads(1)
    result = train(
        TrainConfig.from_dict(cfg), progress=lambda d, t: ticks.append(time.process_time())
    )
    steps = [row["agent_steps"] for row in result.history]
    return {"cpu_s": ticks[-1] - ticks[0], "agent_steps": steps[-1] - steps[0]}


def measure(src: Path, variant: str, updates: int) -> float:
    """Agent-steps per CPU second of one fresh process importing gatelab from ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--child", variant, "--updates", str(updates)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    run = json.loads(out.strip().splitlines()[-1])
    return run["agent_steps"] / run["cpu_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=4, help="updates per run (first untimed)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--peer-src", type=Path, default=None, help="another checkout's src/")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results/comm_train.json"
    )
    parser.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.updates)))
        return
    if args.updates < 2:
        parser.error("--updates must be >= 2 (update 1 is not timed)")
    sources = {"peer": args.peer_src, "gatelab": SRC} if args.peer_src else {"gatelab": SRC}
    rates = {name: {v: [] for v in VARIANTS} for name in sources}
    for _ in range(args.repeats):
        for variant in VARIANTS:
            for name, src in sources.items():
                rates[name][variant].append(measure(src, variant, args.updates))
    print("| variant | " + " | ".join(f"{n} agent-steps/s" for n in sources) + " | ratio |")
    print("|---|" + "---|" * (len(sources) + 1))
    rows = []
    for variant in VARIANTS:
        med = {n: statistics.median(rates[n][variant]) for n in sources}
        ratio = med["gatelab"] / med["peer"] if "peer" in med else 1.0
        cells = " | ".join(f"{med[n]:,.0f}" for n in sources)
        print(f"| {variant} | {cells} | {ratio:.2f} |")
        rows.append({"variant": variant, "rates": rates_of(rates, variant), "ratio": ratio})
    payload = {
        "benchmark": "comm_train",
        "config": {
            "updates": args.updates,
            "repeats": args.repeats,
            "peer_src": str(args.peer_src),
        },
        "seed": 0,
        "hardware": f"{platform.processor() or platform.machine()}, {platform.platform()}",
        "python": platform.python_version(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")


def rates_of(rates: dict, variant: str) -> dict:
    """Every repetition's rate of ``variant``, per source."""
    return {name: [round(r) for r in per[variant]] for name, per in rates.items()}


if __name__ == "__main__":
    main()
