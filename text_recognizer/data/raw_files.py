"""The raw files of MNIST and Fashion-MNIST: fetched (a local copy, else torchvision's download with its checksums),
checked, and decoded once into normalized numpy arrays.

No Lightning, and torch (for the split's permutation) and torchvision (for the download) only when used: a search's
driver checks and decodes the data with this module, in a thread while Ray starts. The data modules (mnist.py)
are these classes with Lightning's DataModule added.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from text_recognizer.facts import FASHION_MNIST_MD5, PART
from text_recognizer.util import UserError

# The arrays a data module is made of: normalized float32 images (N, C, H, W) and int64 labels,
# keyed x_train, y_train, x_val, y_val, x_test, y_test.
Arrays = dict[str, np.ndarray]

TRAIN_FRACTION = 55 / 60  # 55,000 of the official 60,000 training images; the rest is the validation set
SPLIT_SEED = 42
IDX_FILES = {  # raw file -> IDX magic number (images 2051, labels 2049)
    "train-images-idx3-ubyte": 2051,
    "train-labels-idx1-ubyte": 2049,
    "t10k-images-idx3-ubyte": 2051,
    "t10k-labels-idx1-ubyte": 2049,
}


def md5(path: Path) -> str:
    """The md5 of a file's bytes."""
    return hashlib.md5(path.read_bytes()).hexdigest()


def check_idx(path: Path, magic: int) -> int:
    """Raise UserError unless `path` is a complete IDX file with the expected magic number; return its item count."""
    if not path.is_file():
        raise UserError(f"missing data file {path}")
    header = np.fromfile(path, dtype=">i4", count=4)
    dims = 3 if magic == 2051 else 1
    if len(header) < 1 + dims or header[0] != magic:
        raise UserError(f"corrupt data file {path}: not an IDX file (magic {magic}); delete it and run again")
    expected = 4 * (1 + dims) + int(np.prod(header[1 : 1 + dims]))
    if path.stat().st_size != expected:
        raise UserError(
            f"corrupt data file {path}: {path.stat().st_size} bytes, expected {expected} (truncated?); delete it and run again"
        )
    return int(header[1])


def read_idx(path: Path) -> np.ndarray:
    """A checked IDX file of unsigned bytes (images or labels) as an array of its shape: what torchvision's MNIST
    reads into its .data and .targets."""
    header = np.fromfile(path, dtype=">i4", count=4)
    dims = 3 if header[0] == 2051 else 1
    return np.fromfile(path, dtype=np.uint8, offset=4 * (1 + dims)).reshape([int(n) for n in header[1 : 1 + dims]])


def copy_verified(source: Path, raw: Path, md5s: dict[str, str]) -> bool:
    """Decompress `source/<name>.gz` into `raw/<name>` when every decompressed file has its known md5."""
    if not all((source / f"{name}.gz").is_file() for name in md5s):
        return False
    raw.mkdir(parents=True, exist_ok=True)
    for name, expected in md5s.items():
        try:
            data = gzip.decompress((source / f"{name}.gz").read_bytes())
        except (OSError, EOFError, zlib.error) as error:
            raise UserError(f"corrupt data file {source / name}.gz: cannot decompress ({type(error).__name__})") from None
        if hashlib.md5(data).hexdigest() != expected:
            raise UserError(f"corrupt data file {source / name}.gz: checksum mismatch after decompression")
        partial = raw / f"{name}{PART}"
        partial.write_bytes(data)
        partial.replace(raw / name)  # atomic: a killed copy never leaves a truncated file under the real name
    return True


