"""Data modules, looked up by name: never imported from a user-given string."""

from text_recognizer.data.base_data_module import BaseDataModule
from text_recognizer.data.mnist import MNIST, FashionMNIST

DATA_CLASSES: dict[str, type[BaseDataModule]] = {"MNIST": MNIST, "FashionMNIST": FashionMNIST}

__all__ = ["DATA_CLASSES", "BaseDataModule", "FashionMNIST", "MNIST"]
