r"""Does stepping alpha from theta's backward learn as well as a separate alpha pass?

The trainer of an older checkout (``--peer-src DIR``: its ``src`` folder) and this one train
``commformer`` and ``commformer_tg`` (causal gates, budget 0.22) on the reduced grid of
``gatelab reproduce comm --small`` (Predator-Prey, 3 predators, 5x5, limit 20, 50 updates of 32
episodes; memoryless, where communication matters there) on the *validation* seeds 0..9 (the
table's seeds are 10..19), one fresh process per run, and evaluate each run on 100 episodes as
``compare`` does. Prints mean success per trainer and variant with a bootstrap 95% interval of the
difference over seeds (paired by seed: same seed, same environment draws), and the mean CPU
seconds per run. Writes ``<out>/results.json``. About 25 s per run; 40 runs. Run:

    git worktree add /tmp/comm_old <old commit>
    PYTHONPATH=src .venv/bin/python experiments/comm_alpha_step.py --peer-src /tmp/comm_old/src \
        [--seeds 10] [--jobs 2] [--out runs/comm/alpha_step]
"""

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"
VARIANTS = ("commformer", "commformer_tg")


def child(variant: str, seed: int) -> dict:
    """Train and evaluate one run in this process (the trainer on ``sys.path``)."""
    import time

    import torch

    from gatelab.comm.compare import variant_config
    from gatelab.comm.eval import evaluate
    from gatelab.comm.reproduce import COMM_BUDGET, configs
    from gatelab.comm.train import train

    torch.set_num_threads(1)
    cfg = dict(configs(10, 1, small=True))["predator_prey-memoryless-small"]
    run_cfg = variant_config(cfg.base, variant, seed, 0.0, COMM_BUDGET)
    start = time.process_time()
    result = train(run_cfg)
    cpu_s = time.process_time() - start
    metrics = evaluate(result.model, run_cfg.env, 100, seed=10_000 + seed)
    return {"success": metrics["success_rate"], "comm_rate": metrics["comm_rate"], "cpu_s": cpu_s}


def run(src: Path, variant: str, seed: int) -> dict:
    """One run in a fresh process importing gatelab from ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--child", variant, "--seed", str(seed)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    """Both trainers, both variants, every seed; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-src", type=Path, help="the older checkout's src/")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/comm/alpha_step"))
    parser.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.seed)))
        return
    if args.peer_src is None:
        parser.error("--peer-src is required")
    sources = {"peer": args.peer_src, "this": SRC}
    jobs = [(s, v, seed) for v in VARIANTS for seed in range(args.seeds) for s in sources]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda j: run(sources[j[0]], j[1], j[2]), jobs))
    results = [
        {"source": s, "variant": v, "seed": seed, **r}
        for (s, v, seed), r in zip(jobs, done, strict=True)
    ]
    rng = np.random.default_rng(0)
    summary = {}
    for v in VARIANTS:
        rows = {s: [r for r in results if r["source"] == s and r["variant"] == v] for s in sources}
        success = {s: np.array([r["success"] for r in rows[s]]) for s in sources}
        diff = success["this"] - success["peer"]  # paired by seed
        boot = diff[rng.integers(0, len(diff), (10_000, len(diff)))].mean(1)
        summary[v] = {
            "mean_success": {s: float(x.mean()) for s, x in success.items()},
            "difference": [float(diff.mean()), *map(float, np.percentile(boot, [2.5, 97.5]))],
            "this_ahead_seeds": int((diff > 0).sum()),
            "mean_comm_rate": {s: float(np.mean([r["comm_rate"] for r in rows[s]])) for s in rows},
            "mean_cpu_s": {s: float(np.mean([r["cpu_s"] for r in rows[s]])) for s in rows},
        }
        m, d, cpu = (summary[v][k] for k in ("mean_success", "difference", "mean_cpu_s"))
        print(
            f"{v}: success peer {m['peer']:.3f}, this {m['this']:.3f}; this - peer "
            f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}] points "
            f"(ahead on {summary[v]['this_ahead_seeds']} of {len(diff)} seeds); CPU s per run "
            f"peer {cpu['peer']:.1f}, this {cpu['this']:.1f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"runs": results, "summary": summary}, indent=1)
    (args.out / "results.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
