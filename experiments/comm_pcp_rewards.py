r"""Is Predator-Capture-Prey (10x10) learned in the table's 200 updates, with either reward rule?

``gatelab reproduce comm`` trains Predator-Capture-Prey (3 perception and 2 blind capture
agents, 10x10, vision 1, limit 40, with ``--memory``) for 200 updates of 64 episodes. Its reward
is shared: every agent pays -0.05 per step until both capture agents have captured, so a single
capture changes no agent's reward unless it ends the episode. The other rule screened here,
``per_capture``, is Predator-Prey's: a capture agent that has captured stops paying, which gives
each capture agent a signal of its own. ``commformer`` (S = 0.4) on the screening seeds 0 and 1
(the table's seeds are 10..19), one fresh process per run, each evaluated on 200 episodes as
``compare`` does (seed 10000 + training seed). Prints training success every 20 updates and
the evaluation; writes ``<out>/results.json``. About 7 min of CPU per run. Run:

    PYTHONPATH=src .venv/bin/python experiments/comm_pcp_rewards.py [--rules shared per_capture] \
        [--seeds 0 1] [--jobs 2] [--out runs/comm/pcp_rewards]
"""

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

RULES = ("shared", "per_capture")


def per_capture(shared_step):
    """``shared_step`` with Predator-Prey's reward: a captured capture agent stops paying."""
    from gatelab.comm.envs.predator_prey import STEP_PENALTY

    def step(env, actions):
        live = ~env.done  # (B,) before the step
        out = shared_step(env, actions)  # moves, registers captures, ends episodes
        reward = np.where(env.reached, 0.0, STEP_PENALTY) * live[:, None]  # (B, A)
        return out._replace(reward=reward.astype(np.float32))

    return step


def child(rule: str, seed: int) -> dict:
    """Train and evaluate one run in this process."""
    import torch

    from gatelab.comm.compare import variant_config
    from gatelab.comm.envs.predator_prey import PredatorCapturePrey
    from gatelab.comm.eval import evaluate
    from gatelab.comm.reproduce import COMM_BUDGET, configs
    from gatelab.comm.train import train

    if rule == "per_capture":
        PredatorCapturePrey.step = per_capture(PredatorCapturePrey.step)
    torch.set_num_threads(1)
    cfg = dict(configs(10, 1))["predator_capture_prey-memory"]
    run_cfg = variant_config(cfg.base, "commformer", seed, 0.0, COMM_BUDGET)
    result = train(run_cfg)
    curve = [round(row["train/success"], 3) for row in result.history[19::20]]
    metrics = evaluate(result.model, run_cfg.env, 200, seed=10_000 + seed)
    return {"rule": rule, "seed": seed, "train_success_every_20": curve, **metrics}


def measure(rule: str, seed: int) -> dict:
    """One run in a fresh process (this checkout's ``src``), its result dict."""
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--child", rule, str(seed)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    """Screen the rules on the seeds, print and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/comm/pcp_rewards"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    if set(args.seeds) & set(range(10, 20)):
        parser.error("seeds 10..19 are the table's: screen on others")
    jobs = [(rule, seed) for rule in args.rules for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda job: measure(*job), jobs))
    for run in runs:
        print(
            f"{run['rule']:12s} seed {run['seed']}: eval success {run['success_rate']:.3f}, "
            f"training success every 20 updates {run['train_success_every_20']}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
