"""Fashion-MNIST from IDX files, and the disjoint, seeded splits JEI-DNN needs.

The official 60k training images are split once, by a seeded permutation, into four disjoint
parts: ``backbone`` (trains the ViT), ``exits`` (trains the inference and gating modules),
``val`` (early stopping, gate class weights, baseline thresholds) and ``calib`` (conformal
calibration). The official 10k test images are the ``test`` split. No split is reused for another
purpose: the authors' public code missed its conformal coverage because its calibration data
overlapped the backbone's training data.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

DEFAULT_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def fashion_mnist_root() -> Path:
    """The data folder: ``$GATELAB_FASHION_MNIST`` if set, else Debian's package folder."""
    return Path(os.environ.get("GATELAB_FASHION_MNIST", DEFAULT_FASHION_MNIST))


FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST pixel mean / std on [0, 1] (training set)


class Split(NamedTuple):
    """Images ``(N, 1, 28, 28)`` uint8 and labels ``(N,)`` int64."""

    images: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class SplitConfig:
    """Sizes of the disjoint parts of the 60k training images (the rest goes to ``backbone``)."""

    n_exits: int = 6000  # trains IMs and GMs (never seen by the backbone)
    n_val: int = 3000  # early stopping, gate class weights, baseline thresholds
    n_calib: int = 3000  # conformal calibration only
    seed: int = 0  # the permutation that assigns images to parts

    def __post_init__(self) -> None:
        for name in ("n_exits", "n_val", "n_calib"):
            if getattr(self, name) < 1:
                raise ValueError(f"SplitConfig.{name} must be >= 1, got {getattr(self, name)}")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    magic = int.from_bytes(raw[:4], "big")
    n_dims = magic & 0xFF
    if magic >> 8 != 0x08 or n_dims not in (1, 3):
        raise ValueError(f"{path}: not an IDX uint8 file (magic {magic:#x})")
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(n_dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * n_dims).reshape(shape)


def load_fashion_mnist(root: str | Path = DEFAULT_FASHION_MNIST) -> dict[str, Split]:
    """Read the official ``train`` (60k) and ``test`` (10k) parts from the IDX ``.gz`` files.

    Raises:
        FileNotFoundError: a file is missing; the message names it and how to install the data.
    """
    root = Path(root)
    out = {}
    for part, (images_file, labels_file) in FILES.items():
        for name in (images_file, labels_file):
            if not (root / name).is_file():
                raise FileNotFoundError(
                    f"Fashion-MNIST file {root / name} not found; install it with "
                    "`apt-get install dataset-fashion-mnist` (or `make setup`), or point "
                    "GATELAB_FASHION_MNIST / --data at a folder holding the four IDX .gz files"
                )
        images = torch.from_numpy(_read_idx(root / images_file).copy()).unsqueeze(1)
        labels = torch.from_numpy(_read_idx(root / labels_file).astype(np.int64))
        out[part] = Split(images, labels)  # (N, 1, 28, 28) uint8, (N,)
    return out


def make_splits(data: dict[str, Split], cfg: SplitConfig = SplitConfig()) -> dict[str, Split]:
    """Disjoint ``backbone``/``exits``/``val``/``calib`` parts of ``train`` plus ``test``."""
    train = data["train"]
    n = len(train.labels)
    if cfg.n_exits + cfg.n_val + cfg.n_calib >= n:
        raise ValueError(
            f"make_splits: exits + val + calib = {cfg.n_exits + cfg.n_val + cfg.n_calib} must be "
            f"below the {n} training images, to leave some for the backbone"
        )
    order = torch.from_numpy(np.random.default_rng(cfg.seed).permutation(n))
    sizes = {"exits": cfg.n_exits, "val": cfg.n_val, "calib": cfg.n_calib}
    parts, start = {}, 0
    for name, size in sizes.items():
        index = order[start : start + size]
        parts[name] = Split(train.images[index], train.labels[index])
        start += size
    parts["backbone"] = Split(train.images[order[start:]], train.labels[order[start:]])
    parts["test"] = data["test"]
    return parts


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 1, 28, 28)`` -> float32 standardised with the Fashion-MNIST mean and std."""
    return (images.float() / 255.0 - MEAN) / STD
