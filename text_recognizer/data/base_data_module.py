"""BaseDataModule: datasets decoded once into normalized in-memory tensors, batches cut from them."""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from text_recognizer.data.raw_files import Arrays
from text_recognizer.flags import BATCH_SIZE, NUM_WORKERS, data_dir  # the flags: flags.add_data_flags

EVAL_BATCH_SIZE = 4096  # evaluation has no backward pass: big batches cut the per-step overhead


class BatchLoader:
    """Serves (x, y) batches sliced from in-memory tensors: no per-sample Python work, no collate."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0) -> None:
        self.x, self.y, self.batch_size, self.shuffle, self.seed = x, y, batch_size, shuffle, seed
        self.epoch = 0  # each epoch's order is a function of (seed, epoch), so a resumed run sees the same order

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = state["epoch"]

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            self.epoch += 1
            order = torch.randperm(len(self.x), generator=generator).to(self.x.device)
            for start in range(0, len(self.x), self.batch_size):
                index = order[start : start + self.batch_size]
                yield self.x[index], self.y[index]
        else:
            for start in range(0, len(self.x), self.batch_size):
                yield self.x[start : start + self.batch_size], self.y[start : start + self.batch_size]


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """Wrap an array without copying it (arrays from Ray's object store are read-only and shared)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


class BaseDataModule(pl.LightningDataModule):
    """Base for data modules: flags, config() and in-memory loaders. Subclasses implement load_arrays()."""

    dims: tuple[int, ...] = ()
    output_dims: tuple[int, ...] = (1,)
    mapping: list[Any] = []

    def __init__(self, args: argparse.Namespace | None = None, arrays: Arrays | None = None) -> None:
        super().__init__()
        self.args = vars(args) if args is not None else {}
        self.batch_size = self.args.get("batch_size", BATCH_SIZE)
        self.num_workers = self.args.get("num_workers", NUM_WORKERS)
        self.data_dir = data_dir(self.args.get("data_dir"))
        self.seed = self.args.get("seed", 0)
        self.arrays = arrays  # given by a search, which decodes the data once per node
        self.tensors: dict[str, torch.Tensor] = {}

    def config(self) -> dict[str, Any]:
        """What a model (and a prediction) may know about its data: input dims, output dims, the class mapping and
        the normalization of the inputs (x / 255 - mean) / std. Plain values: checkpoints keep them."""
        normalization = {"mean": float(getattr(self, "mean", 0.0)), "std": float(getattr(self, "std", 1.0))}
        return {"input_dims": self.dims, "output_dims": self.output_dims, "mapping": self.mapping, "normalization": normalization}

    @classmethod
    def load_arrays(cls, data_dir: Path) -> Arrays:
        """Decode and normalize the whole dataset: keys x_train, y_train, x_val, y_val, x_test, y_test."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        if self.arrays is None:
            self.arrays = self.load_arrays(self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.tensors:
            return
        if self.arrays is None:
            self.arrays = self.load_arrays(self.data_dir)
        device = torch.device("cpu")
        if self.trainer is not None and self.trainer.strategy.root_device.type == "cuda" and self.num_workers == 0:
            device = self.trainer.strategy.root_device  # tiny datasets live on the GPU: no host-to-device copies
        self.tensors = {key: as_tensor(value).to(device) for key, value in self.arrays.items()}

    def _loader(self, split: str, shuffle: bool) -> Any:
        x, y = self.tensors[f"x_{split}"], self.tensors[f"y_{split}"]
        batch_size = self.batch_size if shuffle else max(self.batch_size, EVAL_BATCH_SIZE)
        if self.num_workers > 0:
            return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers)
        return BatchLoader(x, y, batch_size, shuffle=shuffle, seed=self.seed)

    def train_dataloader(self) -> Any:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> Any:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> Any:
        return self._loader("test", shuffle=False)

    def __repr__(self) -> str:
        sizes = {key: len(value) for key, value in (self.arrays or {}).items() if key.startswith("x_")}
        return f"{type(self).__name__}(dims={self.dims}, mapping={len(self.mapping)} classes, sizes={sizes})"
