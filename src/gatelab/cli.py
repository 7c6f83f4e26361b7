"""The ``gatelab`` command: ``version``, ``demo``, ``reproduce`` and one group per system."""

from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

import gatelab
from gatelab import _cli
from gatelab import demo as demo_lib
from gatelab.comm.cli import app as comm_app
from gatelab.edge.cli import app as edge_app
from gatelab.exits.cli import app as exits_app
from gatelab.gmoe.cli import app as gmoe_app
from gatelab.moe.cli import app as moe_app
from gatelab.report import write_report

app = typer.Typer(
    name="gatelab",
    help="Learned gating under explicit budgets.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

app.add_typer(gmoe_app, name="gmoe")
app.add_typer(moe_app, name="moe")
app.add_typer(exits_app, name="exits")
app.add_typer(edge_app, name="edge")
app.add_typer(comm_app, name="comm")

DemoSystem = Enum("DemoSystem", {name: name for name in demo_lib.SYSTEMS}, type=str)
ReproducibleSystem = Enum(
    "ReproducibleSystem", {name: name for name in demo_lib.SYSTEMS if name != "gates"}, type=str
)


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=_cli.stderr(), show_path=False)],
    )


@app.command()
def version() -> None:
    """Print gatelab's version and the torch build it runs on."""
    import torch

    cuda = torch.version.cuda or "none"
    typer.echo(f"gatelab {gatelab.__version__} (torch {torch.__version__}, cuda {cuda})")


@app.command()
def demo(
    full: Annotated[
        bool,
        typer.Option(
            "--full/--quick",
            help="--quick (default): the tour, under 10 minutes on 2 cores. --full: the studies "
            "behind the documented tables (hours).",
        ),
    ] = False,
    runs_dir: Annotated[
        Path,
        typer.Option(help="Where experiments write their folders.", callback=_cli.writable_dir),
    ] = Path("runs"),
    only: Annotated[
        list[DemoSystem] | None, typer.Option(help="Run only these systems (repeatable).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Run every system demo, then write runs/demo/report.md and runs/demo/summary.json."""
    quick = not full
    chosen = {s.value for s in only or []}
    names = [n for n in demo_lib.SYSTEMS if not chosen or n in chosen]
    results = []
    with _cli.user_errors(), _cli.progress_bar("demo", total=len(names)) as update:
        update(0, len(names))
        for i, name in enumerate(names):
            results.append(demo_lib.run_system_demo(name, runs_dir, quick))
            update(i + 1, len(names))
    out = runs_dir / "demo"
    mode = "quick (the tour)" if quick else "full"
    report = write_report(results, out, header=f"gatelab {gatelab.__version__}, {mode} mode")
    summary = {
        "quick": quick,
        "seconds": sum(r.seconds for r in results),
        "systems": {r.name: {"seconds": r.seconds, **r.metrics} for r in results},
        "report": str(report),
    }
    _cli.write_json(out / "summary.json", summary)
    if as_json:
        typer.echo(json.dumps(summary["systems"], indent=2))
        return
    table = Table(title=f"gatelab demo -> {report}")
    for column in ("system", "seconds", "headline metrics"):
        table.add_column(column)
    for r in results:
        headline = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in list(r.metrics.items())[:4]
        )
        table.add_row(r.title, f"{r.seconds:.1f}", headline)
    Console().print(table)


def _reproducer(system: str):
    """The ``reproduce`` module of one system, imported explicitly."""
    if system == "gmoe":
        from gatelab.gmoe import reproduce as module
    elif system == "moe":
        from gatelab.moe import reproduce as module
    elif system == "exits":
        from gatelab.exits import reproduce as module
    elif system == "edge":
        from gatelab.edge import reproduce as module
    elif system == "comm":
        from gatelab.comm import reproduce as module
    else:  # the Enum admits nothing else
        raise ValueError(f"unknown system {system!r}")
    return module


@app.command()
def reproduce(
    system: Annotated[ReproducibleSystem, typer.Argument(help="Whose tables to regenerate.")],
    jobs: Annotated[
        int, typer.Option(min=1, max=256, help="Runs in parallel (one thread each).")
    ] = 1,
    runs_dir: Annotated[
        Path, typer.Option(help="Where the runs and tables go.", callback=_cli.writable_dir)
    ] = Path("runs"),
    seeds: Annotated[
        int | None, typer.Option(min=1, help="Seeds per configuration (comm only).")
    ] = None,
    small: Annotated[
        bool, typer.Option(help="The reduced grid that fits a 2-core machine (comm only).")
    ] = False,
    task: Annotated[
        list[str] | None,
        typer.Option(
            help="Only this task of the table, e.g. predator_prey-memory (comm only; repeatable)."
        ),
    ] = None,
) -> None:
    """Run exactly the configurations behind docs/SYSTEM.md's tables (resumable), then write them.

    The tables land in runs/reproduce/SYSTEM/tables.md (and tables.json); work already in
    runs_dir is reused, so an interrupted reproduce continues where it stopped.
    """
    if seeds is not None and system.value != "comm":
        raise _cli.fail(f"--seeds: reproduce {system.value} has a fixed number of seeds")
    if small and system.value != "comm":
        raise _cli.fail(f"--small: reproduce {system.value} has one grid")
    if task and system.value != "comm":
        raise _cli.fail(f"--task: reproduce {system.value} has no tasks to choose from")
    module = _reproducer(system.value)
    options = {} if seeds is None else {"seeds": seeds}
    if small:
        options["small"] = True
    if task:
        options["tasks"] = tuple(task)
    expected = module.EXPECTED_TIME
    if hasattr(module, "expected_time"):  # comm: depends on the seeds and tasks asked for
        with _cli.user_errors():
            expected = module.expected_time(jobs=jobs, runs_dir=runs_dir, **options)
    _cli.stderr().print(
        f"gatelab reproduce {system.value}: expected time {expected}",
        highlight=False,
        markup=False,
    )
    with _cli.user_errors(), _cli.progress_bar(f"reproduce {system.value}") as update:
        tables = module.reproduce(runs_dir, jobs=jobs, progress=update, **options)
    typer.echo(Path(tables).read_text())
    _cli.stderr().print(f"tables written to {tables}", highlight=False, markup=False)


def main(argv: list[str] | None = None) -> int:
    """Entry point: usage errors become one line on stderr with exit code 2, never a traceback."""
    try:
        code = app(args=argv, standalone_mode=False)  # an Exit raised inside returns its code
    except typer.TyperException as error:  # click-level usage errors (bad flag, bad value)
        if error.format_message():  # empty for `gatelab` alone, which has printed the help
            _cli.stderr().print(
                f"gatelab: error: {error.format_message()}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        return getattr(error, "exit_code", 2)
    except typer.Exit as done:
        return done.exit_code
    except typer.Abort:
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
