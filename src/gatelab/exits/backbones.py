"""Prepared backbones and checkpoint files: everything gatelab.exits reads from or writes to disk.

A *prepared* backbone (:class:`Prepared`) is a frozen network wrapped with exits, together with
its data splits, every split's cached frozen features, the FLOPs of leaving at each exit and
the input transform. Two backbones ship:

- the Fashion-MNIST ViT (:func:`prepare`), read from ``backbone.safetensors``;
- the ImageNet EfficientNet-Lite0 (:func:`prepare_efficientnet`), read from a run folder of
  ``gatelab exits efficientnet`` (its ``config.json`` and fine-tuned ``head.safetensors``).

Files (all written atomically, none pickled):

- ``backbone.safetensors``: ViT weights, its ``backbone.json`` beside it and in the metadata;
- ``features_<digest>.safetensors``: a ViT's cached features, keyed by backbone file and splits;
- ``<name>.safetensors``: JEI-DNN exits (IM and gate weights); ``<name>.json`` beside it and the
  same JSON in the metadata (kind, architecture, backbone, training config, lambda), so a
  checkpoint moved alone still loads.

Resumable training state (optimiser, step) goes through :mod:`gatelab.runs` instead.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

from gatelab.exits.data import Split, SplitConfig, load_fashion_mnist, make_splits, normalise
from gatelab.exits.efficientnet import efficientnet_early_exit, fmnist_to_effnet
from gatelab.exits.inference import ExitFlops, exit_flops
from gatelab.exits.model import EarlyExitModel, vit_early_exit
from gatelab.exits.vit import ViT, ViTConfig
from gatelab.runs import atomic_write_bytes, atomic_write_json, read_json

BACKBONE_KIND = "gatelab.exits.vit-backbone"
EXITS_KIND = "gatelab.exits.jei-dnn"
CACHE_SPLITS = ("exits", "val", "calib", "test")  # the splits the exits ever read
HEAD_FILE = "head.safetensors"  # EfficientNet's fine-tuned fc (exit checkpoints hold IMs, gates)
META_KEY = "gatelab"  # safetensors metadata key holding the JSON beside a file


# --------------------------------------------------------------------------- features


class FeatureCache(NamedTuple):
    """Frozen-backbone outputs for one split: per-exit pooled features, head logits, labels."""

    feats: list[torch.Tensor]  # L-1 tensors (N, D_l)
    head_logits: torch.Tensor  # (N, C)
    labels: torch.Tensor  # (N,)

    def index(self, index: torch.Tensor) -> FeatureCache:
        """The rows ``index`` of every tensor."""
        return FeatureCache(
            [f[index] for f in self.feats], self.head_logits[index], self.labels[index]
        )

    def to(self, device: str | torch.device) -> FeatureCache:
        """A copy on ``device``."""
        return FeatureCache(
            [f.to(device) for f in self.feats], self.head_logits.to(device), self.labels.to(device)
        )


@torch.no_grad()
def extract_features(
    model: EarlyExitModel, split: Split, transform, batch_size: int = 500, device: str = "cpu"
) -> FeatureCache:
    """Run the frozen backbone once over a split (``transform`` maps uint8 images to inputs)."""
    model.eval()
    feats, heads = [], []
    for start in range(0, len(split.labels), batch_size):
        x = transform(split.images[start : start + batch_size]).to(device)
        f, h = model.features(x)
        feats.append([t.float().cpu() for t in f])
        heads.append(h.float().cpu())
    return FeatureCache(
        [torch.cat(parts) for parts in zip(*feats, strict=True)], torch.cat(heads), split.labels
    )


def save_features(caches: dict[str, FeatureCache], path: Path) -> None:
    """All splits in one safetensors file: ``<split>.feats.<l>``, ``<split>.head``, ``.labels``."""
    tensors = {}
    for name, cache in caches.items():
        tensors |= {f"{name}.feats.{ell}": f.contiguous() for ell, f in enumerate(cache.feats)}
        tensors |= {f"{name}.head": cache.head_logits.contiguous(), f"{name}.labels": cache.labels}
    atomic_write_bytes(path, save_bytes(tensors))


def load_features(path: Path) -> dict[str, FeatureCache]:
    """The caches written by :func:`save_features`."""
    tensors = load_file(path)
    caches = {}
    for name in dict.fromkeys(k.split(".")[0] for k in tensors):
        n_feats = sum(k.startswith(f"{name}.feats.") for k in tensors)
        feats = [tensors[f"{name}.feats.{ell}"] for ell in range(n_feats)]
        caches[name] = FeatureCache(feats, tensors[f"{name}.head"], tensors[f"{name}.labels"])
    return caches


class Prepared(NamedTuple):
    """A wrapped backbone with its splits, cached features and per-exit FLOPs."""

    model: EarlyExitModel
    splits: dict[str, Split]
    caches: dict[str, FeatureCache]
    flops: ExitFlops
    transform: Callable[[torch.Tensor], torch.Tensor]
    backbone_path: Path


# --------------------------------------------------------------------------- the ViT


def save_backbone(model: ViT, path: Path, meta: dict) -> Path:
    """ViT weights as safetensors; ``meta`` (kind, config, accuracies) beside it and inside it."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"kind": BACKBONE_KIND} | meta
    atomic_write_bytes(path, save_bytes(state, metadata={META_KEY: json.dumps(meta)}))
    atomic_write_json(path.with_suffix(".json"), meta)
    return path


