"""``gatelab demo`` for gmoe: the rate study (quick or full) and the model-selection check."""

from __future__ import annotations

from pathlib import Path

from gatelab.report import DemoResult


def run_demo(runs_dir: Path, quick: bool, progress=None) -> DemoResult:
    """Run the rate study (reusing cached replications) and recover k* by BIC and merging."""
    from gatelab.gmoe.rates import RateConfig
    from gatelab.gmoe.rates_report import rate_study, table
    from gatelab.gmoe.select import selection_demo

    summary, figures = rate_study(
        RateConfig.preset(quick), Path(runs_dir) / "gmoe-rates", workers=2, progress=progress
    )
    selection = selection_demo(Path(runs_dir) / "gmoe-select", n=3000, seed=0)
    metrics: dict[str, float | int | str] = {}
    for setting, entry in summary.items():
        for metric in ("hellinger", "voronoi"):
            slope = entry[metric]["slope"]
            metrics[f"{setting}/{metric}_slope"] = float("nan") if slope is None else slope
    metrics["select/bic_n_experts"] = selection["bic_n_experts"]
    metrics["select/merged_n_experts"] = selection["merged_n_experts"]
    metrics["select/true_n_experts"] = selection["true_n_experts"]
    text = (
        "Fitted log-log slopes of the mean loss vs n (theory in brackets; exact and "
        "over-specified (K̄ = 3) fits should show -1/2 for the density and Voronoi losses).\n\n"
        + table(summary)
        + f"\n\nModel selection on n = {selection['n']} simulated points (k* = 3): BIC picks "
        f"k = {selection['bic_n_experts']}; merging a k = 4 fit leaves "
        f"{selection['merged_n_experts']} experts."
    )
    figures = [*figures, Path(runs_dir) / "gmoe-select" / "bic.png"]
    return DemoResult("gmoe", "Top-K gated Gaussian MoE: convergence rates", metrics, figures, text)
