"""Held-out evaluation of :class:`gatelab.moe.lm.TinyLM`; the figures of ``gatelab moe train``."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from gatelab import runs


@torch.no_grad()
def evaluate(model, heldout: torch.Tensor, n_batches: int, batch_size: int) -> dict:
    """Mean held-out cross-entropy (nats/byte) on fixed, evenly spaced windows, and expert load.

    Returns:
        ``eval/loss``, ``eval/bits_per_byte`` and, per routed layer ``i``, ``eval/load_l{i}``
        (fraction of routed rows per expert) and ``eval/dropped_l{i}``.
    """
    was_training = model.training
    model.eval()
    seq_len = model.cfg.seq_len
    device = next(model.parameters()).device
    n_windows = n_batches * batch_size
    starts = torch.linspace(0, heldout.numel() - seq_len - 2, n_windows).long().tolist()
    total, loads = 0.0, [torch.zeros(m.n_experts) for m in model.moe_layers()]
    dropped = [0.0 for _ in loads]
    for b in range(n_batches):
        chunk = starts[b * batch_size : (b + 1) * batch_size]
        batch = torch.stack([heldout[s : s + seq_len + 1] for s in chunk]).to(device)
        logits = model(batch[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1)).item()
        for i, layer in enumerate(model.moe_layers()):
            loads[i] += layer.last_stats.tokens_per_expert.float().cpu()
            dropped[i] += layer.last_stats.dropped_fraction / n_batches
    model.train(was_training)
    loss = total / n_batches
    out = {"eval/loss": loss, "eval/bits_per_byte": loss / math.log(2)}
    for i, load in enumerate(loads):
        out[f"eval/load_l{i}"] = (load / load.sum()).tolist()
        out[f"eval/dropped_l{i}"] = dropped[i]
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: train first (gatelab moe train)")
    return runs.read_metrics(run_dir)  # a torn last line is skipped with a warning


def plot_loss_curves(run_dir: Path, path: Path) -> Path:
    """Train and held-out loss of every arm under ``run_dir`` (``moe/``, ``dense/``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, color in (("moe", "tab:red"), ("dense", "tab:blue")):
        records = read_metrics(Path(run_dir) / arm)
        tr = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
        ev = [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]
        ax.plot(*zip(*tr, strict=True), color=color, alpha=0.4, label=f"{arm} train")
        ax.plot(*zip(*ev, strict=True), "o-", color=color, label=f"{arm} held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title("SparseMoE vs dense FFN, equal active parameters")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_expert_load(run_dir: Path, path: Path) -> Path:
    """Per-expert share of routed tokens over training, one panel per routed layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(run_dir) if "train/load_l0" in r]
    n_layers = sum(1 for k in records[-1] if k.startswith("train/load_l"))
    fig, axes = plt.subplots(1, n_layers, figsize=(4.5 * n_layers, 3.6), squeeze=False)
    steps = [r["step"] for r in records]
    for i, ax in enumerate(axes[0]):
        load = torch.tensor([r[f"train/load_l{i}"] for r in records], dtype=torch.float)
        share = load / load.sum(1, keepdim=True)  # (steps, E)
        ax.stackplot(steps, share.T.numpy())
        ax.set_xlabel("step")
        ax.set_ylabel("share of routed tokens")
        ax.set_title(f"layer {i}: load per expert (E={share.shape[1]})")
        ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluate_checkpoint(path: Path, device: str = "cpu") -> dict:
    """Evaluate a ``gatelab moe train`` checkpoint on its held-out files.

    Args:
        path: a run folder (its ``checkpoint.safetensors``) or the checkpoint file itself, which
            carries its config, so a checkpoint moved alone still evaluates.
        device: torch device to evaluate on.
    """
    from gatelab.moe.lm import MoEConfig, TinyLM, load_corpus

    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / "checkpoint.safetensors"
    if not runs.checkpoint_exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}: run `gatelab moe train` first")
    ckpt = runs.load_checkpoint(path, device=device)  # a torn file falls back to the previous one
    saved = ckpt.config
    if "model" not in saved or "train" not in saved:
        raise ValueError(f"{path}: not a `gatelab moe train` checkpoint")
    model = TinyLM(MoEConfig(**saved["model"])).to(device)
    prefix = "model."
    model.load_state_dict(
        {k[len(prefix) :]: v for k, v in ckpt.tensors.items() if k.startswith(prefix)}
    )
    train = saved["train"]
    corpus = Path(train["corpus_dir"]) if train["corpus_dir"] else None
    _, heldout = load_corpus(corpus, train["max_corpus_bytes"])
    return evaluate(model, heldout, train["eval_batches"], train["batch_size"])
