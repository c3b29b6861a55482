"""Data modules: config, splits, normalization, BatchLoader, and the checks on raw files."""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_idx, write_tiny_mnist

from text_recognizer.data.base_data_module import EVAL_BATCH_SIZE, BatchLoader
from text_recognizer.data.mnist import MNIST, FashionMNIST
from text_recognizer.data.raw_files import IDX_FILES, copy_verified
from text_recognizer.util import UserError

UNREACHABLE = ["http://127.0.0.1:9/"]  # the discard port: a download attempt fails at once, without any network


def read_idx(path: Path) -> np.ndarray:
    """The uint8 payload of an IDX file, shaped by its header (read independently of the package)."""
    raw = path.read_bytes()
    ndim = raw[3]
    shape = np.frombuffer(raw[4 : 4 + 4 * ndim], dtype=">i4")
    return np.frombuffer(raw[4 + 4 * ndim :], dtype=np.uint8).reshape(shape)


def data_args(data_dir: Path, **overrides: object) -> argparse.Namespace:
    return argparse.Namespace(**{"data_dir": str(data_dir), "batch_size": 16, "num_workers": 0, "seed": 0, **overrides})


# --- config and splits ---------------------------------------------------------------------------------------------


class TinyFashionMNIST(FashionMNIST):
    """FashionMNIST without the md5 checks of the real files, so that it reads the tiny ones."""

    raw_md5: dict[str, str] = {}


@pytest.mark.parametrize("cls", [MNIST, TinyFashionMNIST])
def test_split_sizes_and_fixed_seed(tiny_data_dir: Path, cls: type[MNIST]) -> None:
    arrays = cls.load_arrays(tiny_data_dir)
    assert set(arrays) == {"x_train", "y_train", "x_val", "y_val", "x_test", "y_test"}
    # 120 training images: 55/60 of them (110) train, the rest (10) validate; the 40 test images are all kept
    assert {key: len(value) for key, value in arrays.items()} == {
        "x_train": 110,
        "y_train": 110,
        "x_val": 10,
        "y_val": 10,
        "x_test": 40,
        "y_test": 40,
    }
    for key, value in arrays.items():
        if key.startswith("x_"):
            assert value.shape[1:] == (1, 28, 28) and value.dtype == np.float32
        else:
            assert value.ndim == 1 and value.dtype == np.int64
    again = cls.load_arrays(tiny_data_dir)
    for key in arrays:
        np.testing.assert_array_equal(arrays[key], again[key])  # a fixed seed: the same split every time


def test_split_is_a_partition_of_the_training_file(tiny_data_dir: Path) -> None:
    arrays = MNIST.load_arrays(tiny_data_dir)
    raw = MNIST.raw_folder(tiny_data_dir)
    images = read_idx(raw / "train-images-idx3-ubyte")
    labels = read_idx(raw / "train-labels-idx1-ubyte")

    def unnormalize(x: np.ndarray) -> np.ndarray:
        return np.rint((x[:, 0] * MNIST.std + MNIST.mean) * 255).astype(np.int64)

    seen = np.concatenate([unnormalize(arrays["x_train"]), unnormalize(arrays["x_val"])])
    seen_labels = np.concatenate([arrays["y_train"], arrays["y_val"]])

    # every training image lands exactly once in train or val, still paired with its own label
    def pairs(imgs: np.ndarray, lbls: np.ndarray) -> list[tuple[bytes, int]]:
        return sorted(zip(map(bytes, imgs.astype(np.uint8)), lbls.tolist(), strict=True))

    assert pairs(seen, seen_labels) == pairs(images, labels)
    # the tiny images carry their class as a bright band at rows 2 + 2 * label
    for image, label in zip(seen, seen_labels, strict=True):
        assert (image[2 + 2 * label] == 255).all()


# --- normalization -------------------------------------------------------------------------------------------------