def _complete_header(path: Path) -> dict:
    """The JSON header of a safetensors file whose length is the one the header describes.

    Raises:
        ValueError: naming the file, if it is truncated (a copy cut short, a full disk) or not
            safetensors at all, before any work is built on it.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        try:
            if not 0 < length <= size - 8:
                raise ValueError
            header = json.loads(handle.read(length))
            end = max(
                (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
            )
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ValueError(f"{path}: not a safetensors file (truncated or corrupt)") from None
    if 8 + length + end != size:
        raise ValueError(
            f"{path}: truncated or corrupt ({size} bytes, its header describes {8 + length + end})"
        )
    return header


def _meta(path: Path) -> dict:
    """The JSON beside ``path``, else the one in its safetensors metadata (a file moved alone).

    The file itself must be complete (:func:`_complete_header`) either way.
    """
    header = _complete_header(path)
    beside = path.with_suffix(".json")
    if beside.is_file():
        return read_json(beside)
    text = (header.get("__metadata__") or {}).get(META_KEY)
    if text is None:
        raise FileNotFoundError(f"config {beside} not found beside {path.name}")
    return json.loads(text)


def load_backbone(path: Path, device: str = "cpu") -> tuple[ViT, dict]:
    """Load ``backbone.safetensors`` (and its ``backbone.json``); refuse other kinds of file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no backbone at {path}; run `gatelab exits pretrain` first")
    meta = _meta(path)
    if meta.get("kind") != BACKBONE_KIND:
        raise ValueError(f"{path} is not a gatelab.exits ViT backbone (kind={meta.get('kind')!r})")
    model = ViT(ViTConfig(**meta["model"]))
    model.load_state_dict(load_file(path))
    return model.to(device).eval(), meta


def _digest(path: Path, extra: str) -> str:
    h = hashlib.sha256(path.read_bytes())
    h.update(extra.encode())
    return h.hexdigest()[:16]


def prepare(
    backbone_path: Path,
    data_root: Path,
    split_cfg: SplitConfig | None = None,
    device: str = "cpu",
    cache_dir: Path | None = None,
    gate_context: bool = False,
    seed: int = 0,
) -> Prepared:
    """Load splits and the ViT backbone, count FLOPs per exit, cache each split's features.

    ``seed`` fixes the initialisation of the IMs and gates. The features are cached in
    ``cache_dir`` (``None``: not cached), keyed by the backbone's bytes and ``split_cfg``.
    """
    split_cfg = split_cfg or SplitConfig()
    vit, _ = load_backbone(backbone_path, device)
    torch.manual_seed(seed)
    model = vit_early_exit(vit, gate_context).to(device)
    splits = make_splits(load_fashion_mnist(data_root), split_cfg)
    flops = exit_flops(model, normalise(splits["test"].images[:1]).to(device))
    key = _digest(Path(backbone_path), json.dumps(dataclasses.asdict(split_cfg)))
    cache_file = None if cache_dir is None else Path(cache_dir) / f"features_{key}.safetensors"
    if cache_file is not None and cache_file.exists():
        caches = load_features(cache_file)
    else:
        caches = {
            name: extract_features(model, splits[name], normalise, device=device)
            for name in CACHE_SPLITS
        }
        if cache_file is not None:
            save_features(caches, cache_file)
    return Prepared(model, splits, caches, flops, normalise, Path(backbone_path))


# --------------------------------------------------------------------------- EfficientNet-Lite0


