r"""Which rules make Predator-Capture-Prey (10x10) learnable in the table's 200 updates?

``gatelab reproduce comm`` trains Predator-Capture-Prey (3 perception and 2 blind capture
agents, 10x10, vision 1, limit 40, with ``--memory``) for 200 updates of 64 episodes. Three rules
are screened, ``commformer`` (S = 0.4) on the screening seeds 0 and 1 (the table's seeds are
10..19), one fresh process per run, each evaluated on 200 episodes as ``compare`` does (seed
10000 + training seed):

* ``hetnet``: the environment's rules (HetNet's, :mod:`gatelab.comm.envs.predator_prey`): a
  perception agent stays on the prey once there and stops paying, a capture agent on the prey's
  cell can only capture, success is every agent done.
* ``shared``: the rules gatelab had before (written out below): perception agents never stop,
  only captures count, every agent pays -0.05 per step until both capture agents have captured.
* ``per_capture``: those rules with Predator-Prey's reward, a capture agent that has captured
  stops paying.

Prints training success every 20 updates and the evaluation; writes ``<out>/results.json``.
About 7 min of CPU per run. Run:

    PYTHONPATH=src .venv/bin/python experiments/comm_pcp_rules.py \
        [--rules hetnet shared per_capture] [--seeds 0 1] [--jobs 2] [--out runs/comm/pcp_rules]
"""

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

RULES = ("hetnet", "shared", "per_capture")


def simplified(per_capture: bool):
    """The step of gatelab's earlier rules (``per_capture``: a captured agent stops paying)."""
    from gatelab.comm.envs.base import Step
    from gatelab.comm.envs.predator_prey import CAPTURE, STEP_PENALTY

    def step(env, actions):
        actions = np.asarray(actions)
        live = ~env.done  # (B,)
        env._move(actions, env.reached | env.done[:, None])  # only captured agents are frozen
        on_prey = (env.pos == env.prey[:, None]).all(-1)  # (B, A)
        env.reached |= on_prey & (actions == CAPTURE) & env.is_capture & live[:, None]
        paying = ~env.reached if per_capture else np.ones_like(env.reached)
        reward = np.where(paying, STEP_PENALTY, 0.0) * live[:, None]  # (B, A)
        env.t += live
        env.success |= live & env.reached[:, env.is_capture].all(-1)
        env.done |= env.success | (env.t >= env.episode_limit)
        return Step(env.observe(), reward.astype(np.float32), env.done.copy(), env.success.copy())

    return step


def child(rule: str, seed: int) -> dict:
    """Train and evaluate one run in this process."""
    import torch

    from gatelab.comm.compare import variant_config
    from gatelab.comm.envs.predator_prey import PredatorCapturePrey
    from gatelab.comm.eval import evaluate
    from gatelab.comm.reproduce import COMM_BUDGET, configs
    from gatelab.comm.train import train

    if rule != "hetnet":
        PredatorCapturePrey.step = simplified(per_capture=rule == "per_capture")
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
    parser.add_argument("--out", type=Path, default=Path("runs/comm/pcp_rules"))
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
