"""``gatelab reproduce gmoe``: the configurations behind the tables of ``docs/gmoe.md``.

Three tables: the convergence-rate study in quick mode (``gatelab gmoe rates --quick``, the demo's)
and in full mode (``gatelab gmoe rates``), and the model-selection check (``gatelab gmoe select``,
n = 3000, seed 0). All resume: replications cached in ``runs_dir/gmoe-rates/reps/`` (shared with
``gatelab gmoe rates`` and the demo) are reused, never refitted.
"""

from __future__ import annotations

from pathlib import Path

from gatelab.runs import atomic_write_bytes, atomic_write_json

EXPECTED_TIME = "about 35 min on 2 cores with --jobs 2 (the full study alone took 33 min)"
SELECTION = {"n": 3000, "seed": 0}  # the arguments of `gatelab gmoe select`'s defaults


def configurations() -> dict:
    """What :func:`reproduce` runs: the rate study's config and the selection check's."""
    from gatelab.gmoe.rates import RateConfig, config_dict

    return {
        "rates_quick": config_dict(RateConfig.preset(True)),
        "rates": config_dict(RateConfig.preset(False)),
        "select": dict(SELECTION),
    }


def reproduce(runs_dir: Path, jobs: int = 1, progress=None) -> Path:
    """Run (or resume) both results and write ``runs_dir/reproduce/gmoe/tables.md`` (+ .json).

    Args:
        runs_dir: parent of ``gmoe-rates/``, ``gmoe-select/`` and ``reproduce/gmoe/``.
        jobs: worker processes for the rate study (one torch thread each).
        progress: ``(done, total)`` callback, called as replications finish.

    Returns:
        The path of ``tables.md``.
    """
    from gatelab.gmoe.rates import RateConfig
    from gatelab.gmoe.rates_report import rate_study, table
    from gatelab.gmoe.select import selection_demo

    runs_dir = Path(runs_dir)
    quick, _ = rate_study(
        RateConfig.preset(True), runs_dir / "gmoe-rates", workers=jobs, progress=progress
    )
    summary, _ = rate_study(  # last, so runs_dir/gmoe-rates/rates.json is the full study's
        RateConfig.preset(False), runs_dir / "gmoe-rates", workers=jobs, progress=progress
    )
    selection = selection_demo(runs_dir / "gmoe-select", **SELECTION)
    text = (
        "# gmoe: tables of docs/gmoe.md\n\n"
        "## Measured rates, full mode (`gatelab gmoe rates --workers 2`)\n\n"
        "Fitted slope of log(mean loss) vs log n, theory in brackets.\n\n"
        f"{table(summary)}\n\n"
        "## Quick mode (`gatelab gmoe rates --quick`)\n\n"
        f"{table(quick)}\n\n"
        "## Model selection (`gatelab gmoe select`)\n\n"
        "| n | true k | BIC picks | k = 4 (top-3) fit merged to |\n|---|---|---|---|\n"
        f"| {selection['n']} | {selection['true_n_experts']} | {selection['bic_n_experts']} | "
        f"{selection['merged_n_experts']} |\n"
    )
    out = runs_dir / "reproduce" / "gmoe"
    atomic_write_json(
        out / "tables.json", {"rates": summary, "rates_quick": quick, "select": selection}
    )
    return atomic_write_bytes(out / "tables.md", text.encode())