class MNISTFiles:
    """MNIST's raw files: 55,000 / 5,000 train/val split with a fixed seed, the official 10,000 test images."""

    dataset_name = "MNIST"  # torchvision's dataset class, and the folder its download writes: <data_dir>/MNIST/raw
    mean, std = 0.1307, 0.3081
    # md5 of the decompressed raw files, where known: they catch a corrupt file of the right size
    raw_md5: dict[str, str] = {}

    @classmethod
    def torchvision_dataset(cls) -> Any:
        """torchvision's class of this dataset: its download, mirrors and listed md5s (imported only to download)."""
        import torchvision

        return getattr(torchvision.datasets, cls.dataset_name)

    @classmethod
    def raw_folder(cls, data_dir: Path) -> Path:
        return Path(data_dir) / cls.dataset_name / "raw"

    @classmethod
    def place_local_copy(cls, raw: Path) -> bool:
        """Copy the raw files from a local source (none for MNIST); True when they are now in `raw`."""
        return False

    @classmethod
    def ensure_raw_files(cls, data_dir: Path) -> Path:
        """Make sure the raw IDX files are in `data_dir`: already there, a local copy, or the real download."""
        raw = cls.raw_folder(data_dir)
        if not all((raw / name).is_file() for name in IDX_FILES) and not cls.place_local_copy(raw):
            try:
                dataset = cls.torchvision_dataset()
                dataset(str(data_dir), train=True, download=True)
                dataset(str(data_dir), train=False, download=True)
            except Exception as error:  # torchvision raises RuntimeError/URLError/OSError for every network failure
                names = ", ".join(IDX_FILES)
                raise UserError(
                    f"cannot get {cls.dataset_name}: download failed ({type(error).__name__}) and the files {names} "
                    f"are not in {raw}; place them there (or their .gz) and run again"
                ) from None
        counts = {}
        for name, magic in IDX_FILES.items():
            counts[name] = check_idx(raw / name, magic)
            if name in cls.raw_md5 and md5(raw / name) != cls.raw_md5[name]:
                raise UserError(f"corrupt data file {raw / name}: checksum mismatch; delete it and run again")
            if name not in cls.raw_md5 and (raw / f"{name}.gz").is_file():
                cls.check_against_download(raw / name)
        for split in ("train", "t10k"):
            if counts[f"{split}-images-idx3-ubyte"] != counts[f"{split}-labels-idx1-ubyte"]:
                raise UserError(f"corrupt data files in {raw}: {split} images and labels differ in number")
        return raw

    @classmethod
    def check_against_download(cls, path: Path) -> None:
        """Check `path` against the .gz torchvision downloaded beside it (md5 of the .gz, then the same bytes)."""
        gz = path.with_name(f"{path.name}.gz")
        expected = dict(cls.torchvision_dataset().resources).get(gz.name)
        if expected and md5(gz) != expected:
            raise UserError(f"corrupt data file {gz}: checksum mismatch; delete it and run again")
        if hashlib.md5(gzip.decompress(gz.read_bytes())).hexdigest() != md5(path):
            raise UserError(f"corrupt data file {path}: checksum mismatch with {gz.name}; delete it and run again")

    @classmethod
    def load_arrays(cls, data_dir: Path) -> Arrays:
        """Check the IDX files, then decode them once, normalize once, split 55,000 / 5,000 with a fixed seed."""
        cls.ensure_raw_files(data_dir)
        return cls.decode_arrays(data_dir)

    @classmethod
    def decode_arrays(cls, data_dir: Path) -> Arrays:
        """load_arrays without the checks, for files ensure_raw_files has checked (the search decodes while Ray starts).
        In torch, as the data modules did through torchvision's MNIST: the same split and the same float32 values."""
        import torch

        raw, arrays = cls.raw_folder(data_dir), {}
        for split in ("train", "t10k"):
            images = torch.from_numpy(read_idx(raw / f"{split}-images-idx3-ubyte"))
            x = ((images.float() / 255.0 - cls.mean) / cls.std).unsqueeze(1)
            y = torch.from_numpy(read_idx(raw / f"{split}-labels-idx1-ubyte")).long()
            if split == "train":
                order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
                size = round(len(x) * TRAIN_FRACTION)
                arrays["x_train"], arrays["y_train"] = x[order[:size]], y[order[:size]]
                arrays["x_val"], arrays["y_val"] = x[order[size:]], y[order[size:]]
            else:
                arrays["x_test"], arrays["y_test"] = x, y
        return {key: value.contiguous().numpy() for key, value in arrays.items()}


class FashionMNISTFiles(MNISTFiles):
    """Fashion-MNIST's raw files: the MNIST format and splits; Debian's dataset-fashion-mnist files when installed."""

    dataset_name = "FashionMNIST"
    mean, std = 0.2860, 0.3530
    debian_dir = Path("/usr/share/datasets/fashion-mnist")
    raw_md5 = FASHION_MNIST_MD5  # Debian recompressed the .gz files: check the decompressed bytes

    @classmethod
    def place_local_copy(cls, raw: Path) -> bool:
        return copy_verified(cls.debian_dir, raw, cls.raw_md5)


# the raw files of each --data_class (flags.DATA_FLAGS names them too)
RAW_FILES: dict[str, type[MNISTFiles]] = {"MNIST": MNISTFiles, "FashionMNIST": FashionMNISTFiles}
