r"""One CommFormer training run with chosen settings, evaluated as ``compare`` does.

The one-seed screening runs of docs/notes/comm.md. Trains ``TrainConfig.from_dict(json)`` (the
nested sections ``env``, ``model``, ``ppo``, ``gate``; omitted fields keep their defaults) into
``runs/check/<name>/`` and prints the evaluation (200 episodes, seed 10000 + training seed, as
``compare``; ``--eval-seed-base 20000`` screens on episodes the tables do not use) and the
training success of the last 10 updates. ``--from RUN`` copies that run folder (its checkpoint,
e.g. at the end of a shared gate warm-up) and resumes from it (resuming continues exactly).
Run, e.g.:

    PYTHONPATH=src .venv/bin/python experiments/comm_check.py causal22_s0 \
        '{"ppo": {"updates": 200}, "env": {"memory": true}, "model": {"temporal_gate": true},
          "gate": {"comm_budget": 0.22, "budget_lr": 0.2, "warmup": 0.3, "temp_min": 0.1}}'
"""

import argparse
import json
import shutil
from pathlib import Path

from gatelab.comm.config import TrainConfig
from gatelab.comm.eval import evaluate
from gatelab.comm.train import train
from gatelab.threads import torch_threads


def main() -> None:
    """Train and evaluate one run; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", default="check")
    parser.add_argument("config", nargs="?", default='{"ppo": {"updates": 20}}')
    parser.add_argument("--eval-seed-base", type=int, default=10_000)
    parser.add_argument("--from", dest="source", type=Path, default=None)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/check"))
    args = parser.parse_args()
    cfg = TrainConfig.from_dict(json.loads(args.config))
    out = args.runs_dir / args.name
    if args.source is not None:
        shutil.copytree(args.source, out)
    result = train(cfg, out)  # a copied run folder of the same config resumes
    metrics = evaluate(result.model, cfg.env, 200, seed=args.eval_seed_base + cfg.seed)
    last = [round(h["train/success"], 2) for h in result.history[-10:]]
    print(args.name, json.dumps(metrics), last, flush=True)


if __name__ == "__main__":
    with torch_threads(1):
        main()
