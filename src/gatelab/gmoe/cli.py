"""``gatelab gmoe``: fit the top-K gated Gaussian MoE, select k, and run the rate study."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gatelab import _cli

app = typer.Typer(help="Top-K sparse softmax gating Gaussian MoE (Nguyen et al., ICLR 2024).")


@app.command()
def rates(
    quick: Annotated[
        bool, typer.Option(help="6 replications, n = 500..4000 (about 1 min).")
    ] = False,
    n_reps: Annotated[
        int | None,
        typer.Option(min=2, help="Replications per (setting, n) (default by --quick)."),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, max=256, help="Parallel worker processes.")] = 2,
    runs_dir: Annotated[
        Path, typer.Option(help="Parent folder of gmoe-rates/.", callback=_cli.writable_dir)
    ] = Path("runs"),
    fresh: Annotated[
        bool, typer.Option(help="Delete runs/gmoe-rates/ (its cached replications) first.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print rates.json to stdout.")] = False,
) -> None:
    """Convergence-rate study: log-log slopes of the losses vs n, next to the theory.

    Resumes: finished replications cached in runs/gmoe-rates/reps/ are skipped (quick and full
    share them). A folder holding a study of another configuration is refused; ``--fresh``
    replaces it. ``--quick`` picks the defaults of the options left out; an option given
    explicitly wins.
    """
    import dataclasses

    from gatelab.gmoe.rates import RateConfig
    from gatelab.gmoe.rates_report import rate_study, table

    with _cli.user_errors():
        cfg = RateConfig.preset(quick)
        if n_reps is not None:
            cfg = dataclasses.replace(cfg, n_reps=n_reps)
        out = runs_dir / "gmoe-rates"
        with _cli.progress_bar("gmoe rates") as update:
            summary, _ = rate_study(cfg, out, workers=workers, progress=update, fresh=fresh)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(table(summary))
    typer.echo(f"\nplots, rates.json and report.md in {out}/")


@app.command()
def fit(
    csv: Annotated[Path, typer.Argument(help="CSV with a header; features then y (last column).")],
    n_experts: Annotated[int, typer.Option(min=1, help="Number of experts k.")] = 2,
    top_k: Annotated[
        int | None, typer.Option(min=1, help="Experts per input K (default k).")
    ] = None,
    n_init: Annotated[int, typer.Option(min=1, help="k-means restarts.")] = 5,
    seed: Annotated[int, typer.Option(min=0, help="Random seed.")] = 0,
    device: _cli.DeviceOption = "cpu",
    out: Annotated[Path, typer.Option(help="Output folder.", callback=_cli.writable_dir)] = Path(
        "runs/gmoe-fit"
    ),
) -> None:
    """Fit a GaussianMoERegressor to a CSV file and write params.json."""
    import numpy as np

    from gatelab.gmoe.estimator import GaussianMoERegressor

    with _cli.user_errors():
        if not csv.is_file():
            raise FileNotFoundError(f"no such file: {csv}")
        try:
            data = np.loadtxt(csv, delimiter=",", skiprows=1, ndmin=2)
        except ValueError as error:
            raise ValueError(f"{csv}: {error}") from None
        if data.shape[1] < 2:
            raise ValueError(f"{csv}: need at least 2 columns (features, y), got {data.shape[1]}")
        bad = np.argwhere(~np.isfinite(data))
        if len(bad):  # row 1 is the header, so data row i is line i + 2
            row, column = bad[0]
            raise ValueError(
                f"{csv}:{row + 2}: column {column + 1} is {data[row, column]} (need finite numbers)"
            )
        X, y = data[:, :-1], data[:, -1]
        est = GaussianMoERegressor(
            n_experts=n_experts, top_k=top_k, n_init=n_init, random_state=seed, device=device
        ).fit(X, y)
        p = est.params_
        result = {
            k: np.asarray(getattr(p, k)).tolist() for k in ("beta0", "beta1", "a", "b", "var")
        }
        result |= {
            "top_k": p.top_k,
            "log_likelihood_per_sample": est.log_likelihood_,
            "bic": est.bic(X, y),
            "n_iter": est.n_iter_,
            "converged": est.converged_,
        }
        _cli.write_json(out / "params.json", result)
        _cli.write_json(out / "config.json", est.get_params() | {"csv": str(csv)})
    typer.echo(json.dumps(result, indent=2))


@app.command()
def select(
    n: Annotated[int, typer.Option(min=50, help="Simulated sample size.")] = 3000,
    seed: Annotated[int, typer.Option(min=0, help="Random seed.")] = 0,
    runs_dir: Annotated[
        Path, typer.Option(help="Parent folder of gmoe-select/.", callback=_cli.writable_dir)
    ] = Path("runs"),
) -> None:
    """Recover k* = 3 on simulated data by BIC and by merging an over-specified fit."""
    from gatelab.gmoe.select import selection_demo

    with _cli.user_errors():
        result = selection_demo(runs_dir / "gmoe-select", n=n, seed=seed)
    typer.echo(json.dumps(result, indent=2))