@torch.no_grad()
def extract_stage_features(
    model: EarlyExitModel, split: Split, resolution: int, batch: int = 250
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Pooled features after stages 1..6 ``(N, C_l)`` and the head's pooled input ``(N, 1280)``.

    The head's input rather than its logits, because the new ``fc`` is trained on it.
    """
    feats, pooled = [], []
    for i in range(0, len(split.labels), batch):
        state = model.stem(fmnist_to_effnet(split.images[i : i + batch], resolution))
        f = []
        for ell, block in enumerate(model.blocks):
            state = block(state)
            if ell < model.n_exits - 1:
                f.append(model.feature_fn(state))
        feats.append(f)
        pooled.append(model.head.pooled(state))
    return [torch.cat(p) for p in zip(*feats, strict=True)], torch.cat(pooled)


def first_n(split: Split, n: int) -> Split:
    """The first ``n`` images of a split (the splits are already shuffled by seed)."""
    return Split(split.images[:n], split.labels[:n])


def prepared_efficientnet(
    model: EarlyExitModel, parts: dict[str, Split], raw: dict, resolution: int, label: Path
) -> Prepared:
    """Caches (head logits from the model's ``fc``), transform and FLOPs of extracted splits."""
    with torch.no_grad():
        caches = {
            k: FeatureCache(feats, model.head.fc(pooled), parts[k].labels)
            for k, (feats, pooled) in raw.items()
        }
    transform = functools.partial(fmnist_to_effnet, resolution=resolution)
    flops = exit_flops(model, transform(parts["test"].images[:1]))
    return Prepared(model, parts, caches, flops, transform, label)


def save_head(model: EarlyExitModel, run_dir: Path) -> Path:
    """The fine-tuned ``fc`` of an EfficientNet run as ``<run_dir>/head.safetensors``."""
    state = {k: v.contiguous() for k, v in model.head.fc.state_dict().items()}
    return atomic_write_bytes(Path(run_dir) / HEAD_FILE, save_bytes(state))


def prepare_efficientnet(
    run_dir: Path, data_root: Path, split_names: Sequence[str] = ("calib", "test")
) -> Prepared:
    """A finished ``gatelab exits efficientnet`` run, ready for :func:`~gatelab.exits.evaluate`.

    Reads the run's ``config.json`` and fine-tuned head; extracts the features of
    ``split_names`` (by default the calibration and test splits, the only ones evaluation
    reads; ``test`` is always included). Load a checkpoint's exits into ``.model``.
    """
    config_path, head_path = Path(run_dir) / "config.json", Path(run_dir) / HEAD_FILE
    for path in (config_path, head_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: an EfficientNet checkpoint needs its run folder "
                "(`gatelab exits efficientnet` writes it)"
            )
    saved = read_json(config_path)
    resolution, split_cfg = saved["resolution"], SplitConfig(**saved["splits"])
    splits = make_splits(load_fashion_mnist(data_root), split_cfg)
    names = dict.fromkeys((*split_names, "test"))  # ordered, without repeats
    parts = {k: first_n(splits[k], saved[f"n_{k}"]) for k in names}
    model = efficientnet_early_exit(resolution).eval()
    model.head.fc.load_state_dict(load_file(head_path))
    raw = {k: extract_stage_features(model, part, resolution) for k, part in parts.items()}
    return prepared_efficientnet(model, parts, raw, resolution, Path(run_dir))


# --------------------------------------------------------------------------- exit checkpoints


def _exit_state(model: EarlyExitModel) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith(("ims.", "gates."))}


def save_exits(model: EarlyExitModel, path: Path, meta: dict) -> Path:
    """Write the IM and gate weights and ``meta`` (+ kind, arch), beside the file and inside it."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in _exit_state(model).items()}
    full = {"kind": EXITS_KIND, "arch": model.arch, "n_exits": model.n_exits}
    full = json.loads(json.dumps(full | {"gate_context": model.gate_context} | meta, default=str))
    atomic_write_bytes(path, save_bytes(state, metadata={META_KEY: json.dumps(full)}))
    atomic_write_json(path.with_suffix(".json"), full)
    return path


def read_exits_meta(path: Path) -> dict:
    """The JSON of a JEI-DNN checkpoint (beside it, else inside it); refuse anything else."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found (expected a .safetensors file)")
    meta = _meta(path)
    if meta.get("kind") != EXITS_KIND:
        raise ValueError(
            f"{path} is not a JEI-DNN exits checkpoint (kind={meta.get('kind')!r}); "
            "train one with `gatelab exits train`"
        )
    return meta


def load_exits(model: EarlyExitModel, path: Path) -> dict:
    """Load IM and gate weights into ``model``; the architectures must match."""
    meta = read_exits_meta(path)
    if meta.get("arch") != model.arch or meta.get("n_exits") != model.n_exits:
        raise ValueError(
            f"{path} was trained for arch={meta.get('arch')!r} with {meta.get('n_exits')} exits, "
            f"but the backbone is arch={model.arch!r} with {model.n_exits} exits"
        )
    state = load_bytes(Path(path).read_bytes())
    own = _exit_state(model)
    bad = [k for k in own if k not in state or state[k].shape != own[k].shape]
    if bad or set(state) - set(own):
        raise ValueError(
            f"{path}: weights do not match this architecture (first mismatch {bad[:1]})"
        )
    model.load_state_dict(state, strict=False)
    return meta
