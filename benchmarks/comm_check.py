"""One CommFormer training run with chosen settings, evaluated as ``compare`` does.

The one-seed checks behind the README's "Choices behind these runs". Trains ``TrainConfig(**json)``
into ``runs/cpu/<name>/`` and prints the evaluation (200 episodes, seed 10000 + training seed, as
``compare``; an optional third argument replaces 10000, e.g. 20000 for screening on evaluation
episodes that the reported table does not use) and the training success of the last 10 updates.
A ``"_from": "runs/cpu/<run>"`` entry in the JSON copies that run's folder (its checkpoint,
e.g. one at the end of a shared gate warm-up) to ``runs/cpu/<name>/`` and resumes from it (resuming
continues exactly as the uninterrupted run would, tested). Run, e.g.:

    .venv/bin/python benchmarks/comm_check.py ann05 '{"updates": 100, "graph_anneal": 0.5}'
"""

import json
import shutil
import sys
from pathlib import Path

from gatelab.comm.eval import evaluate
from gatelab.comm.train import TrainConfig, train


def main() -> None:
    """Train and evaluate one run; see the module docstring."""
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: comm_check.py NAME JSON_TRAIN_CONFIG [EVAL_SEED_BASE]")
    name, settings = sys.argv[1], json.loads(sys.argv[2])
    base = int(sys.argv[3]) if len(sys.argv) == 4 else 10_000
    source = settings.pop("_from", None)
    cfg = TrainConfig(**settings)
    out = Path(f"runs/cpu/{name}")
    if source is not None:
        shutil.copytree(source, out)
    result = train(cfg, out, resume=source is not None)
    metrics = evaluate(result.model, {**cfg.__dict__}, 200, seed=base + cfg.seed)
    last = [round(h["train/success"], 2) for h in result.history[-10:]]
    print(name, json.dumps(metrics), last, flush=True)


if __name__ == "__main__":
    main()
