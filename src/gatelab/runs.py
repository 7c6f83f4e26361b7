"""Run folders, shared by every system: ``config.json``, ``metrics.jsonl`` and checkpoints.

A run folder ``runs/<name>/`` holds

- ``config.json`` — what the run was asked to do (written atomically);
- ``metrics.jsonl`` — one JSON record per line, each with a ``step``; on resume the records
  past the checkpoint's step are dropped, so a resumed run never logs a step twice;
- ``*.safetensors`` checkpoints — model weights **and** optimizer state in one file, written
  atomically (temporary file, fsync, then ``os.replace``), whose metadata carries the config, the
  step, any small JSON state (a controller, a schedule) and a SHA-256 of the tensor bytes, so a
  checkpoint moved alone still loads and a torn one is detected. The one before it is kept as
  ``<stem>.prev.safetensors``: a torn or corrupt checkpoint falls back to it with a warning.

:func:`start_run` claims a folder: a rerun of the same configuration resumes, a different one is
refused (naming ``--fresh``), so nothing is silently overwritten. :func:`fault_point` lets tests
kill a job at a named point (``GATELAB_FAULT=name:n``) to prove that resuming loses nothing.

Optimizer state is stored as tensors, not pickled: each ``state[param_id][key]`` becomes the
tensor ``<prefix>.<param_id>.<key>``, and the ``param_groups`` go to the metadata as JSON.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

CONFIG = "config.json"
METRICS = "metrics.jsonl"
FAULT_ENV = "GATELAB_FAULT"
FAULT_EXIT_CODE = 77
FORMAT = "gatelab-checkpoint-1"

log = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    """Plain JSON: NaN/inf become null, tuples lists, numpy/torch scalars numbers, paths str."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _jsonable(value.item())
    if hasattr(value, "item") and callable(value.item):
        return _jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


_fault_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Die here (``os._exit(77)``) at the n-th hit when ``GATELAB_FAULT=name:n`` is set.

    A test hook for kill-anywhere tests: the process vanishes as under ``kill -9`` (no cleanup,
    no ``finally``), so a test can prove that a rerun resumes to the uninterrupted result.
    """
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    target, _, count = wanted.rpartition(":")
    if target != name:
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if str(_fault_hits[name]) == count:
        os._exit(FAULT_EXIT_CODE)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(
    path: str | Path,
    data: bytes,
    *,
    keep_previous: Path | None = None,
    fault: str | None = None,
) -> Path:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never half.

    The bytes go to a temporary file beside ``path``, are fsynced, then renamed over it; a
    temporary file left by a writer killed earlier is removed.

    Args:
        path: the file to (re)place.
        data: its new contents.
        keep_previous: where the old file goes (moved) before the new one takes its name.
        fault: a prefix for the :func:`fault_point` names ``<fault>-write`` (half the bytes
            written) and ``<fault>-rotate`` (old file moved away, new one not yet in place).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    for stale in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        stale.unlink(missing_ok=True)  # torn by a writer that was killed
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data[: len(data) // 2])
            if fault:
                fault_point(f"{fault}-write")
            handle.write(data[len(data) // 2 :])
            handle.flush()
            os.fsync(handle.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
            if fault:
                fault_point(f"{fault}-rotate")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, payload: Any) -> Path:
    """Indented JSON (NaN/inf as null), written atomically."""
    text = json.dumps(_jsonable(payload), indent=2) + "\n"
    return atomic_write_bytes(path, text.encode())


def read_json(path: str | Path) -> Any:
    """Read a JSON file; a missing or corrupt file is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


# --------------------------------------------------------------------------- metrics.jsonl


def append_metrics(run_dir: str | Path, record: Mapping[str, Any]) -> None:
    """Append one record (must carry ``step``) to ``run_dir/metrics.jsonl``."""
    if "step" not in record:
        raise ValueError("a metrics record needs a 'step'")
    path = Path(run_dir) / METRICS
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(_jsonable(dict(record))) + "\n")


def read_jsonl(path: str | Path, what: str = "JSON record") -> list[dict]:
    """The records of a JSONL file (none if it does not exist); ``what`` names them in errors.

    An unterminated last line that is not JSON was torn by a writer killed mid-line: it is
    skipped with a warning naming the file and line.

    Raises:
        ValueError: any other line is not JSON (the file is corrupt), naming file and line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) and not text.endswith("\n"):
                log.warning("%s:%d: torn last line skipped", path, number)
                break
            raise ValueError(f"{path}:{number}: not a {what}") from None
    return records


def drop_torn_tail(path: str | Path) -> None:
    """Cut an unterminated last line (a writer killed mid-line), so an append starts afresh.

    Cut even when the fragment parses: the writer died before finishing the record's line.
    Only the last byte is read unless the file does end mid-line.
    """
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        data = handle.read()
        keep = data.rfind(b"\n") + 1
        number = data.count(b"\n") + 1
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())
    log.warning("%s:%d: torn last line cut", path, number)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of ``run_dir/metrics.jsonl`` (see :func:`read_jsonl`)."""
    return read_jsonl(Path(run_dir) / METRICS)


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Keep only the records with ``step <= step`` (resume from a checkpoint taken at ``step``)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


