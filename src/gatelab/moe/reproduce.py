"""``gatelab reproduce moe``: the training runs behind the held-out-loss table of ``docs/moe.md``.

Two runs of :func:`gatelab.moe.train.train_pair` (SparseMoE LM and the equal-active-parameter
dense LM, seed 0): the quick demo's configuration (``gatelab moe train --quick``) and the same
configuration trained for 800 steps (``gatelab moe train --quick --steps 800``). Each run folder
resumes from its checkpoint, so finished arms are only re-evaluated, never retrained.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gatelab.runs import atomic_write_bytes, atomic_write_json

EXPECTED_TIME = "about 2.5 min of CPU on 1 thread (two MoE-vs-dense pairs, 600 and 800 steps)"
RUNS = {"moe-train-quick": None, "moe-train-quick-800": 800}  # run folder: steps (None: quick's)


def configurations() -> dict:
    """What :func:`reproduce` runs: ``{run folder: (MoEConfig, TrainConfig)}``."""
    from gatelab.moe.train import quick_configs

    out = {}
    for name, steps in RUNS.items():
        model_cfg, train_cfg = quick_configs(True)
        if steps is not None:
            train_cfg = dataclasses.replace(train_cfg, steps=steps)
        out[name] = (model_cfg, train_cfg)
    return out


def reproduce(runs_dir: Path, jobs: int = 1, progress=None) -> Path:
    """Train (or resume) both pairs and write ``runs_dir/reproduce/moe/tables.md`` (+ .json).

    Args:
        runs_dir: parent of the run folders and of ``reproduce/moe/``.
        jobs: unused (the runs are sequential, one thread each); kept for the common signature.
        progress: ``(done, total)`` callback over all steps of all runs.

    Returns:
        The path of ``tables.md``.
    """
    from gatelab.moe.train import train_pair

    runs_dir = Path(runs_dir)
    configs = configurations()
    total = sum(2 * cfg.steps for _, cfg in configs.values())
    done, rows, results = 0, [], {}
    for name, (model_cfg, train_cfg) in configs.items():
        offset = done
        tick = (lambda d, t, o=offset: progress(o + d, total)) if progress else None
        result = train_pair(model_cfg, train_cfg, runs_dir / name, tick)
        done += 2 * train_cfg.steps
        moe, dense = result["moe"], result["dense"]
        results[name] = {"steps": train_cfg.steps, "moe": moe, "dense": dense}
        rows.append(
            f"| {train_cfg.steps} | {moe['eval/loss']:.4f} | {dense['eval/loss']:.4f} | "
            f"{moe['eval/loss'] - dense['eval/loss']:+.4f} | {moe['params/active']:,} / "
            f"{moe['params/total']:,} | {dense['params/active']:,} |"
        )
    text = (
        "# moe: tables of docs/moe.md\n\n"
        "Held-out loss (nats/byte), SparseMoE (E=8, top-2) vs dense, seed 0 "
        "(`gatelab moe train --quick [--steps 800]`).\n\n"
        "| steps | MoE | dense | MoE - dense | MoE active / total params | dense params |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    out = runs_dir / "reproduce" / "moe"
    atomic_write_json(out / "tables.json", _plain(results))
    return atomic_write_bytes(out / "tables.md", text.encode())


def _plain(results: dict) -> dict:
    keep = ("eval/loss", "eval/bits_per_byte", "params/active", "params/total")
    return {
        name: {
            "steps": r["steps"],
            **{arm: {k: r[arm][k] for k in keep} for arm in ("moe", "dense")},
        }
        for name, r in results.items()
    }
