"""``gatelab demo`` entry: SparseMoE vs an equal-active-parameter dense LM on the stdlib corpus."""

from __future__ import annotations

from pathlib import Path

from gatelab.moe.lm import MoEConfig
from gatelab.moe.train import TrainConfig, train_pair
from gatelab.report import DemoResult


def quick_configs(quick: bool) -> tuple[MoEConfig, TrainConfig]:
    """The demo's model and training settings; ``quick`` fits in < 3 min on 2 CPU cores."""
    if quick:
        model = MoEConfig(
            d_model=64, n_layers=2, n_heads=4, seq_len=64, n_experts=8, top_k=2, d_hidden=64
        )
        train = TrainConfig(
            steps=800, batch_size=32, eval_every=200, eval_batches=8, checkpoint_every=400,
            warmup=50, max_corpus_bytes=1_000_000, threads=1,
        )  # fmt: skip
        return model, train
    return MoEConfig(), TrainConfig(threads=1)


def run_demo(runs_dir: Path, quick: bool, progress=None) -> DemoResult:
    """Train both arms under ``runs_dir/moe-train`` (``moe-train-quick`` when quick).

    Separate folders because a run folder resumes only its own config.
    """
    model_cfg, train_cfg = quick_configs(quick)
    out = Path(runs_dir) / ("moe-train-quick" if quick else "moe-train")
    result = train_pair(model_cfg, train_cfg, out, progress)
    moe, dense = result["moe"], result["dense"]
    metrics = {
        "heldout_loss_moe": moe["eval/loss"],
        "heldout_loss_dense": dense["eval/loss"],
        "moe_minus_dense": moe["eval/loss"] - dense["eval/loss"],
        "active_params_moe": moe["params/active"],
        "active_params_dense": dense["params/active"],
        "total_params_moe": moe["params/total"],
        "steps": train_cfg.steps,
    }
    verdict = "beats" if metrics["moe_minus_dense"] < 0 else "does not beat"
    text = (
        f"A byte-level transformer with SparseMoE FFNs (E={model_cfg.n_experts}, "
        f"top-{model_cfg.top_k}) {verdict} the dense model with the same active parameters on "
        f"held-out stdlib files after {train_cfg.steps} steps: "
        f"{moe['eval/loss']:.4f} vs {dense['eval/loss']:.4f} nats/byte."
    )
    return DemoResult("moe", "Sparse MoE layer", metrics, list(result["figures"]), text)
