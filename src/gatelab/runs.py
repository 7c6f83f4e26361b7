"""Run folders, shared by every system: ``config.json``, ``metrics.jsonl`` and checkpoints.

A run folder ``runs/<name>/`` holds

- ``config.json`` — what the run was asked to do (written atomically);
- ``metrics.jsonl`` — one JSON record per line, each with a ``step``; on resume the records
  past the checkpoint's step are dropped, so a resumed run never logs a step twice;
- ``*.safetensors`` checkpoints — model weights **and** optimizer state in one file, written
  atomically (temporary file, then ``os.replace``), whose metadata carries the config, the step
  and any small JSON state (a controller, a schedule), so a checkpoint moved alone still loads.

Optimizer state is stored as tensors, not pickled: each ``state[param_id][key]`` becomes the
tensor ``<prefix>.<param_id>.<key>``, and the ``param_groups`` go to the metadata as JSON.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

CONFIG = "config.json"
METRICS = "metrics.jsonl"

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


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
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
        "format": "gatelab-checkpoint-1",
        "config": json.dumps(_jsonable(dict(config))),
        "step": str(int(step)),
        "state": json.dumps(_jsonable(dict(state or {}))),
        "param_groups": json.dumps(groups),
    }
    return atomic_write_bytes(path, save(payload, metadata=metadata))


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


def load_checkpoint(
    path: str | Path,
    *,
    modules: Mapping[str, torch.nn.Module] | None = None,
    optimizers: Mapping[str, torch.optim.Optimizer | None] | None = None,
    device: str | torch.device = "cpu",
    strict: bool = True,
) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`, loading the given modules in place.

    Returns:
        The config, step and state from the metadata, and the tensors no module or optimizer
        claimed (e.g. raw tensors saved with ``tensors=``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is truncated, corrupt or not a gatelab checkpoint.
    """
    path = Path(path)
    metadata = read_checkpoint_metadata(path)
    if metadata.get("format") != "gatelab-checkpoint-1":
        raise ValueError(f"{path}: not a gatelab checkpoint (no gatelab metadata)")
    try:
        tensors = load_file(path, device=str(device))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: cannot read tensors ({error})") from None
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
