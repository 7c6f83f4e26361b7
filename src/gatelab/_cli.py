"""What every ``cli.py`` shares: one-line user errors, a progress bar on stderr, JSON output.

Only CLI modules import this file; library code never prints (house rule 15).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gatelab import runs

Callback = Callable[[int, int], None]


def stderr() -> Console:
    """A Rich console on stderr: logs, progress and errors never mix with results on stdout."""
    return Console(stderr=True)


def check_device(value: str) -> str:
    """A ``--device`` callback: the name parses as a torch device that this machine has."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise typer.BadParameter(
            f"{value!r} is not a torch device (e.g. cpu, cuda, cuda:1)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise typer.BadParameter("CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise typer.BadParameter(
                f"{value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise typer.BadParameter("MPS is not available on this machine (use --device cpu)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise typer.BadParameter(f"{value!r}: gatelab runs on cpu, cuda or mps")
    return value


DeviceOption = Annotated[
    str, typer.Option(help="torch device: cpu, cuda, cuda:N or mps.", callback=check_device)
]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``gatelab: error: message`` as one line on stderr and return the Exit to raise.

    Code 2 is a usage error (bad value, missing input file); 1 is a run that failed.
    """
    stderr().print(f"gatelab: error: {message}", highlight=False, markup=False, soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's input-validation errors into one line on stderr and exit code 2.

    ``ValueError``/``TypeError`` are what gatelab raises for bad values and shapes, and
    ``FileNotFoundError`` for a missing input; ``ConnectionError``/``TimeoutError`` mean an
    unreachable server (exit 1, the run failed). Anything else is a bug and keeps its traceback.
    """
    try:
        yield
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise fail(str(error).splitlines()[0] if str(error) else type(error).__name__) from None
    except (ConnectionError, TimeoutError) as error:
        raise fail(str(error).splitlines()[0] or type(error).__name__, code=1) from None


@contextmanager
def progress_bar(description: str, total: int | None = None) -> Iterator[Callback]:
    """A Rich progress bar on stderr; yields the ``(done, total)`` callback library code takes."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=stderr(), transient=False) as bar:
        task = bar.add_task(description, total=total)

        def update(done: int, new_total: int) -> None:
            bar.update(task, completed=done, total=new_total)

        yield update


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON (NaN/inf become null), atomically, creating the folder."""
    return runs.atomic_write_json(path, payload)
