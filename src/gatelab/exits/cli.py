"""``gatelab exits``: pretrain the ViT, train JEI-DNN exits, evaluate, sweep."""

from __future__ import annotations

import dataclasses
import json
import logging
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from gatelab import _cli
from gatelab.exits.data import DEFAULT_FASHION_MNIST
from gatelab.exits.vit import ViTConfig
from gatelab.threads import torch_threads

app = typer.Typer(help="JEI-DNN early exits on Fashion-MNIST.", no_args_is_help=True)
log = logging.getLogger(__name__)


class DatasetName(StrEnum):
    """Datasets gatelab.exits reads."""

    fashion_mnist = "fashion-mnist"


class Variant(StrEnum):
    """JEI-DNN gate variants of the sweep (see ``gatelab.exits.sweep.VARIANTS``)."""

    jei_dnn = "jei-dnn"  # the paper's four gate features, class-weight exponent 0.75
    context = "jei-dnn+ctx"  # gates also read the previous exit
    balanced = "jei-dnn-balanced"  # the paper's fully class-balanced gate BCE


Data = Annotated[
    Path,
    typer.Option(
        "--data",
        envvar="GATELAB_FASHION_MNIST",
        help="Folder with the Fashion-MNIST IDX .gz files.",
    ),
]
Dataset = Annotated[DatasetName, typer.Option(help="Dataset.")]
Device = _cli.DeviceOption
Out = Annotated[Path, typer.Option(help="Run folder.", callback=_cli.writable_dir)]
Threads = Annotated[
    int, typer.Option(min=0, help="torch CPU threads (0: torch's default; 1 gives steady timings).")
]
Seed = Annotated[int, typer.Option(min=0, help="Seed.")]
Backbone = Annotated[Path, typer.Option(help="Pretrained backbone (.safetensors).")]
Fresh = Annotated[bool, typer.Option(help="Delete the run folder first instead of resuming it.")]
DEFAULT_BACKBONE = Path("runs/exits/backbone.safetensors")


def _heads_divide(value: int) -> int:
    """``--d-model`` callback: the ViT's attention heads split the token width evenly."""
    if value % ViTConfig.n_heads:
        raise typer.BadParameter(
            f"must be a multiple of the ViT's {ViTConfig.n_heads} attention heads, got {value}"
        )
    return value


def _lams(value: str | None) -> tuple[float, ...] | None:
    """``--lams`` callback: comma-separated finite lambdas >= 0, at least one."""
    if value is None:
        return None
    check = _cli.finite_float(0)
    try:
        lams = tuple(check(float(v)) for v in value.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None
    if not lams:
        raise typer.BadParameter(f"{value!r} holds no lambda")
    return lams


@app.command()
def pretrain(
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the backbone split.")] = 10,
    batch_size: Annotated[int, typer.Option(min=1, help="Mini-batch size.")] = 128,
    lr: Annotated[
        float,
        typer.Option(
            help="Peak AdamW learning rate.", callback=_cli.finite_float(0, low_open=True)
        ),
    ] = 2e-3,
    label_smoothing: Annotated[
        float,
        typer.Option(
            help="Label smoothing in [0, 1).", callback=_cli.finite_float(0, 1, high_open=True)
        ),
    ] = 0.0,
    d_model: Annotated[
        int, typer.Option(min=1, help="ViT token width.", callback=_heads_divide)
    ] = ViTConfig.d_model,
    mlp_ratio: Annotated[
        float,
        typer.Option(
            help="ViT MLP width / token width.", callback=_cli.finite_float(0, low_open=True)
        ),
    ] = 2.0,
    threads: Threads = 1,
    seed: Seed = 0,
    data: Data = DEFAULT_FASHION_MNIST,
    dataset: Dataset = DatasetName.fashion_mnist,
    out: Out = Path("runs/exits"),
    fresh: Fresh = False,
    device: Device = "cpu",
) -> None:
    """Train the ViT backbone (6 blocks + CLS) -> <out>/backbone.safetensors.

    A rerun resumes <out>/pretrain/ (only --epochs may change); another configuration is refused
    unless --fresh.
    """
    from gatelab.exits.pretrain import PretrainConfig
    from gatelab.exits.pretrain import pretrain as run

    with _cli.user_errors():
        model_cfg = ViTConfig(d_model=d_model, mlp_ratio=mlp_ratio)
        cfg = PretrainConfig(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            label_smoothing=label_smoothing,
            threads=threads,
            seed=seed,
            device=device,
        )
        with _cli.progress_bar("pretrain") as update:
            summary = run(out, data, model_cfg, cfg, progress=update, fresh=fresh)
    typer.echo(f"test accuracy {summary['test_accuracy']:.4f} -> {out / 'backbone.safetensors'}")


@app.command("train")
def train_cmd(
    lam: Annotated[
        float,
        typer.Option("--lam", help="Cost weight lambda (>= 0).", callback=_cli.finite_float(0)),
    ] = 0.5,
    n_rounds: Annotated[int, typer.Option(min=1, help="Gate+IM phase pairs.")] = 5,
    phase_steps: Annotated[int, typer.Option(min=1, help="Mini-batches per phase.")] = 200,
    seed: Seed = 0,
    threads: Threads = 1,
    backbone: Backbone = DEFAULT_BACKBONE,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Checkpoint path (.safetensors); its run folder is the path without suffix.",
            callback=_cli.writable_file,
        ),
    ] = None,
    fresh: Fresh = False,
    data: Data = DEFAULT_FASHION_MNIST,
    dataset: Dataset = DatasetName.fashion_mnist,
    device: Device = "cpu",
) -> None:
    """Train JEI-DNN IMs and gates for one lambda; writes <out>.safetensors and .json.

    A rerun resumes the run folder <out> (without suffix); another configuration or backbone is
    refused unless --fresh.
    """
    from gatelab.exits.train import TrainConfig, train_checkpoint

    with _cli.user_errors(), torch_threads(threads):
        cfg = TrainConfig(
            lam=lam, n_rounds=n_rounds, phase_steps=phase_steps, seed=seed, device=device
        )
        out = out or backbone.parent / f"jei_lam{lam:g}.safetensors"
        with _cli.progress_bar(f"train lam={lam:g}") as update:
            metrics = train_checkpoint(backbone, data, out, cfg, update, fresh=fresh)
    typer.echo(f"val objective {metrics['eval/objective']:.4f} -> {out}")