def test_normalization_applied_once(tiny_data_dir: Path) -> None:
    arrays = MNIST.load_arrays(tiny_data_dir)
    raw = MNIST.raw_folder(tiny_data_dir)
    images = read_idx(raw / "t10k-images-idx3-ubyte").astype(np.float64)
    labels = read_idx(raw / "t10k-labels-idx1-ubyte")
    expected = (images / 255.0 - 0.1307) / 0.3081  # MNIST's mean and std, applied once to the raw bytes
    assert arrays["x_test"].shape == (40, 1, 28, 28)
    np.testing.assert_allclose(arrays["x_test"][:, 0], expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(arrays["y_test"], labels)
    # spot values: a 0 byte and a 255 byte
    assert arrays["x_test"].min() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    assert arrays["x_test"].max() == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-5)


def test_fashion_uses_its_own_statistics(tiny_data_dir: Path) -> None:
    assert (FashionMNIST.mean, FashionMNIST.std) == (0.2860, 0.3530)
    arrays = TinyFashionMNIST.load_arrays(tiny_data_dir)
    images = read_idx(TinyFashionMNIST.raw_folder(tiny_data_dir) / "t10k-images-idx3-ubyte").astype(np.float64)
    expected = (images / 255.0 - FashionMNIST.mean) / FashionMNIST.std
    np.testing.assert_allclose(arrays["x_test"][:, 0], expected, rtol=0, atol=1e-5)


def test_datamodule_setup_and_loaders(tiny_data_dir: Path) -> None:
    data = MNIST(data_args(tiny_data_dir, batch_size=16))
    data.prepare_data()
    data.setup("fit")
    train = data.train_dataloader()
    assert isinstance(train, BatchLoader)
    assert train.batch_size == 16 and len(train) == 7  # ceil(110 / 16)
    x, y = next(iter(train))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.int64
    val = data.val_dataloader()
    assert val.batch_size == max(16, EVAL_BATCH_SIZE) and len(val) == 1
    (x_val, y_val), *rest = list(val)
    assert not rest and x_val.shape == (10, 1, 28, 28) and y_val.shape == (10,)
    assert len(data.test_dataloader()) == 1
    assert "sizes={'x_train': 110, 'x_val': 10, 'x_test': 40}" in repr(data)


# --- BatchLoader ---------------------------------------------------------------------------------------------------


def make_loader(n: int = 100, batch_size: int = 32, shuffle: bool = True, seed: int = 0) -> BatchLoader:
    x = torch.arange(n, dtype=torch.float32).view(n, 1) * 10
    y = torch.arange(n)
    return BatchLoader(x, y, batch_size=batch_size, shuffle=shuffle, seed=seed)


def epoch_order(loader: BatchLoader) -> list[int]:
    order = []
    for x, y in loader:
        assert torch.equal(x[:, 0], y.float() * 10)  # images stay paired with their labels
        order += y.tolist()
    return order


def test_batchloader_len_and_shapes() -> None:
    loader = make_loader(n=100, batch_size=32, shuffle=False)
    assert len(loader) == 4
    batches = list(loader)
    assert [len(y) for _, y in batches] == [32, 32, 32, 4]
    assert all(x.shape == (len(y), 1) for x, y in batches)
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(100))  # unshuffled: file order
    assert len(make_loader(n=96, batch_size=32)) == 3
    assert len(make_loader(n=1, batch_size=32)) == 1


def test_batchloader_shuffle_per_epoch_and_reproducible() -> None:
    loader = make_loader(seed=3)
    first, second = epoch_order(loader), epoch_order(loader)
    assert sorted(first) == sorted(second) == list(range(100))  # each epoch sees every sample once
    assert first != list(range(100))
    assert first != second  # a new order every epoch
    again = make_loader(seed=3)
    assert epoch_order(again) == first and epoch_order(again) == second  # a function of (seed, epoch)
    assert epoch_order(make_loader(seed=4)) != first


def test_batchloader_state_dict_resumes_the_epoch_order() -> None:
    loader = make_loader(seed=1)
    assert loader.state_dict() == {"epoch": 0}
    epoch_order(loader)
    state = loader.state_dict()
    assert state == {"epoch": 1}
    expected_next = epoch_order(loader)
    resumed = make_loader(seed=1)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == {"epoch": 1}
    assert epoch_order(resumed) == expected_next


