"""Handwritten character recognition with PyTorch Lightning, and a Ray Tune search around it."""

__version__ = "0.1.0"
