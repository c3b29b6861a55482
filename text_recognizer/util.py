"""Small helpers shared by the package: user-facing errors, CLI parsing, versions."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import NoReturn

from packaging.version import Version

# Lightning and Ray change APIs between minor releases: fail early on a release we never ran.
SUPPORTED = {"pytorch-lightning": ("2.6", "2.7"), "ray": ("2.60", "2.61"), "wandb": ("0.31", "0.32")}
OPTIONAL = {"wandb"}  # may be missing (e.g. a GPU image without W&B): then only --wandb-mode disabled runs


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2, nothing else."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) and exit with status 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: error: {message}")


def fail(message: str, status: int = 2) -> NoReturn:
    """Print one line to stderr and exit."""
    print(message, file=sys.stderr)
    raise SystemExit(status)


def check_versions() -> None:
    """Raise UserError when an installed Lightning, Ray or W&B release is outside the tested range."""
    for package, (low, high) in SUPPORTED.items():
        try:
            installed = Version(version(package))
        except PackageNotFoundError:
            if package in OPTIONAL:
                continue  # checked where it is used (a search with --wandb-mode disabled never imports W&B)
            raise UserError(f"{package} is not installed: install >={low},<{high} (pip install -e .)") from None
        if not Version(low) <= installed < Version(high):
            raise UserError(f"{package} {installed} is not supported: install >={low},<{high} (pip install -e .)")


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def probability(text: str) -> float:
    """argparse type: a float in [0, 1)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a float > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a float >= 0 (not NaN)."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value
