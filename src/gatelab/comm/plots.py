"""Figures: the learned graph, the communication rate over training, learning curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_graph(model, path: Path, title: str = "") -> Path:
    """Graph logits alpha (heat map) and the execution graph drawn on a circle."""
    plt = _plt()
    graph = model.graph.execution().cpu().numpy()  # (A, A) receiver x sender
    alpha = model.graph.alpha.detach().cpu().numpy().copy()
    np.fill_diagonal(alpha, np.nan)
    n = graph.shape[0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    image = left.imshow(alpha, cmap="viridis")
    left.set_xlabel("sender j")
    left.set_ylabel("receiver i")
    left.set_title(f"graph logits alpha ({model.cfg.graph})")
    fig.colorbar(image, ax=left)
    angle = 2 * np.pi * np.arange(n) / n
    xy = np.stack([np.cos(angle), np.sin(angle)], 1)
    for i in range(n):
        for j in range(n):
            if i != j and graph[i, j] > 0:
                right.annotate(
                    "",
                    xy=xy[i] * 0.85,
                    xytext=xy[j] * 0.85,
                    arrowprops={"arrowstyle": "->", "color": "tab:blue", "lw": 1.5},
                )
    right.scatter(xy[:, 0], xy[:, 1], s=500, c="tab:orange", zorder=3)
    for i in range(n):
        right.text(*xy[i], str(i), ha="center", va="center", zorder=4)
    k = model.graph.k if model.cfg.graph != "none" else 0
    right.set_title(f"execution graph (sender -> receiver), k={k}")
    right.set_xlim(-1.3, 1.3)
    right.set_ylim(-1.3, 1.3)
    right.set_aspect("equal")
    right.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_comm_rate(history: list[dict], path: Path) -> Path:
    """Training communication rate and success over updates."""
    plt = _plt()
    steps = [h["agent_steps"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["train/comm_rate"] for h in history], label="comm rate")
    ax.plot(steps, [h["train/success"] for h in history], label="success (train)")
    ax.set_xlabel("agent steps")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    ax.set_title("communication rate over training")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_curves(curves: dict[str, list[list[dict]]], key: str, path: Path, title: str) -> Path:
    """Mean +- std over seeds of ``key`` against agent steps, one line per variant."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, runs in curves.items():
        length = min(len(r) for r in runs)
        x = np.array([h["agent_steps"] for h in runs[0][:length]])
        y = np.array([[h[key] for h in r[:length]] for r in runs])  # (seeds, updates)
        window = max(1, length // 20)
        kernel = np.ones(window) / window
        smooth = np.array([np.convolve(row, kernel, mode="valid") for row in y])
        xs = x[window - 1 :]
        mean, std = smooth.mean(0), smooth.std(0)
        ax.plot(xs, mean, label=f"{name} (n={len(runs)})")
        ax.fill_between(xs, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("agent steps")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