@app.command("eval")
def eval_cmd(
    checkpoint: Annotated[Path, typer.Option(help="JEI-DNN checkpoint (.safetensors).")],
    alpha: Annotated[
        float,
        typer.Option(
            help="Conformal miscoverage in (0, 1).",
            callback=_cli.finite_float(0, 1, low_open=True, high_open=True),
        ),
    ] = 0.05,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Write metrics here.", callback=_cli.writable_file),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Inference batch size.")] = 256,
    repeats: Annotated[
        int, typer.Option(min=0, help="Timing repeats (median); 0 skips timing.")
    ] = 3,
    gate_threshold: Annotated[
        float,
        typer.Option(
            help="Leave at the first exit whose gate value reaches this, in (0, 1).",
            callback=_cli.finite_float(0, 1, low_open=True, high_open=True),
        ),
    ] = 0.5,
    threads: Threads = 1,
    backbone: Annotated[
        Path | None, typer.Option(help="Override the checkpoint's backbone.")
    ] = None,
    data: Data = DEFAULT_FASHION_MNIST,
    dataset: Dataset = DatasetName.fashion_mnist,
    device: Device = "cpu",
) -> None:
    """Real early exit on the 10k test images: accuracy, FLOPs, speed-up, ECE, conformal sets."""
    from gatelab.exits.eval import evaluate_checkpoint

    with _cli.user_errors(), torch_threads(threads):
        flat = evaluate_checkpoint(
            checkpoint, data, alpha, batch_size, repeats, backbone, device, gate_threshold
        )
    if json_out is not None:
        _cli.write_json(json_out, flat)
    typer.echo(json.dumps(flat))


@app.command()
def sweep(
    quick: Annotated[
        bool,
        typer.Option(help="Defaults of a short sweep: 5 lambdas, short phases, 1024 timed images."),
    ] = False,
    lams: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated lambdas >= 0 (default: 17, or 5 with --quick).", callback=_lams
        ),
    ] = None,
    n_timed: Annotated[
        int | None,
        typer.Option(min=1, help="Test images timed per point (2048; 1024 with --quick)."),
    ] = None,
    repeats: Annotated[
        int | None, typer.Option(min=1, help="Timing repeats, median (2; 1 with --quick).")
    ] = None,
    backbone: Backbone = DEFAULT_BACKBONE,
    data: Data = DEFAULT_FASHION_MNIST,
    out: Out = Path("runs/exits"),
    device: Device = "cpu",
    threads: Threads = 1,
    variants: Annotated[
        list[Variant] | None,
        typer.Option("--variant", help="JEI-DNN variant; repeat for several (default jei-dnn)."),
    ] = None,
) -> None:
    """Lambda grid for JEI-DNN and the baselines' thresholds -> curves.json and five plots."""
    from gatelab.exits.operating_point import sweep_and_report, sweep_config

    with _cli.user_errors():
        names = tuple(v.value for v in variants or [Variant.jei_dnn])
        cfg = sweep_config(quick, names)  # --quick only changes the flags not given
        given = {"n_timed": n_timed, "repeats": repeats, "lams": lams}  # lams: a tuple
        cfg = dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None})
    with _cli.user_errors(), torch_threads(threads), _cli.progress_bar("sweep") as update:
        summary = sweep_and_report(out, backbone, data, cfg, quick, device, update)
    typer.echo(
        json.dumps(
            {
                "area_under_tradeoff": summary["area_under_tradeoff"],
                "jei_vs_best_baseline": summary["jei_vs_best_baseline"],
            },
            indent=2,
        )
    )


@app.command()
def efficientnet(
    resolution: Annotated[
        int, typer.Option(min=32, help="Input pixels, >= 32 (224 is ImageNet's).")
    ] = 64,
    threads: Threads = 1,
    data: Data = DEFAULT_FASHION_MNIST,
    out: Out = Path("runs/exits/efficientnet"),
    fresh: Fresh = False,
) -> None:
    """Frozen ImageNet EfficientNet-Lite0 with exits after its stages, heads fine-tuned.

    A rerun of the same configuration on <out> reports the finished run; another configuration
    is refused unless --fresh.
    """
    from gatelab.exits.effnet_run import EffNetConfig, run_efficientnet

    with _cli.user_errors(), torch_threads(threads), _cli.progress_bar("efficientnet") as update:
        cfg = EffNetConfig(resolution=resolution)
        summary = run_efficientnet(out, data, cfg, update, fresh=fresh)
    keys = ("head_test_accuracy", "area_under_tradeoff", "jei_vs_best_baseline")
    typer.echo(json.dumps({k: summary[k] for k in keys}, indent=2))