# --------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` read: the metadata and any tensors no module claimed."""

    config: dict
    step: int
    state: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def _optimizer_tensors(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    """``state[pid][key]`` as tensors ``optim.<name>.<pid>.<key>``; the param groups as JSON."""
    saved = optimizer.state_dict()
    tensors = {}
    for pid, state in saved["state"].items():
        for key, value in state.items():
            tensors[f"optim.{name}.{pid}.{key}"] = torch.as_tensor(value).detach().cpu().clone()
    return tensors, _jsonable(saved["param_groups"])


def previous_path(path: str | Path) -> Path:
    """Where the checkpoint before ``path`` is kept: ``<stem>.prev.safetensors`` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def checkpoint_exists(path: str | Path) -> bool:
    """Whether ``path`` or the previous checkpoint kept beside it exists (there is a resume)."""
    return Path(path).exists() or previous_path(path).exists()


def _split_safetensors(blob: bytes) -> tuple[int, bytes]:
    """``(header length, tensor bytes)`` of a serialised safetensors file."""
    header = int.from_bytes(blob[:8], "little")
    return header, blob[8 + header :]


def save_checkpoint(
    path: str | Path,
    *,
    config: Mapping[str, Any],
    step: int,
    modules: Mapping[str, torch.nn.Module] | None = None,
    optimizers: Mapping[str, torch.optim.Optimizer | None] | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
    state: Mapping[str, Any] | None = None,
) -> Path:
    """Write one safetensors checkpoint atomically: weights, optimizer state and metadata.

    The file it replaces is kept as :func:`previous_path`, so a checkpoint torn by the disk or
    a kill still leaves a good one to resume from. The metadata holds the SHA-256 and length of
    the tensor bytes, which :func:`load_checkpoint` checks.

    Args:
        path: the ``.safetensors`` file.
        config: the run's configuration (JSON-able), stored in the metadata.
        step: the step (update, epoch) the checkpoint was taken at.
        modules: ``{name: module}``; module ``m``'s tensor ``w`` is stored as ``m.w``.
        optimizers: ``{name: optimizer}`` (``None`` entries skipped), stored as tensors.
        tensors: further raw tensors, stored under their own names.
        state: small JSON-able state (a budget controller, a schedule).
    """
    payload: dict[str, torch.Tensor] = {}
    groups: dict[str, list] = {}
    for name, module in (modules or {}).items():
        for key, value in module.state_dict().items():
            payload[f"{name}.{key}"] = value.detach().cpu().contiguous()
    for name, optimizer in (optimizers or {}).items():
        if optimizer is not None:
            optim_tensors, groups[name] = _optimizer_tensors(name, optimizer)
            payload.update(optim_tensors)
    for key, value in (tensors or {}).items():
        payload[key] = value.detach().cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "config": json.dumps(_jsonable(dict(config))),
        "step": str(int(step)),
        "state": json.dumps(_jsonable(dict(state or {}))),
        "param_groups": json.dumps(groups),
    }
    # the tensor bytes do not depend on the metadata: serialise, hash them, serialise with the hash
    _, data = _split_safetensors(save(payload, metadata=metadata))
    metadata["data_sha256"] = hashlib.sha256(data).hexdigest()
    metadata["data_bytes"] = str(len(data))
    blob = save(payload, metadata=metadata)
    return atomic_write_bytes(path, blob, keep_previous=previous_path(path), fault="checkpoint")


def read_checkpoint_metadata(path: str | Path) -> dict[str, str]:
    """The raw safetensors metadata of ``path`` without reading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 0 < size < 100_000_000:
                raise ValueError
            header = json.loads(handle.read(size))
        return dict(header.get("__metadata__") or {})
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{path}: not a safetensors file (truncated or corrupt)") from None


def _verified_tensors(path: Path, device: str | torch.device) -> tuple[dict, dict]:
    """``(metadata, tensors)`` of one checkpoint file whose length and checksum agree."""
    metadata = read_checkpoint_metadata(path)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: not a gatelab checkpoint (no gatelab metadata)")
    blob = path.read_bytes()
    _, data = _split_safetensors(blob)
    if "data_sha256" in metadata:  # checkpoints written before checksums load unchecked
        if str(len(data)) != metadata.get("data_bytes"):
            raise ValueError(
                f"{path}: truncated ({len(data)} of {metadata.get('data_bytes')} tensor bytes)"
            )
        if hashlib.sha256(data).hexdigest() != metadata["data_sha256"]:
            raise ValueError(f"{path}: corrupt (checksum of the tensor bytes does not match)")
    try:
        tensors = {k: v.to(device) for k, v in load(blob).items()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: cannot read tensors ({error})") from None
    return metadata, tensors


def load_checkpoint(
    path: str | Path,
    *,
    modules: Mapping[str, torch.nn.Module] | None = None,
    optimizers: Mapping[str, torch.optim.Optimizer | None] | None = None,
    device: str | torch.device = "cpu",
    strict: bool = True,
) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`, loading the given modules in place.

    If ``path`` is missing, truncated or corrupt but the previous checkpoint beside it is good,
    that one is loaded with a :class:`RuntimeWarning` naming both (the returned ``step`` says
    which step the caller resumes from).

    Returns:
        The config, step and state from the metadata, and the tensors no module or optimizer
        claimed (e.g. raw tensors saved with ``tensors=``).

    Raises:
        FileNotFoundError: neither the file nor a previous checkpoint exists.
        ValueError: the file (and its previous one) is truncated, corrupt or not a gatelab
            checkpoint.
    """
    path = Path(path)
    previous = previous_path(path)
    try:
        metadata, tensors = _verified_tensors(path, device)
    except (FileNotFoundError, ValueError) as error:
        if not previous.is_file():
            raise
        try:
            metadata, tensors = _verified_tensors(previous, device)
        except (FileNotFoundError, ValueError):
            raise error from None
        warnings.warn(
            f"{error}; loaded the previous checkpoint {previous} "
            f"(step {metadata.get('step', '?')}) instead",
            RuntimeWarning,
            stacklevel=2,
        )
    for name, module in (modules or {}).items():
        prefix = f"{name}."
        own = {k[len(prefix) :]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)}
        module.load_state_dict(own, strict=strict)
    groups = json.loads(metadata.get("param_groups", "{}"))
    for name, optimizer in (optimizers or {}).items():
        if optimizer is None:
            continue
        prefix = f"optim.{name}."
        state: dict[int, dict] = {}
        for key in [k for k in tensors if k.startswith(prefix)]:
            pid, slot = key[len(prefix) :].split(".", 1)
            state.setdefault(int(pid), {})[slot] = tensors.pop(key)
        if name not in groups:
            raise ValueError(f"{path}: holds no state for optimizer {name!r}")
        optimizer.load_state_dict({"state": state, "param_groups": groups[name]})
    return Checkpoint(
        config=json.loads(metadata.get("config", "{}")),
        step=int(metadata.get("step", 0)),
        state=json.loads(metadata.get("state", "{}")),
        tensors=tensors,
    )


# --------------------------------------------------------------------------- run folders


def _differences(saved: Any, wanted: Any, prefix: str = "") -> list[str]:
    """The dotted keys on which two JSON configs differ."""
    if isinstance(saved, Mapping) and isinstance(wanted, Mapping):
        keys = sorted(set(saved) | set(wanted))
        return [d for k in keys for d in _differences(saved.get(k), wanted.get(k), f"{prefix}{k}.")]
    return [] if saved == wanted else [prefix.rstrip(".") or "(the whole config)"]


def start_run(
    run_dir: str | Path,
    config: Mapping[str, Any],
    *,
    fresh: bool = False,
    ignore: Iterable[str] = (),
) -> bool:
    """Claim ``run_dir`` for ``config``; whether a run of the same configuration is there to resume.

    A rerun of a command on its run folder resumes; one with another configuration is refused,
    so a finished run is never silently overwritten. ``fresh`` empties the folder first.

    Args:
        run_dir: the run folder (created if missing).
        config: the run's JSON-able configuration; written to ``config.json``.
        fresh: start over, deleting what the folder holds.
        ignore: dotted config keys that may change between a run and its resume (``train.steps``).

    Returns:
        ``True`` when ``run_dir`` holds a run of the same configuration (the caller loads its
        checkpoint if there is one), ``False`` for a new run.

    Raises:
        ValueError: the folder holds another configuration's run (or files of no run), naming
            ``--fresh``.
    """
    run_dir, ignore = Path(run_dir), set(ignore)
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / CONFIG
    if config_path.exists():
        saved = read_json(config_path)
        if not config_matches(saved, config, ignore):
            ignore = set(ignore)
            keys = [
                k
                for k in _differences(_jsonable(saved), _jsonable(dict(config)))
                if k not in ignore
            ]
            raise ValueError(
                f"{run_dir}: holds a run with another configuration (differs in: "
                f"{', '.join(keys[:6])}); rerun with --fresh to replace it or choose another folder"
            )
        atomic_write_json(config_path, config)  # keeps the ignored keys (e.g. more steps) current
        return True
    if any(run_dir.iterdir()):
        raise ValueError(
            f"{run_dir}: is not empty and holds no {CONFIG}; rerun with --fresh to replace it "
            "or choose another folder"
        )
    atomic_write_json(config_path, config)
    return False


def config_matches(saved: Mapping[str, Any], wanted: Mapping[str, Any], ignore: Iterable[str]):
    """Whether two flat-or-nested configs agree on every key except the dotted ``ignore`` keys."""

    def strip(config: Mapping[str, Any], prefix: str = "") -> dict:
        out = {}
        for key, value in config.items():
            dotted = f"{prefix}{key}"
            if dotted in ignore:
                continue
            out[key] = strip(value, f"{dotted}.") if isinstance(value, Mapping) else value
        return out

    ignore = set(ignore)
    return strip(_jsonable(dict(saved))) == strip(_jsonable(dict(wanted)))
