"""MoE² exact selector vs enumerating every feasible subset: quality calls and wall time.

Random monotone instances (weighted coverage quality, additive energy, max delay + aggregation)
at several pool sizes; both solvers must agree (exactness), and we report how many quality
evaluations each needs. Writes runs/bench/edge_selector.json.
"""

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

import gatelab
from gatelab.edge.select import brute_force_subset, delay_cost, energy_cost, select_subset

SEED = 0
SIZES = (4, 8, 12, 16)
INSTANCES = 20


def instance(rng, n):
    cover = rng.random((n, 8)) < 0.3
    value, bonus = rng.random(8), rng.random(n) * 0.01
    energy, delay = rng.random(n), rng.random(n)

    def quality(subset):
        items = sorted(subset)
        return float(value[cover[items].any(0)].sum() + bonus[items].sum()) if items else 0.0

    budgets = [rng.uniform(0.2 * n / 4, 0.3 * n), rng.uniform(0.4, 1.2)]
    return quality, [(energy_cost(energy), budgets[0]), (delay_cost(delay, 0.05), budgets[1])]


def main():
    rng = np.random.default_rng(SEED)
    rows = []
    for n in SIZES:
        calls = {"selector": 0, "enumeration": 0}
        seconds = {"selector": 0.0, "enumeration": 0.0}
        for _ in range(INSTANCES):
            quality, cons = instance(rng, n)
            start = time.perf_counter()
            fast = select_subset(n, quality, cons)
            seconds["selector"] += time.perf_counter() - start
            start = time.perf_counter()
            naive = brute_force_subset(n, quality, cons)
            seconds["enumeration"] += time.perf_counter() - start
            if abs(fast.quality - naive.quality) > 1e-12:
                raise RuntimeError(f"selector not exact at n={n}")
            calls["selector"] += fast.evaluations
            calls["enumeration"] += naive.evaluations
        rows.append(
            {
                "n_items": n,
                "instances": INSTANCES,
                "quality_calls": calls,
                "seconds": seconds,
                "call_ratio": calls["selector"] / calls["enumeration"],
            }
        )
        print(
            f"n={n:2d}: selector {calls['selector']:6d} calls, enumeration "
            f"{calls['enumeration']:7d} calls, ratio {rows[-1]['call_ratio']:.3f}, "
            f"time {seconds['selector']:.2f}s vs {seconds['enumeration']:.2f}s"
        )
    out = Path("runs/bench/edge_selector.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": {"sizes": SIZES, "instances": INSTANCES},
        "seed": SEED,
        "rows": rows,
        "gatelab": gatelab.__version__,
        "torch": torch.__version__,
        "hardware": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
