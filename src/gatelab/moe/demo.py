"""``gatelab demo`` entry: SparseMoE vs an equal-active-parameter dense LM on the stdlib corpus."""

from __future__ import annotations

from pathlib import Path

from gatelab.moe.train import quick_configs, train_pair
from gatelab.report import DemoResult


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
