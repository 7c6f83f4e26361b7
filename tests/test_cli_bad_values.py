"""Bad values on every command of the root, ``gmoe`` and ``exits`` groups (and the cases the CLI
fuzz campaign, ``experiments/fuzz_cli.py``, found in the others): one line, exit 2.

Each invocation must be refused before any long work starts, with one line on stderr that names
the culprit (the option or the file), exit code 2 and no traceback — as the user runs it, through
``gatelab.cli.main``, the console entry point (typer's own runner prints a multi-line usage box).
The data folder given to the data-reading commands is missing, so a value that slipped through
would end in the data error instead of starting a job, and fail the hint check.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gatelab.cli import main

HUGE = "99999999999999999999"  # a 20-digit count: more than a C ssize_t holds

# (argv, a hint the one-line message must contain: the option, or the file at fault)
CASES = [
    # gatelab demo / reproduce
    (["demo", "--only", "gates", "--runs-dir", "{file}/runs"], "{file}"),
    (["demo", "--only", "nope"], "nope"),
    (["reproduce", "gmoe", "--jobs", "0"], "--jobs"),
    (["reproduce", "gmoe", "--jobs", "-2"], "--jobs"),
    (["reproduce", "gmoe", "--runs-dir", "{file}/runs"], "{file}"),
    (["reproduce", "nope"], "nope"),
    (["reproduce", "gmoe", "--small"], "--small"),  # one grid only: refused, not ignored
    (["reproduce", "edge", "--seeds", "3"], "--seeds"),
    # gmoe rates
    (["gmoe", "rates", "--n-reps", "0", "--runs-dir", "{tmp}"], "--n-reps"),
    (["gmoe", "rates", "--n-reps", "-3", "--runs-dir", "{tmp}"], "--n-reps"),
    (["gmoe", "rates", "--n-reps", "1", "--runs-dir", "{tmp}"], "--n-reps"),
    (["gmoe", "rates", "--workers", "0", "--runs-dir", "{tmp}"], "--workers"),
    (["gmoe", "rates", "--workers", "-1", "--runs-dir", "{tmp}"], "--workers"),
    (["gmoe", "rates", "--quick", "--runs-dir", "{file}/runs"], "{file}"),
    (["gmoe", "rates", "--quick", "--runs-dir", "{other}"], "--fresh"),  # another study there
    # gmoe fit
    (["gmoe", "fit", "{csv_nan}"], "{csv_nan}"),
    (["gmoe", "fit", "{csv_inf}"], "{csv_inf}"),
    (["gmoe", "fit", "{csv_text}"], "{csv_text}"),
    (["gmoe", "fit", "{csv_one_row}"], "n_samples"),
    (["gmoe", "fit", "{csv_one_column}"], "{csv_one_column}"),
    (["gmoe", "fit", "{tmp}/missing.csv"], "missing.csv"),
    (["gmoe", "fit", "{csv}", "--n-experts", "0"], "--n-experts"),
    (["gmoe", "fit", "{csv}", "--n-experts", "-1"], "--n-experts"),
    (["gmoe", "fit", "{csv}", "--n-experts", "50"], "n_experts"),  # k > n_samples
    (["gmoe", "fit", "{csv}", "--top-k", "0"], "--top-k"),
    (["gmoe", "fit", "{csv}", "--top-k", "3", "--n-experts", "2"], "top_k"),
    (["gmoe", "fit", "{csv}", "--n-init", "0"], "--n-init"),
    (["gmoe", "fit", "{csv}", "--seed", "-1"], "--seed"),
    (["gmoe", "fit", "{csv}", "--out", "{file}/fit"], "{file}"),
    # gmoe select
    (["gmoe", "select", "--n", "0"], "--n"),
    (["gmoe", "select", "--n", "-5"], "--n"),
    (["gmoe", "select", "--n", "3"], "--n"),
    (["gmoe", "select", "--seed", "-1"], "--seed"),
    (["gmoe", "select", "--runs-dir", "{file}/runs"], "{file}"),
    # exits pretrain
    *[
        (["exits", "pretrain", flag, value, "--data", "{nodata}", "--out", "{tmp}/pre"], flag)
        for flag, value in [
            ("--epochs", "0"),
            ("--batch-size", "0"),
            ("--batch-size", "-5"),
            ("--lr", "nan"),
            ("--lr", "inf"),
            ("--lr", "-1"),
            ("--lr", "0"),
            ("--label-smoothing", "nan"),
            ("--label-smoothing", "1"),
            ("--label-smoothing", "-0.1"),
            ("--d-model", "0"),
            ("--d-model", "7"),  # not a multiple of the 4 heads
            ("--mlp-ratio", "nan"),
            ("--mlp-ratio", "0"),
            ("--mlp-ratio", "-1"),
            ("--threads", "-3"),
            ("--seed", "-1"),
        ]
    ],
    (["exits", "pretrain", "--data", "{nodata}", "--out", "{file}/pre"], "{file}"),
    (["exits", "pretrain", "--data", "{nodata}", "--out", "{other}"], "--fresh"),
    # exits train
    *[
        (["exits", "train", flag, value, "--backbone", "{backbone}", "--data", "{nodata}"], flag)
        for flag, value in [
            ("--lam", "nan"),
            ("--lam", "inf"),
            ("--lam", "-1"),
            ("--n-rounds", "0"),
            ("--phase-steps", "0"),
            ("--threads", "-3"),
            ("--seed", "-1"),
        ]
    ],
    (
        ["exits", "train", "--backbone", "{trunc_backbone}", "--data", "{nodata}"],
        "{trunc_backbone}",
    ),
    (["exits", "train", "--backbone", "{trunc_alone}", "--data", "{nodata}"], "{trunc_alone}"),
    (["exits", "train", "--backbone", "{garbage}", "--data", "{nodata}"], "{garbage}"),
    (["exits", "train", "--backbone", "{tmp}/none.safetensors", "--data", "{nodata}"], "none"),
    (
        ["exits", "train", "--backbone", "{backbone}", "--out", "{other}.safetensors"],
        "--fresh",  # its run folder holds another configuration's run
    ),
    (
        ["exits", "train", "--backbone", "{backbone}", "--data", "{nodata}", "--out", "{file}/x"],
        "{file}",
    ),
    # exits eval
    (["exits", "eval", "--checkpoint", "{trunc_exits}", "--data", "{nodata}"], "{trunc_exits}"),
    (["exits", "eval", "--checkpoint", "{trunc_exits_alone}", "--data", "{nodata}"], "alone"),
    (["exits", "eval", "--checkpoint", "{garbage}", "--data", "{nodata}"], "{garbage}"),
    *[
        (["exits", "eval", "--checkpoint", "{exits}", flag, value, "--data", "{nodata}"], flag)
        for flag, value in [
            ("--alpha", "nan"),
            ("--alpha", "0"),
            ("--alpha", "1"),
            ("--batch-size", "0"),
            ("--batch-size", "-1"),
            ("--repeats", "-1"),
            ("--gate-threshold", "nan"),
            ("--gate-threshold", "0"),
            ("--threads", "-3"),
        ]
    ],
    (
        [
            "exits",
            "eval",
            "--checkpoint",
            "{exits}",
            "--json",
            "{file}/m.json",
            "--data",
            "{nodata}",
        ],
        "{file}",
    ),
    # exits sweep
    *[
        (["exits", "sweep", flag, value, "--backbone", "{backbone}", "--data", "{nodata}"], flag)
        for flag, value in [
            ("--lams", "abc"),
            ("--lams", "nan"),
            ("--lams", "0.1,inf"),
            ("--lams", "-1"),
            ("--lams", ","),
            ("--n-timed", "0"),
            ("--n-timed", "-1"),
            ("--repeats", "0"),
            ("--repeats", "-1"),
            ("--threads", "-3"),
        ]
    ],
    (
        [
            "exits",
            "sweep",
            "--out",
            "{file}/sweep",
            "--backbone",
            "{backbone}",
            "--data",
            "{nodata}",
        ],
        "{file}",
    ),
    (
        ["exits", "sweep", "--backbone", "{trunc_backbone}", "--data", "{nodata}"],
        "{trunc_backbone}",
    ),
    # exits efficientnet
    *[
        (["exits", "efficientnet", flag, value, "--data", "{nodata}", "--out", "{tmp}/e"], flag)
        for flag, value in [("--resolution", "0"), ("--resolution", "-1"), ("--threads", "-3")]
    ],
    (["exits", "efficientnet", "--data", "{nodata}", "--out", "{file}/e"], "{file}"),
    # found by experiments/fuzz_cli.py: 20-digit counts overflowed, NaN/negative/inf started jobs
    (["reproduce", "gmoe", "--jobs", HUGE], "--jobs"),
    (["gmoe", "rates", "--workers", HUGE, "--runs-dir", "{tmp}"], "--workers"),
    (["comm", "compare", "--seeds", HUGE], "--seeds"),
    (["comm", "compare", "--seeds", "0"], "--seeds"),
    (["comm", "compare", "--jobs", HUGE], "--jobs"),
    (["comm", "compare", "--updates", "-3"], "--updates"),
    (["comm", "compare", "--max-minutes", "inf"], "--max-minutes"),
    (["comm", "compare", "--comm-cost", "nan"], "--comm-cost"),
    *[(["comm", "compare", "--comm-budget", v], "--comm-budget") for v in ("nan", "-1", "2")],
    (["comm", "eval", "--checkpoint", "{file}", "--episodes", "0"], "--episodes"),
    (["comm", "eval", "--checkpoint", "{file}", "--seed", "-1"], "--seed"),
    *[
        (["edge", "serve", "--model", "smollm2-135m", flag, value], flag)
        for flag, value in [
            ("--threads", HUGE),
            ("--max-batch", HUGE),
            ("--max-queue", "0"),
            ("--max-queue", HUGE),
            ("--timeout-s", "inf"),
            ("--timeout-s", "nan"),
            ("--max-body-bytes", HUGE),
        ]
    ],
    (["edge", "sweep", "--seed", "-3"], "--seed"),
    (["edge", "collect", "--seed", "-3"], "--seed"),
    (["edge", "collect", "--cache", "{file}/answers.jsonl"], "{file}"),
    (["edge", "collect", "--in-process", "--threads", HUGE], "--threads"),
    (["edge", "ask", "Which?", "--option", "a", "--timeout-s", "nan"], "--timeout-s"),
]


def make_paths(tmp: Path) -> dict[str, str]:
    """The files the bad invocations point at (all tiny), in ``tmp``."""
    from gatelab.exits import ViT, ViTConfig, vit_early_exit
    from gatelab.exits.backbones import save_backbone, save_exits

    file = tmp / "a_file"
    file.write_text("not a folder\n")
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 20)
    table = np.column_stack([x, 2 * x + 0.1 * rng.standard_normal(20)])
    out = {"tmp": tmp, "file": file, "nodata": tmp / "no-data"}
    for name, rows in {
        "csv": table,
        "csv_nan": np.where(np.arange(40).reshape(20, 2) == 7, np.nan, table),
        "csv_inf": np.where(np.arange(40).reshape(20, 2) == 8, np.inf, table),
        "csv_one_row": table[:1],
    }.items():
        out[name] = tmp / f"{name}.csv"
        np.savetxt(out[name], rows, delimiter=",", header="x,y", comments="")
    out["csv_text"] = tmp / "csv_text.csv"
    out["csv_text"].write_text("x,y\n1,abc\n2,3\n")
    out["csv_one_column"] = tmp / "csv_one_column.csv"
    out["csv_one_column"].write_text("y\n1\n2\n3\n")
    # a real tiny backbone and exits checkpoint, then truncated copies (with and without JSON)
    torch.manual_seed(0)
    cfg = ViTConfig(patch_size=7, d_model=8, n_heads=2, n_blocks=2, mlp_ratio=2)
    vit = ViT(cfg)
    out["backbone"] = save_backbone(vit, tmp / "backbone.safetensors", {"model": cfg.__dict__})
    meta = {"backbone": str(out["backbone"]), "lam": 0.5}
    out["exits"] = save_exits(vit_early_exit(vit), tmp / "jei.safetensors", meta)
    for name, source in (
        ("trunc_backbone", "backbone"),
        ("trunc_exits", "exits"),
        ("trunc_alone", "backbone"),
        ("trunc_exits_alone", "exits"),
    ):
        blob = out[source].read_bytes()
        out[name] = tmp / f"{name}.safetensors"
        out[name].write_bytes(blob[: len(blob) * 3 // 4])
        if "alone" not in name:
            beside = json.loads(out[source].with_suffix(".json").read_text())
            out[name].with_suffix(".json").write_text(json.dumps(beside))
    # run folders of another configuration: gmoe-rates/, pretrain/ and a JEI-DNN run folder
    out["other"] = tmp / "other"
    for folder in ("gmoe-rates", "pretrain", ""):
        (out["other"] / folder).mkdir(parents=True, exist_ok=True)
        (out["other"] / folder / "config.json").write_text('{"seed": 12345}\n')
    out["garbage"] = tmp / "garbage.safetensors"
    out["garbage"].write_bytes(b"\x00\x01not safetensors at all")
    save_file({"w": torch.zeros(1)}, tmp / "plain.safetensors")
    return {k: str(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return make_paths(tmp_path_factory.mktemp("bad"))


def outcome(argv: list[str], capsys) -> tuple[str, int | None, str]:
    """``(kind, exit code, stderr)``; kind is ``traceback``, ``exit 0``, ``exit N`` or ``ok``."""
    try:
        code = main(argv)
    except SystemExit as done:  # pragma: no cover - main returns codes, never exits
        code = done.code
    except Exception as error:  # noqa: BLE001 - a traceback is what the test looks for
        return "traceback", None, f"{type(error).__name__}: {error}"
    err = capsys.readouterr().err.strip()
    if "Traceback" in err:
        return "traceback", code, err
    if code != 2:
        return f"exit {code}", code, err
    return "ok", code, err


@pytest.mark.parametrize(("argv", "hint"), CASES, ids=[" ".join(c[0][:3]) for c in CASES])
def test_bad_value_is_one_line_exit_2_naming_the_culprit(argv, hint, paths, capsys, monkeypatch):
    monkeypatch.setenv("GATELAB_FASHION_MNIST", paths["nodata"])
    argv = [a.format(**paths) for a in argv]
    kind, code, err = outcome(argv, capsys)
    assert kind == "ok", f"{argv}: {kind}: {err}"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gatelab: error:"), err
    assert hint.format(**paths).lower() in err.lower(), (
        f"{argv}: message does not name {hint}: {err}"
    )
