"""What every ``cli.py`` shares: one-line user errors, a progress bar on stderr, JSON output.

Only CLI modules import this file; library code never prints (house rule 15).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gatelab import runs

Callback = Callable[[int, int], None]
PATH_ERRORS = (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)


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


def finite_float(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Callable[[float | None], float | None]:
    """A typer callback for a float option: finite and, if given, within ``low``/``high``.

    Click's float type accepts ``nan``, ``inf`` and ``-inf``, and its ranges let NaN through (every
    comparison with NaN is false), so every float option of every CLI takes this callback::

        lam: Annotated[float, typer.Option(callback=_cli.finite_float(0))] = 0.5

    Bounds are inclusive unless ``low_open`` / ``high_open``. ``None`` (an optional option left
    out) passes. The message reads ``Invalid value for '--lam': must be a finite number >= 0,
    got nan``.
    """
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    wanted = "a finite number" + (" " + " and ".join(parts) if parts else "")

    def check(value: float | None) -> float | None:
        if value is None:
            return None
        inside = math.isfinite(value)
        if inside and low is not None:
            inside = value > low if low_open else value >= low
        if inside and high is not None:
            inside = value < high if high_open else value <= high
        if not inside:
            raise typer.BadParameter(f"must be {wanted}, got {value:g}")
        return value

    return check


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (``.`` for a relative path's root)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_folder(path: Path) -> None:
    """Raise ``typer.BadParameter`` unless ``path`` is, or can be created as, a writable folder."""
    existing = _nearest_existing(path.absolute())
    if not existing.is_dir():
        raise typer.BadParameter(
            f"{path}: {existing} is a file, not a folder, so nothing can be written there"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise typer.BadParameter(f"{path}: {existing} is not writable")


def writable_dir(value: Path | None) -> Path | None:
    """A typer callback for an output folder (``--out``, ``--runs-dir``): creatable and writable.

    Checked when the command line is parsed, before any work, not after an hour of it.
    """
    if value is not None:
        _check_folder(Path(value))
    return value


def writable_file(value: Path | None) -> Path | None:
    """A typer callback for an output file (``--json``): not a folder, and its folder writable."""
    if value is not None:
        if Path(value).is_dir():
            raise typer.BadParameter(f"{value} is a folder, not a file")
        _check_folder(Path(value).parent)
    return value


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
    ``FileNotFoundError`` for a missing input; a path that cannot be written (permission, a file
    where a folder should be) is the user's to fix too. ``ConnectionError``/``TimeoutError`` mean
    an unreachable server (exit 1, the run failed). Anything else is a bug and keeps its traceback.
    """
    try:
        yield
    except (ValueError, TypeError, FileNotFoundError, *PATH_ERRORS) as error:
        raise fail(str(error).splitlines()[0] if str(error) else type(error).__name__) from None
    except (ConnectionError, TimeoutError) as error:
        raise fail(str(error).splitlines()[0] or type(error).__name__, code=1) from None


@contextmanager
def progress_bar(description: str, total: int | None = None) -> Iterator[Callback]:
    """A Rich progress bar on stderr; yields the ``(done, total)`` callback library code takes.

    The bar appears at the first update, so a job refused before any work (a bad file, a run
    folder of another configuration) prints its one-line error alone.
    """
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    bar = Progress(*columns, console=stderr(), transient=False)
    task = bar.add_task(description, total=total)
    started = False

    def update(done: int, new_total: int) -> None:
        nonlocal started
        if not started:
            bar.start()
            started = True
        bar.update(task, completed=done, total=new_total)

    try:
        yield update
    finally:
        if started:
            bar.stop()


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON (NaN/inf become null), atomically, creating the folder."""
    return runs.atomic_write_json(path, payload)
