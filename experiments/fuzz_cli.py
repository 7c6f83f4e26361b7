"""The CLI fuzz campaign: every option of every command given bad values, outcome counted.

For each command of ``gatelab`` (walked from the click tree) and each of its options, a bad value
of the option's type is passed with everything else left at its default: integers ``0``, ``-3``,
``abc``, a 20-digit number; floats ``nan``, ``inf``, ``-inf``, ``-1``, ``abc``; paths a missing
file, a path under a regular file and a truncated safetensors file; choices ``nope``; ``--device
cuda`` / ``tpu``. Each invocation runs in a forked child of one process that imported gatelab once
(cwd a fresh temporary folder, so defaults like ``runs/`` land there), through ``gatelab.cli.main``
as the console script runs it, with a time limit.

Outcomes: ``refused`` (exit 2, one line on stderr, no traceback), ``traceback`` (any ``Traceback``
in the output), ``exit0`` (accepted and finished), ``running`` (still working at the limit: it
started a job), ``other`` (another exit code or a multi-line error). Values that are legitimately
valid for an option (``0`` for a seed, ``-1`` for a signed quantity) show up as ``exit0`` or
``running``; the report lists every non-refused case for a reader to judge.

    python experiments/fuzz_cli.py [--limit-s 8] [--out runs/fuzz_cli]
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import signal
import sys
import tempfile
import time
import typing
from pathlib import Path

import torch
import typer

from gatelab.cli import app, main

INT_VALUES = ["0", "-3", "abc", "99999999999999999999"]
FLOAT_VALUES = ["nan", "inf", "-inf", "-1", "abc"]
PATH_VALUES = ["{tmp}/missing/file", "{file}/under", "{truncated}"]
DEVICE_VALUES = ["cuda", "tpu"]
SKIP_OPTIONS = {"--help", "--install-completion", "--show-completion"}
# what the commands with required arguments get besides the bad value: valid where that is cheap
# (a CSV, a system), a truncated file for checkpoints (so nothing long can start)
REQUIRED = {
    ("reproduce",): ["gmoe"],
    ("gmoe", "fit"): ["{csv}"],
    ("comm", "eval"): ["--checkpoint", "{truncated}"],
    ("exits", "eval"): ["--checkpoint", "{truncated}"],
    ("edge", "ask"): [
        "Which is a fruit?",
        *[f"--option={o}" for o in ("apple", "car", "sky", "run")],
    ],
    ("edge", "serve"): ["--model", "smollm2-135m"],
}


def commands(group, prefix: tuple[str, ...] = ()):
    """Every leaf command with its argv prefix (typer carries its own click: duck-typed)."""
    if hasattr(group, "commands"):
        for name, sub in sorted(group.commands.items()):
            yield from commands(sub, (*prefix, name))
    else:
        yield prefix, group


def _base_type(annotation):
    """``int`` of ``int | None`` or ``list[int]``; the annotation itself otherwise."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return _base_type(args[0]) if args else annotation


def bad_values(param) -> list[str]:
    """The bad values tried for an option, by its annotated type."""
    kind = _base_type(param.type_descriptor.annotation)
    if "--device" in param.opts:
        return DEVICE_VALUES
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return ["nope"]
    if kind is bool:
        return []
    if kind is int:
        return INT_VALUES
    if kind is float:
        return FLOAT_VALUES
    if isinstance(kind, type) and issubclass(kind, Path):
        return PATH_VALUES
    return []


def cases() -> list[tuple[list[str], str]]:
    """``(argv, option)`` for every option of every command and each of its bad values."""
    root = typer.main.get_command(app)
    out = []
    for prefix, command in commands(root):
        for param in command.params:
            if param.param_type_name != "option" or param.is_flag:
                continue
            flag = next((o for o in param.opts if o.startswith("--")), param.opts[0])
            if flag in SKIP_OPTIONS:
                continue
            for value in bad_values(param):
                out.append(([*prefix, *REQUIRED.get(prefix, []), flag, value], flag))
    return out


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_case(argv: list[str], workdir: Path, limit_s: float) -> dict:
    """Run ``argv`` in a forked child within ``limit_s`` seconds; its outcome and stderr."""
    out_path, err_path = workdir / "stdout", workdir / "stderr"
    pid = os.fork()
    if pid == 0:  # the child: run the command as the console script would
        os.setpgid(0, 0)  # its own process group: worker processes it starts die with it
        os.chdir(workdir)
        fd_out, fd_err = (
            os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
            os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        )
        os.dup2(fd_out, 1)
        os.dup2(fd_err, 2)
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        try:
            code = main(argv)
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 1
        except BaseException:  # noqa: BLE001 - an escaped exception is what we count
            import traceback

            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    start = time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() - start > limit_s:
            _kill_group(pid)
            os.waitpid(pid, 0)
            code = None
            break
        time.sleep(0.05)
    _kill_group(pid)  # workers a finished command left behind
    text = out_path.read_text(errors="replace") + err_path.read_text(errors="replace")
    err_lines = [line for line in err_path.read_text(errors="replace").splitlines() if line]
    if "Traceback" in text:
        outcome = "traceback"
    elif code is None:
        outcome = "running"
    elif code == 0:
        outcome = "exit0"
    elif code == 2 and len(err_lines) == 1:
        outcome = "refused"
    else:
        outcome = "other"
    return {"argv": argv, "outcome": outcome, "code": code, "stderr": err_lines[:3]}


def main_campaign() -> None:
    """Every case, then counts to ``<out>/summary.json`` and every result to ``results.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit-s", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=Path("runs/fuzz_cli"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # forked children inherit one thread (no pool to deadlock)
    results = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "file").write_text("a regular file\n")
        (tmp / "truncated.safetensors").write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
        fill = {"{tmp}": str(tmp), "{file}": str(tmp / "file")}
        fill["{truncated}"] = str(tmp / "truncated.safetensors")
        (tmp / "data.csv").write_text("x,y\n" + "".join(f"{i / 10},{i % 3}\n" for i in range(30)))
        fill["{csv}"] = str(tmp / "data.csv")
        todo = cases()
        for i, (argv, flag) in enumerate(todo):
            for key, value in fill.items():
                argv = [a.replace(key, value) for a in argv]
            workdir = Path(tempfile.mkdtemp(dir=tmp))
            result = run_case(argv, workdir, args.limit_s)
            result["named"] = any(flag in line or argv[-1] in line for line in result["stderr"])
            results.append(result)
            print(f"[{i + 1}/{len(todo)}] {result['outcome']:9s} {' '.join(argv)}", flush=True)
    counts: dict[str, int] = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    summary = {
        "invocations": len(results),
        "counts": counts,
        "refused_naming_culprit": sum(r["outcome"] == "refused" and r["named"] for r in results),
        "seconds": round(time.monotonic() - started, 1),
        "not_refused": [r for r in results if r["outcome"] != "refused"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "not_refused"}, indent=2))
    for r in summary["not_refused"]:
        print(r["outcome"], " ".join(r["argv"]), "|", " / ".join(r["stderr"])[:200])


if __name__ == "__main__":
    main_campaign()
