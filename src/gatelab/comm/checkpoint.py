"""Checkpoints as safetensors, with ``config.json`` beside them.

``model.safetensors`` holds the weights, graph logits and value normaliser;
``optim.safetensors`` both Adam states. The update count is in the files' metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gatelab.comm.model import CommConfig, CommFormer


def save_checkpoint(run_dir: Path, model, value_norm, opt_theta, opt_alpha, update: int) -> Path:
    """Write the model (+ value normaliser) and optimiser states; returns the model file."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"value_norm.{k}": v.cpu() for k, v in value_norm.state_dict().items()})
    path = run_dir / "model.safetensors"
    save_file(tensors, path, metadata={"update": str(update)})
    optim = {}
    for name, opt in (("theta", opt_theta), ("alpha", opt_alpha)):
        if opt is None:
            continue
        for pid, state in opt.state_dict()["state"].items():
            for key, value in state.items():
                optim[f"{name}.{pid}.{key}"] = torch.as_tensor(value).cpu().contiguous()
    save_file(optim, run_dir / "optim.safetensors", metadata={"update": str(update)})
    return path


def _split(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_checkpoint(run_dir: Path, model, value_norm, opt_theta, opt_alpha) -> int:
    """Restore everything :func:`save_checkpoint` wrote; returns the update it was taken at."""
    tensors = load_file(run_dir / "model.safetensors")
    model.load_state_dict(_split(tensors, "model."))
    value_norm.load_state_dict(_split(tensors, "value_norm."))
    optim = load_file(run_dir / "optim.safetensors")
    for name, opt in (("theta", opt_theta), ("alpha", opt_alpha)):
        if opt is None:
            continue
        state: dict[int, dict] = {}
        for key, value in _split(optim, f"{name}.").items():
            pid, field = key.split(".", 1)
            state.setdefault(int(pid), {})[field] = value
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    return checkpoint_update(run_dir)


def checkpoint_update(run_dir: str | Path) -> int:
    """The update count stored in ``run_dir/model.safetensors``'s metadata."""
    with open(Path(run_dir) / "model.safetensors", "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    return int(header["__metadata__"]["update"])


def load_model(path: str | Path, device: str = "cpu") -> tuple[CommFormer, dict]:
    """Load a trained model from ``.../model.safetensors`` (its ``config.json`` beside it).

    Returns:
        The model in eval mode and the ``train`` section of the config (a dict).

    Raises:
        FileNotFoundError: the checkpoint or its config.json is missing.
        ValueError: the file is not a gatelab.comm checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    config = path.parent / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"config.json not found beside the checkpoint: {config}")
    payload = json.loads(config.read_text())
    if "model" not in payload or "train" not in payload:
        raise ValueError(f"{config} is not a gatelab.comm config (needs 'model' and 'train')")
    model = CommFormer(CommConfig(**payload["model"]))
    try:
        tensors = load_file(path, device=device)
    except Exception as error:  # safetensors raises its own error type for a foreign file
        raise ValueError(f"cannot read {path} as safetensors: {error}") from None
    model.load_state_dict(_split(tensors, "model."))
    return model.to(device).eval(), payload["train"]
