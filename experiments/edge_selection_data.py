r"""Does MoE² gain on the best single expert when selection has three times the data?

The full set gives selection (gate training, early stopping, subset quality, run rule) 270
non-test questions. This lab script asks what more of them would buy, without collecting
anything: for a split seed, half of the test questions of every category (seeded) are set
aside, and two sweeps are scored on the *same* remaining half of the test split:

- ``base``: the set-aside questions are dropped (selection sees the usual 270 questions);
- ``more``: they join selection, 60% train and 40% validation (selection sees 270 + ~540).

Everything else is ``gatelab edge sweep`` on the shipped full cache (estimator and run rule
chosen on non-test folds as usual). Writes ``<out>/seed<s>/{base,more}/`` (sweep folders) and
``<out>/results.json``; prints one line per arm. About 4 min per sweep on one thread here. Run:

    PYTHONPATH=src .venv/bin/python experiments/edge_selection_data.py --seeds 0 1 2 \
        [--out runs/edge/selection_data]
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from gatelab.edge import eval as edge_eval
from gatelab.edge import sweep
from gatelab.edge.collect import SHIPPED_FULL_CACHE
from gatelab.edge.eval import Pool, SweepConfig
from gatelab.threads import torch_threads

build_pool = edge_eval.build_pool  # the real one; the sweep's is replaced per arm


def set_aside(pool: Pool, seed: int) -> np.ndarray:
    """Half of each category's test questions (seeded): the rows moved out of the test split."""
    rng = np.random.default_rng(seed)
    moved = np.zeros(len(pool.split), dtype=bool)
    for c in sorted(set(pool.category)):
        rows = np.flatnonzero((pool.category == c) & (pool.split == "test"))
        moved[rng.permutation(rows)[: len(rows) // 2]] = True
    return moved


def rows_of(pool: Pool, keep: np.ndarray) -> Pool:
    """The pool restricted to the rows ``keep`` (every per-question array of its table too)."""
    t, n = pool.table, len(keep)
    fields = {}
    for f in dataclasses.fields(t):
        value = getattr(t, f.name)
        if f.name == "qids":
            value = [q for q, k in zip(value, keep, strict=True) if k]
        elif isinstance(value, np.ndarray) and value.shape[:1] == (n,):
            value = value[keep]
        fields[f.name] = value
    questions = [q for q, k in zip(pool.questions, keep, strict=True) if k]
    return Pool(questions, type(t)(**fields), pool.x[keep], pool.split[keep], pool.category[keep])


def arm_pool(arm: str, seed: int):
    """A replacement for ``build_pool``: the set-aside rows dropped (base) or given to selection."""

    def build(cfg, cache, out_dir):
        pool = build_pool(cfg, cache, out_dir)
        moved = set_aside(pool, seed)
        if arm == "base":
            return rows_of(pool, ~moved)
        split = pool.split.copy()
        for c in sorted(set(pool.category)):
            rows = np.flatnonzero(moved & (pool.category == c))
            n_train = int(round(0.6 * len(rows)))
            split[rows[:n_train]], split[rows[n_train:]] = "train", "val"
        return Pool(pool.questions, pool.table, pool.x, split, pool.category)

    return build


@torch_threads(1)
def main() -> None:
    """Both arms for every seed; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=Path("runs/edge/selection_data"))
    args = parser.parse_args()
    results = []
    for seed in args.seeds:
        for arm in ("base", "more"):
            out = args.out / f"seed{seed}" / arm
            start = time.perf_counter()
            sweep.build_pool = arm_pool(arm, seed)
            s = sweep.run_sweep(SweepConfig(quick=False), SHIPPED_FULL_CACHE, out)
            diff = {
                axis: s["intervals"][axis]["difference"]["best_single"]["average"]
                for axis in ("energy", "delay")
            }
            row = {
                "seed": seed,
                "arm": arm,
                "n_test": s["n_test"],
                "run_rule": s["run_rule"]["chosen"],
                "aiq": s["aiq"],
                "gate_test_topk_accuracy": s["gate_test"][f"top{SweepConfig().top_k}"]["accuracy"],
                "moe2_minus_best_single": diff,
                "seconds": round(time.perf_counter() - start, 1),
            }
            results.append(row)
            e, d = diff["energy"], diff["delay"]
            print(
                f"seed {seed} {arm}: n_test {row['n_test']}, rule {row['run_rule']}, "
                f"MoE2 - best single energy {100 * e['mean']:+.1f} "
                f"[{100 * e['low']:+.1f}, {100 * e['high']:+.1f}], delay {100 * d['mean']:+.1f} "
                f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]; AIQ energy MoE2 "
                f"{s['aiq']['energy']['moe2']:.3f} best single "
                f"{s['aiq']['energy']['best_single']:.3f} greedy "
                f"{s['aiq']['energy']['greedy_per_joule']:.3f}; {row['seconds']:.0f} s",
                flush=True,
            )
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "results.json").write_text(json.dumps({"runs": results}, indent=1) + "\n")
    summary = summarise(results)
    for axis, row in summary.items():
        print(
            f"{axis}: mean over {row['seeds']} seeds of MoE2 - best single: base "
            f"{row['gap_base']:+.2f}, more {row['gap_more']:+.2f} points (more smaller in "
            f"{row['more_smaller']} seeds); mean AIQ base / more: "
            + ", ".join(f"{k} {a:.4f} / {b:.4f}" for k, (a, b) in row["aiq"].items())
        )
    text = json.dumps({"runs": results, "summary": summary}, indent=1)
    (args.out / "results.json").write_text(text + "\n")


def summarise(results: list[dict]) -> dict:
    """Per budget axis: mean gap (points) of each arm over seeds, and mean AIQs per method."""
    arms = {a: {r["seed"]: r for r in results if r["arm"] == a} for a in ("base", "more")}
    seeds = sorted(set(arms["base"]) & set(arms["more"]))
    out = {}
    for axis in ("energy", "delay"):
        gap = {
            a: [100 * arms[a][s]["moe2_minus_best_single"][axis]["mean"] for s in seeds]
            for a in arms
        }
        methods = ("moe2", "best_single", "greedy_per_joule", "router")
        out[axis] = {
            "seeds": len(seeds),
            "gap_base": float(np.mean(gap["base"])),
            "gap_more": float(np.mean(gap["more"])),
            "more_smaller": int(sum(m < b for b, m in zip(gap["base"], gap["more"], strict=True))),
            "aiq": {
                k: tuple(float(np.mean([arms[a][s]["aiq"][axis][k] for s in seeds])) for a in arms)
                for k in methods
            },
        }
    return out


if __name__ == "__main__":
    main()
