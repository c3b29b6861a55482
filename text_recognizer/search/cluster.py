"""Runs in the driver: start a quiet local Ray cluster, or join one, for the length of a search."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from text_recognizer.util import UserError


def present_token_when_joining() -> None:
    """Joining a cluster that `ray start` made with a token (~/.ray/auth_token): turn token auth on in this
    process when the user chose no RAY_AUTH_MODE.

    Ray has no public call for this: setting RAY_AUTH_MODE alone is not enough once Ray's config is loaded, and
    the function `ray start` itself uses lives in ray._private. It is kept behind this one function;
    tests/test_security.py calls it, so a Ray release that moves it fails there, loudly.
    """
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError as error:
        raise RuntimeError(f"this Ray release moved its token set-up ({error}): update present_token_when_joining") from None
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


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
