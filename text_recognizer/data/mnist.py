"""The MNIST and Fashion-MNIST data modules: their raw files (raw_files.py) as Lightning DataModules."""

from __future__ import annotations

from text_recognizer.data.base_data_module import BaseDataModule
from text_recognizer.data.raw_files import FashionMNISTFiles, MNISTFiles


class MNIST(MNISTFiles, BaseDataModule):
    """MNIST: 55,000 / 5,000 train/val split with a fixed seed, the official 10,000 test images."""

    dims = (1, 28, 28)
    output_dims = (1,)
    mapping = list(range(10))


class FashionMNIST(FashionMNISTFiles, MNIST):
    """Fashion-MNIST: the MNIST format and splits; uses Debian's dataset-fashion-mnist files when installed."""

    mapping = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
