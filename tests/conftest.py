"""Shared fixtures: tiny IDX datasets written by the tests, and the real Fashion-MNIST in a temp data dir."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("WANDB_MODE", "offline")  # never reach for a W&B server from tests
os.environ.setdefault("WANDB_SILENT", "true")

from text_recognizer.data.mnist import FashionMNIST  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (magic 2051 for images (N, 28, 28), 2049 for labels (N,))."""
    magic = 2051 if array.ndim == 3 else 2049
    header = np.array([magic, *array.shape], dtype=">i4")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.tobytes() + array.astype(np.uint8).tobytes())


def write_tiny_mnist(data_dir: Path, folder: str = "MNIST", n_train: int = 120, n_test: int = 40, seed: int = 0) -> Path:
    """Tiny learnable IDX files: each class is a bright horizontal band at its own rows. Returns the raw folder."""
    rng = np.random.default_rng(seed)
    raw = data_dir / folder / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 40, (n, 28, 28))
        for i, label in enumerate(labels):
            images[i, 2 + 2 * label : 4 + 2 * label, :] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return raw


@pytest.fixture
def tiny_data_dir(tmp_path: Path) -> Path:
    """A data dir holding tiny MNIST and FashionMNIST raw files (120 train / 40 test images)."""
    for folder in ("MNIST", "FashionMNIST"):
        write_tiny_mnist(tmp_path / "data", folder)
    return tmp_path / "data"


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Fashion-MNIST (Debian's dataset-fashion-mnist), verified and placed once per session."""
    if not FashionMNIST.debian_dir.is_dir():
        pytest.fail("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist")
    data_dir = tmp_path_factory.mktemp("fashion")
    FashionMNIST.ensure_raw_files(data_dir)
    return data_dir