# --- bad raw files -------------------------------------------------------------------------------------------------


def test_truncated_idx_file(tiny_data_dir: Path) -> None:
    path = MNIST.raw_folder(tiny_data_dir) / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError) as error:
        MNIST.load_arrays(tiny_data_dir)
    assert "truncated" in str(error.value)
    assert str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_wrong_magic(tiny_data_dir: Path) -> None:
    path = MNIST.raw_folder(tiny_data_dir) / "t10k-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    data[0:4] = (2051).to_bytes(4, "big")  # an images magic number on a labels file
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="not an IDX file") as error:
        MNIST.load_arrays(tiny_data_dir)
    assert str(path) in str(error.value)


def test_garbage_file(tiny_data_dir: Path) -> None:
    path = MNIST.raw_folder(tiny_data_dir) / "train-labels-idx1-ubyte"
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(UserError) as error:
        MNIST.load_arrays(tiny_data_dir)
    assert str(path) in str(error.value)


def test_images_and_labels_count_mismatch(tmp_path: Path) -> None:
    raw = write_tiny_mnist(tmp_path / "data")
    write_idx(raw / "train-labels-idx1-ubyte", np.zeros(119, dtype=np.uint8))  # a complete file, one label short
    with pytest.raises(UserError, match="differ in number") as error:
        MNIST.load_arrays(tmp_path / "data")
    assert "train" in str(error.value) and str(raw) in str(error.value)


def test_copy_verified_rejects_a_corrupted_gz(tmp_path: Path) -> None:
    if not FashionMNIST.debian_dir.is_dir():
        pytest.fail("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist")
    source = tmp_path / "source"
    source.mkdir()
    for name in IDX_FILES:
        (source / f"{name}.gz").symlink_to(FashionMNIST.debian_dir / f"{name}.gz")
    # a valid gzip whose payload differs by one byte: the .gz is fine, the file it holds is not
    name = "train-labels-idx1-ubyte"
    labels = bytearray(gzip.decompress((FashionMNIST.debian_dir / f"{name}.gz").read_bytes()))
    labels[-1] = (labels[-1] + 1) % 10
    (source / f"{name}.gz").unlink()
    (source / f"{name}.gz").write_bytes(gzip.compress(bytes(labels), compresslevel=1))
    raw = tmp_path / "FashionMNIST" / "raw"
    with pytest.raises(UserError, match="checksum mismatch") as error:
        copy_verified(source, raw, FashionMNIST.raw_md5)
    assert str(source / name) in str(error.value)
    assert not (raw / name).exists()  # nothing left under the real name


def test_copy_verified_rejects_a_truncated_gz(tmp_path: Path) -> None:
    """A .gz cut short (an interrupted copy) is a corrupt file too: a UserError, not a zlib/EOF traceback."""
    source = tmp_path / "source"
    source.mkdir()
    payload = bytes(range(256)) * 64
    md5s = {name: "0" * 32 for name in IDX_FILES}
    for name in IDX_FILES:
        (source / f"{name}.gz").write_bytes(gzip.compress(payload)[:-20])
    with pytest.raises(UserError) as error:
        copy_verified(source, tmp_path / "raw", md5s)
    assert str(source / "train-images-idx3-ubyte") in str(error.value)


def test_fashion_rejects_tiny_files_by_checksum(tiny_data_dir: Path) -> None:
    """The real FashionMNIST knows the md5 of its files: complete IDX files with other bytes are refused."""
    with pytest.raises(UserError, match="checksum mismatch") as error:
        FashionMNIST.load_arrays(tiny_data_dir)
    assert str(FashionMNIST.raw_folder(tiny_data_dir)) in str(error.value)


def test_copy_verified_without_all_files_copies_nothing(tmp_path: Path) -> None:
    (tmp_path / "source").mkdir()
    assert copy_verified(tmp_path / "source", tmp_path / "raw", FashionMNIST.raw_md5) is False
    assert not (tmp_path / "raw").exists()


