"""Handwritten character recognition with PyTorch Lightning, and a Ray Tune search around it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("text-recognizer")  # pyproject.toml's, the one place it is written
except PackageNotFoundError:  # running from a copied tree that was never installed
    __version__ = "0+unknown"
