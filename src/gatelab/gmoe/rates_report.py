"""Summaries of the rate study: mean loss per n, fitted log-log slopes, plots and a table.

Slopes are least squares of ``log(mean loss)`` on ``log(n)``, as in the authors' studies
(their dense-gating simulations); error bars are one standard error of the mean over replications.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gatelab.gmoe.rates import THEORY, RateConfig
from gatelab.runs import atomic_write_bytes, atomic_write_json, start_run

METRICS = ("hellinger", "tv", "voronoi", "beta1", "a", "b", "var")
LABELS = {
    "hellinger": "Hellinger",
    "tv": "total variation",
    "voronoi": "Voronoi loss",
    "beta1": "|Δβ1|",
    "a": "|Δa|",
    "b": "|Δb|",
    "var": "|Δv|",
}


def summarise(records: list[dict], cfg: RateConfig) -> dict:
    """Per setting and metric: n, mean, standard error, fitted slope and the theory's slope."""
    out: dict = {}
    for setting in cfg.settings:
        rows = [r for r in records if r["setting"] == setting and r["n"] in cfg.sample_sizes]
        ns = np.array(sorted({r["n"] for r in rows}))
        entry = {
            "n": ns.tolist(),
            "converged_fraction": float(np.mean([r["converged"] for r in rows])),
        }
        entry["mean_n_iter"] = float(np.mean([r["n_iter"] for r in rows]))
        for metric in METRICS:
            values = [np.array([r[metric] for r in rows if r["n"] == n], float) for n in ns]
            mean = np.array([np.nanmean(v) for v in values])
            sem = np.array([np.nanstd(v, ddof=1) / np.sqrt(np.sum(np.isfinite(v))) for v in values])
            ok = np.isfinite(mean) & (mean > 0)
            slope = (
                float(np.polyfit(np.log(ns[ok]), np.log(mean[ok]), 1)[0]) if ok.sum() > 1 else None
            )
            entry[metric] = {
                "mean": mean.tolist(),
                "sem": sem.tolist(),
                "slope": slope,
                "theory": THEORY[setting][metric],
            }
        out[setting] = entry
    return out


def table(summary: dict) -> str:
    """Markdown table: one row per setting, fitted slope (theory) per metric."""
    head = "| setting | " + " | ".join(LABELS[m] for m in METRICS) + " |"
    lines = [head, "|---" * (len(METRICS) + 1) + "|"]
    for setting, entry in summary.items():
        cells = []
        for m in METRICS:
            slope, theory = entry[m]["slope"], entry[m]["theory"]
            th = "no rate" if theory is None else f"{theory:g}"
            cells.append("n/a" if slope is None else f"{slope:+.2f} ({th})")
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, out_dir: Path) -> list[Path]:
    """Three log-log figures: density distances, Voronoi losses, raw parameter errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    groups = {
        "density.png": ("hellinger", "tv"),
        "voronoi.png": ("voronoi",),
        "raw_errors.png": ("beta1", "a", "b", "var"),
    }
    paths = []
    for name, metrics in groups.items():
        fig, axes = plt.subplots(1, len(summary), figsize=(4.2 * len(summary), 3.6), squeeze=False)
        for ax, (setting, entry) in zip(axes[0], summary.items(), strict=True):
            ns = np.array(entry["n"], float)
            for metric in metrics:
                e = entry[metric]
                mean, sem = np.array(e["mean"]), np.array(e["sem"])
                th = "none" if e["theory"] is None else f"{e['theory']:g}"
                slope = "n/a" if e["slope"] is None else f"{e['slope']:+.2f}"
                label = f"{LABELS[metric]}: slope {slope} (theory {th})"
                line = ax.errorbar(ns, mean, yerr=sem, marker="o", capsize=3, label=label)
                if e["slope"] is not None:
                    ok = mean > 0
                    coef = np.polyfit(np.log(ns[ok]), np.log(mean[ok]), 1)
                    ax.plot(
                        ns, np.exp(np.polyval(coef, np.log(ns))), "--", color=line[0].get_color()
                    )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short ranges
            ax.set_xlabel("n")
            ax.set_title(setting)
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("mean loss ± s.e.")
        fig.tight_layout()
        path = Path(out_dir) / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def rate_study(
    cfg: RateConfig, out_dir: Path, workers: int = 2, progress=None, *, fresh: bool = False
) -> tuple[dict, list[Path]]:
    """Run (or resume) the study and write ``config.json``, ``rates.json``, plots, ``report.md``.

    ``out_dir`` is a run folder (:func:`gatelab.runs.start_run`): a rerun resumes it, and the
    quick and full presets share it (they differ only in which replications run); a study whose
    replications would differ (another seed, tolerance, ...) is refused unless ``fresh``.

    Returns:
        The summary (see :func:`summarise`) and the figure paths.
    """
    from gatelab.gmoe.rates import STUDY_SIZE_KEYS, config_dict, run_study

    out_dir = Path(out_dir)
    start_run(out_dir, config_dict(cfg), fresh=fresh, ignore=STUDY_SIZE_KEYS)
    records = run_study(cfg, out_dir, workers=workers, progress=progress)
    summary = summarise(records, cfg)
    atomic_write_json(out_dir / "rates.json", summary)
    figures = plot(summary, out_dir)
    n_text = ", ".join(str(n) for n in cfg.sample_sizes)
    report = (
        f"# Convergence rates (gatelab gmoe rates)\n\nn = {n_text}; {cfg.n_reps} replications; "
        "fitted slope of log(mean loss) vs log(n), theory in brackets.\n\n" + table(summary) + "\n"
    )
    atomic_write_bytes(out_dir / "report.md", report.encode())
    return summary, figures