def test_mnist_without_files_or_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # only the mirrors change, so that the real download code runs and fails at once
    monkeypatch.setattr(MNIST.torchvision_dataset(), "mirrors", UNREACHABLE)
    data_dir = tmp_path / "empty"
    start = time.monotonic()
    with pytest.raises(UserError) as error:
        MNIST.load_arrays(data_dir)
    assert time.monotonic() - start < 30
    message = str(error.value)
    assert "\n" not in message
    for name in IDX_FILES:
        assert name in message
    assert str(MNIST.raw_folder(data_dir)) in message


# --- the real Fashion-MNIST ----------------------------------------------------------------------------------------


def test_real_fashion_mnist(fashion_dir: Path) -> None:
    arrays = FashionMNIST.load_arrays(fashion_dir)
    assert {key: value.shape for key, value in arrays.items()} == {
        "x_train": (55_000, 1, 28, 28),
        "y_train": (55_000,),
        "x_val": (5_000, 1, 28, 28),
        "y_val": (5_000,),
        "x_test": (10_000, 1, 28, 28),
        "y_test": (10_000,),
    }
    assert np.bincount(arrays["y_test"]).tolist() == [1000] * 10
    x_train = arrays["x_train"]
    # normalized with Fashion-MNIST's own statistics: about zero mean and unit spread
    assert abs(float(x_train.mean())) < 0.02 and abs(float(x_train.std()) - 1) < 0.02


def test_the_raw_files_decode_to_what_torchvision_reads(fashion_dir: Path) -> None:
    # raw_files decodes without torchvision (the driver never imports it); the arrays must be those that the data
    # modules made from torchvision's FashionMNIST before: the same images, labels and split, bit for bit
    import torch

    arrays = FashionMNIST.load_arrays(fashion_dir)
    train = FashionMNIST.torchvision_dataset()(str(fashion_dir), train=True, download=False)
    test = FashionMNIST.torchvision_dataset()(str(fashion_dir), train=False, download=False)
    x = ((train.data.float() / 255.0 - FashionMNIST.mean) / FashionMNIST.std).unsqueeze(1)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(42))
    assert np.array_equal(arrays["x_train"], x[order[:55_000]].numpy())
    assert np.array_equal(arrays["y_val"], train.targets[order[55_000:]].numpy())
    assert np.array_equal(arrays["y_test"], test.targets.numpy())


def test_mnist_raw_file_is_checked_against_its_downloaded_gz(tmp_path: Path) -> None:
    """A .gz that is not torchvision's is caught; so is a raw file of the right size but other bytes than its .gz."""
    import hashlib

    import torchvision

    name = "train-images-idx3-ubyte"
    raw = write_tiny_mnist(tmp_path)
    original = (raw / name).read_bytes()
    (raw / f"{name}.gz").write_bytes(gzip.compress(original))
    with pytest.raises(UserError, match=f"corrupt data file .*{name}.gz: checksum mismatch"):
        MNIST.load_arrays(tmp_path)  # not the md5 torchvision lists for MNIST's file

    # a dataset whose listed md5 is this .gz's: the .gz passes, then the raw bytes are compared with it
    gz_md5 = hashlib.md5((raw / f"{name}.gz").read_bytes()).hexdigest()
    listed = type("Listed", (torchvision.datasets.MNIST,), {"resources": [(f"{name}.gz", gz_md5)]})
    module = type("ListedMNIST", (MNIST,), {"dataset_name": "Listed", "torchvision_dataset": classmethod(lambda cls: listed)})
    write_tiny_mnist(tmp_path, "Listed")
    (tmp_path / "Listed" / "raw" / f"{name}.gz").write_bytes((raw / f"{name}.gz").read_bytes())
    module.ensure_raw_files(tmp_path)
    corrupted = bytearray(original)
    corrupted[100] ^= 0xFF
    (tmp_path / "Listed" / "raw" / name).write_bytes(bytes(corrupted))
    with pytest.raises(UserError, match=f"corrupt data file .*{name}: checksum mismatch with {name}.gz"):
        module.ensure_raw_files(tmp_path)
