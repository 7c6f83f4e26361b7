import gzip

import numpy as np
import pytest
import torch

from gatelab.exits import SplitConfig, load_fashion_mnist, make_splits


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(root, n_train=400, n_test=50, seed=0):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return root


def test_idx_reader_and_disjoint_seeded_splits(tmp_path):
    fake_fashion_mnist(tmp_path)
    data = load_fashion_mnist(tmp_path)
    assert data["train"].images.shape == (400, 1, 28, 28) and data["test"].labels.shape == (50,)
    cfg = SplitConfig(n_exits=60, n_val=40, n_calib=30, seed=3)
    splits = make_splits(data, cfg)
    sizes = {k: len(v.labels) for k, v in splits.items()}
    assert sizes == {"exits": 60, "val": 40, "calib": 30, "backbone": 270, "test": 50}
    # disjoint: identify images by their bytes (random images are unique)
    keys = {
        name: {bytes(img.numpy()) for img in splits[name].images}
        for name in ("exits", "val", "calib", "backbone")
    }
    names = list(keys)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not keys[a] & keys[b], (a, b)
    again = make_splits(data, cfg)
    assert torch.equal(again["calib"].images, splits["calib"].images)
    other = make_splits(data, SplitConfig(n_exits=60, n_val=40, n_calib=30, seed=4))
    assert not torch.equal(other["calib"].images, splits["calib"].images)


def test_missing_data_names_path_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nowhere")


def test_split_sizes_must_leave_backbone_data(tmp_path):
    fake_fashion_mnist(tmp_path, n_train=100)
    with pytest.raises(ValueError, match="backbone"):
        make_splits(load_fashion_mnist(tmp_path), SplitConfig(n_exits=60, n_val=30, n_calib=20))
