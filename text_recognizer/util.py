"""Small helpers shared by the package: user-facing errors, CLI parsing, versions."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, requires, version
from typing import NoReturn, TypeVar

from packaging.requirements import Requirement

DISTRIBUTION = "text-recognizer"  # this package's name on PyPI: its metadata holds pyproject.toml's version ranges
OPTIONAL = {"wandb"}  # may be missing (e.g. a GPU image without W&B): then only --wandb-mode disabled runs


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2, nothing else."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) and exit with status 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: error: {message}")


T = TypeVar("T")
STORAGE_PATIENCE_S = 10.0  # how long a search's start waits out storage that fails (a network share's blip)


def patiently(action: Callable[[], T], what: str, seconds: float = STORAGE_PATIENCE_S) -> T:
    """`action()`, tried again every half second for up to `seconds` while it raises OSError (storage read-only or
    gone for a moment: in the chaos benchmark a driver's start then ended in a traceback); then a UserError, one
    line naming `what` and the error. Only for actions that can be repeated: writes whole or not at all."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return action()
        except OSError as error:
            if time.monotonic() >= deadline:
                raise UserError(f"{what}: {error.strerror or error} (tried for {seconds:.0f} s)") from None
            time.sleep(0.5)


def fail(message: str, status: int = 2) -> NoReturn:
    """Print one line to stderr and exit."""
    print(message, file=sys.stderr)
    raise SystemExit(status)


def supported() -> list[Requirement]:
    """The runtime requirements with their version ranges, as pyproject.toml gives them (read from the installed
    package's metadata, so there is one copy); none when the package runs uninstalled (e.g. a copied tree)."""
    try:
        lines = requires(DISTRIBUTION) or []
    except PackageNotFoundError:
        return []
    found = [Requirement(line) for line in lines]
    return [req for req in found if req.specifier and (req.marker is None or req.marker.evaluate({"extra": ""}))]


def check_versions() -> None:
    """Raise UserError when an installed dependency is outside pyproject.toml's range: Lightning and Ray change APIs
    between minor releases, so fail early on a release we never ran."""
    for requirement in supported():
        package, wanted = requirement.name, f"{requirement.name}{requirement.specifier}"
        try:
            installed = version(package)
        except PackageNotFoundError:
            if package in OPTIONAL:
                continue  # checked where it is used (a search with --wandb-mode disabled never imports W&B)
            raise UserError(f"{package} is not installed: pip install '{wanted}' (or pip install -e .)") from None
        if not requirement.specifier.contains(installed, prereleases=True):
            raise UserError(f"{package} {installed} is not supported: pip install '{wanted}' (or pip install -e .)")


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
