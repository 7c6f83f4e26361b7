"""Wall-clock of real batched early exit vs the plain ViT backbone, at several batch sizes.

Usage: python benchmarks/exits_speed.py [--checkpoint runs/exits/jei_lam0.2.safetensors]
Needs a pretrained backbone and a JEI-DNN checkpoint (`gatelab exits sweep` makes both); by
default it takes the operating point the sweep chose (runs/exits/curves.json).
Writes bench_speed.json beside the backbone, with config, package versions and hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

import gatelab
from gatelab.exits.backbones import load_exits, prepare, read_exits_meta
from gatelab.exits.data import fashion_mnist_root
from gatelab.exits.inference import GatePolicy, run_early_exit, time_inference
from gatelab.threads import torch_threads


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=fashion_mnist_root())
    parser.add_argument("--n-images", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    curves = Path("runs/exits/curves.json")
    if args.checkpoint is None and curves.exists():
        args.checkpoint = Path(json.loads(curves.read_text())["chosen"]["checkpoint"])
    if args.checkpoint is None or not args.checkpoint.exists():
        print(f"skip: no checkpoint at {args.checkpoint}; run `gatelab exits sweep` first")
        return
    with torch_threads(args.threads):
        bench(args)


def bench(args: argparse.Namespace) -> None:
    """Time early exit and the backbone at batch 1, 64 and 256; write ``bench_speed.json``."""
    torch.manual_seed(0)
    meta = read_exits_meta(args.checkpoint)
    backbone = Path(meta["backbone"])
    context = bool(meta.get("gate_context", False))
    prep = prepare(backbone, args.data, cache_dir=backbone.parent, gate_context=context)
    load_exits(prep.model, args.checkpoint)
    model = prep.model.eval()
    images = prep.transform(prep.splits["test"].images[: args.n_images])
    rows = []
    for batch_size in (1, 64, 256):
        n = min(len(images), 256 if batch_size == 1 else len(images))
        batches = [images[i : i + batch_size] for i in range(0, n, batch_size)]
        policy = GatePolicy(model.gates)
        t_exit = time_inference(
            lambda b, p=policy: run_early_exit(model, b, p), batches, args.repeats
        )
        t_full = time_inference(model.backbone_forward, batches, args.repeats)
        rows.append(
            {
                "batch_size": batch_size,
                "images": n,
                "exit_seconds": t_exit,
                "backbone_seconds": t_full,
                "speedup": t_full / t_exit,
            }
        )
        print(
            f"batch {batch_size:4d}: early exit {t_exit:.3f} s, backbone {t_full:.3f} s, "
            f"speed-up {t_full / t_exit:.2f}x"
        )
    out = {
        "checkpoint": str(args.checkpoint),
        "lam": meta.get("lam"),
        "rows": rows,
        "threads": args.threads,
        "seed": 0,
        "gatelab": gatelab.__version__,
        "torch": torch.__version__,
        "hardware": {
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
        },
    }
    path = backbone.parent / "bench_speed.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
