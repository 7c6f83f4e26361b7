r"""Per-expert temperature scaling of the option distributions before the gate mixes them.

A mixture of miscalibrated distributions weighs a confident wrong expert too much. This lab
script fits one temperature per expert on the *train* split (grid search of the expert's own
NLL of ``softmax(log p / T)``; Guo et al. 2017, arXiv:1706.04599), rescales every cached
distribution with it (argmaxes, hence every single-expert answer, are unchanged) and runs the
usual sweep on the full set, printing the temperatures and the AIQ of every method. Run:

    PYTHONPATH=src .venv/bin/python experiments/edge_expert_temperature.py [--out runs/edge/temp]
"""

import argparse
import json
from pathlib import Path

import numpy as np

import gatelab.edge.sweep as sweep
from gatelab.edge.collect import SHIPPED_FULL_CACHE
from gatelab.edge.eval import SweepConfig, build_pool

GRID = np.geomspace(0.02, 5.0, 200)  # temperatures tried


def fit_temperatures(probs, available, answer, rows) -> np.ndarray:
    """One temperature per expert ``(E,)``: least NLL of the rescaled distribution on ``rows``."""
    temps = np.ones(probs.shape[1])
    for e in range(probs.shape[1]):
        use = rows & available[:, e]
        logp = np.log(np.clip(probs[use, e], 1e-12, None))  # (N, C)
        gold = answer[use]
        nll = []
        for t in GRID:
            z = logp / t
            z = z - z.max(1, keepdims=True)
            log_norm = np.log(np.exp(z).sum(1))
            nll.append(float((log_norm - z[np.arange(len(gold)), gold]).mean()))
        temps[e] = GRID[int(np.argmin(nll))]
    return temps


def main() -> None:
    """Fit, rescale, sweep; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/edge/temp"))
    args = parser.parse_args()

    def calibrated_pool(cfg, cache, out_dir):
        pool = build_pool(cfg, cache, out_dir)
        t = pool.table
        temps = fit_temperatures(t.probs, t.available, t.answer, pool.split == "train")
        print("temperatures", dict(zip(t.experts, np.round(temps, 2).tolist(), strict=True)))
        z = np.log(np.clip(t.probs, 1e-12, None)) / temps[None, :, None]
        p = np.exp(z - z.max(-1, keepdims=True))
        t.probs[:] = np.where(t.available[..., None], p / p.sum(-1, keepdims=True), t.probs)
        return pool

    sweep.build_pool = calibrated_pool  # the sweep as usual, on rescaled distributions
    summary = sweep.run_sweep(SweepConfig(quick=False), SHIPPED_FULL_CACHE, args.out)
    print(json.dumps({k: summary[k] for k in ("aiq", "run_rule")}, indent=1))


if __name__ == "__main__":
    main()
