"""Runs in the driver: start a quiet local Ray cluster, or join one, for the length of a search."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray

from text_recognizer.util import UserError

# Where `ray start` keeps a cluster's token (Ray's documented default), and the variable that names another file
TOKEN_FILE = Path.home() / ".ray" / "auth_token"
TOKEN_ENV = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def present_token_when_joining() -> None:
    """Joining a cluster that `ray start` made with a token: turn token auth on in this process (RAY_AUTH_MODE,
    Ray's documented switch) when a token is there and the user chose no mode."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    if any(os.environ.get(name) for name in TOKEN_ENV) or TOKEN_FILE.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


@contextmanager
def ray_cluster(address: str | None) -> Iterator[list[dict[str, float]]]:
    """Join the cluster at `address`, or start a local one without a dashboard; yields its alive nodes'
    resources. Shuts down only what it started (a joined cluster, or a Ray a caller started, stays up)."""
    started = not ray.is_initialized()
    if started:
        # Ray's token authentication stays on: we never pass anything that turns it off. ray.init says at
        # every start that it is on, one line of noise in every search: keep that logger quiet.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        if address:
            present_token_when_joining()
        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise UserError(f"cannot join the Ray cluster at {address}: {str(error).splitlines()[0]}") from None
    try:
        yield [node["Resources"] for node in ray.nodes() if node["Alive"]]
    finally:
        if started:
            ray.shutdown()
