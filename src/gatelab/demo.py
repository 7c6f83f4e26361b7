"""``gatelab demo``: run every system's demo and gather the results into one report.

Each system package ``gatelab.<name>`` provides ``gatelab.<name>.demo.run_demo(runs_dir, quick,
progress)`` returning a :class:`gatelab.report.DemoResult`; :func:`system_demo` names each one
explicitly. The quick mode is the tour (all systems in under ten minutes on two cores); the full
mode runs the studies behind the documented tables.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from gatelab import gates
from gatelab.report import DemoResult

SYSTEMS = ("gates", "gmoe", "moe", "exits", "edge", "comm")

Progress = Callable[[int, int], None] | None


def system_demo(name: str) -> Callable[..., DemoResult]:
    """The ``run_demo(runs_dir, quick, progress)`` of one system (imported only when asked)."""
    if name == "gates":
        return run_gates_demo
    if name == "gmoe":
        from gatelab.gmoe.demo import run_demo
    elif name == "moe":
        from gatelab.moe.demo import run_demo
    elif name == "exits":
        from gatelab.exits.demo import run_demo
    elif name == "edge":
        from gatelab.edge.demo import run_demo
    elif name == "comm":
        from gatelab.comm.demo import run_demo
    else:
        raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")
    return run_demo


def run_system_demo(
    name: str, runs_dir: Path, quick: bool, progress: Progress = None
) -> DemoResult:
    """Run one system's demo and time it."""
    run_demo = system_demo(name)
    start = time.perf_counter()
    result = run_demo(runs_dir, quick, progress)
    result.seconds = time.perf_counter() - start
    return result


def run_gates_demo(runs_dir: Path, quick: bool = True, progress: Progress = None) -> DemoResult:
    """Pictures of the shared gates: top-K regions of a 2-D gate and hazard exit probabilities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = runs_dir / "gates"
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    n_experts, resolution = 5, 160 if quick else 400
    angles = torch.linspace(0, 2 * torch.pi, n_experts + 1)[:-1]
    beta1 = torch.stack([angles.cos(), angles.sin()], dim=1) * 2.0  # (E, 2): experts on a circle
    beta0 = torch.randn(n_experts, generator=generator, dtype=beta1.dtype)
    axis = torch.linspace(-3, 3, resolution)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1).reshape(-1, 2)  # (N, 2)
    logits = grid @ beta1.T  # (N, E)

    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    metrics: dict[str, float | int | str] = {}
    for panel, k in zip(axes, (1, 2, 3), strict=True):
        _, indices = gates.topk_softmax(logits, k, beta0)
        subsets = torch.sort(indices, dim=-1).values  # (N, K)
        _, region = torch.unique(subsets, dim=0, return_inverse=True)  # (N,)
        n_regions = int(region.max()) + 1
        metrics[f"regions_top{k}"] = n_regions
        panel.imshow(
            region.reshape(resolution, resolution).numpy(),
            origin="lower",
            extent=(-3, 3, -3, 3),
            cmap="tab20",
            interpolation="nearest",
        )
        panel.set_title(f"top-{k} of {n_experts}: {n_regions} regions")
        panel.set_xlabel("$x_1$")
        panel.set_ylabel("$x_2$")
    fig.suptitle("Input regions of a top-K softmax gate (selection by $\\beta_1^T x$)")
    fig.tight_layout()
    regions_png = out / "topk_regions.png"
    fig.savefig(regions_png, dpi=110)
    plt.close(fig)
    if progress:
        progress(1, 2)

    gate_values = torch.tensor([0.1, 0.3, 0.5, 0.2])
    probs = gates.exit_probabilities(gate_values).numpy()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(np.arange(1, len(probs) + 1), probs, color="tab:blue")
    ax.set_xlabel("exit $l$")
    ax.set_ylabel("$P_l = g_l \\prod_{j<l}(1-g_j)$")
    ax.set_title(f"Hazard exits for g = {gate_values.tolist()}")
    fig.tight_layout()
    hazard_png = out / "exit_probabilities.png"
    fig.savefig(hazard_png, dpi=110)
    plt.close(fig)
    metrics["exit_probability_sum"] = float(probs.sum())
    metrics["first_exit_at_0.5"] = int(gates.first_exit(gate_values)) + 1
    if progress:
        progress(2, 2)
    text = (
        "Experts are selected by $\\beta_1^T x$ alone and $\\beta_0$ enters after selection, so "
        "the plane splits into one region per selected set (arXiv:2309.13850)."
    )
    return DemoResult("gates", "Shared gates", metrics, [regions_png, hazard_png], text)
