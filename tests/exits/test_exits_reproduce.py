import re
import shlex
from pathlib import Path

import torch
from test_exits_data import fake_fashion_mnist
from test_exits_effnet_run import tiny_config
from typer.testing import CliRunner

from gatelab.cli import app
from gatelab.exits import ViTConfig, reproduce
from gatelab.exits.pretrain import PretrainConfig

DOC = Path(__file__).parents[2] / "docs" / "exits.md"


def _doc_commands() -> list[list[str]]:
    """Every runnable `gatelab exits ...` command of the doc's code blocks, as argument lists.

    Usage synopses (`[--fresh]`, optional parts in brackets) are not commands and are skipped.
    """
    text = re.sub(r"\\\n\s*", " ", DOC.read_text())
    lines = [ln.split("#")[0].strip() for ln in text.splitlines()]
    commands = [shlex.split(ln)[1:] for ln in lines if ln.startswith("gatelab exits ")]
    return [c for c in commands if not any(a.startswith("[") for a in c)]


def _captured(monkeypatch, module, name, args):
    seen = {}

    def fake(*a, **k):
        seen["args"] = a
        raise SystemExit(0)  # stop the command here

    monkeypatch.setattr(module, name, fake)
    CliRunner().invoke(app, args)
    return seen["args"]


def test_reproduce_runs_exactly_the_commands_in_the_doc(monkeypatch):
    from gatelab.exits import effnet_run, eval, operating_point, pretrain

    # the docs pretrain on a GPU; the CLI checks --device where it is parsed, so pretend one
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    commands = _doc_commands()
    by_name = {}
    for args in dict.fromkeys(map(tuple, commands)):  # each distinct command once
        by_name.setdefault(args[1], []).append(list(args))
    (pre,) = [a for a in by_name["pretrain"] if "--epochs" in a]
    out, _, model_cfg, cfg = _captured(monkeypatch, pretrain, "pretrain", pre)
    assert (model_cfg, cfg, out) == (reproduce.VIT, reproduce.PRETRAIN, Path("runs/exits_gpu100"))
    (sweep,) = [a for a in by_name["sweep"] if "--backbone" in a]
    out, backbone, _, cfg, quick, *_ = _captured(
        monkeypatch, operating_point, "sweep_and_report", sweep
    )
    assert (cfg, quick) == (reproduce.SWEEP, False)
    assert (out, backbone.parent) == (Path("runs/exits_gpu100_tau"), Path("runs/exits_gpu100"))
    (eff,) = by_name["efficientnet"]
    out, _, cfg, _ = _captured(monkeypatch, effnet_run, "run_efficientnet", eff)
    assert (out, cfg) == (Path("runs/exits/efficientnet"), reproduce.EFFNET)
    evaluated = set()
    for args in by_name["eval"]:
        checkpoint, _, alpha, _, repeats, _, _, tau = _captured(
            monkeypatch, eval, "evaluate_checkpoint", args
        )
        evaluated.add((checkpoint.name, tau, alpha, repeats))
    assert ("jei_lam0.4.safetensors", 0.7, 0.05, 3) in evaluated  # the ViT's chosen point
    for lam, tau, alphas in reproduce.EFFNET_POINTS:
        name = f"jei_lam{lam:g}.safetensors"
        assert {(name, tau, a, 3 if a == 0.05 else 0) for a in alphas} <= evaluated


def test_reproduce_chains_on_tiny_configs_write_the_tables_and_resume(
    tmp_path, monkeypatch, tiny_sweep
):
    data = fake_fashion_mnist(tmp_path / "data", n_train=12100, n_test=60)
    vit = ViTConfig(patch_size=7, d_model=8, n_heads=2, n_blocks=3, mlp_ratio=2)
    sweep = tiny_sweep(n_timed=32, warmup_epochs=1, phase_steps=2)
    pre = PretrainConfig(epochs=1, batch_size=64, device="cpu", threads=1)
    runs = tmp_path / "runs"
    monkeypatch.setattr(reproduce, "EVAL_REPEATS", 1)
    first = reproduce.run_vit(runs, data, vit, pre, sweep)
    points = ((1.0, 0.5, reproduce.ALPHAS), (0.05, 0.3, (0.05,)))
    effnet = reproduce.run_effnet(runs, data, tiny_config(tiny_sweep()), points)
    path = reproduce.write_tables(first, effnet, runs / "reproduce" / "exits")
    text = path.read_text()
    assert "## ViT sweep: areas" in text and "| jei-dnn |" in text and "λ=1, τ=0.5" in text
    assert (path.parent / "tables.json").is_file()
    stamp = (runs / "exits_gpu100_tau" / "curves.json").stat().st_mtime_ns
    again = reproduce.run_vit(runs, data, vit, pre, sweep)  # reused, not redone
    assert (runs / "exits_gpu100_tau" / "curves.json").stat().st_mtime_ns == stamp
    assert again["eval"] == first["eval"]
