"""Runs in the driver: start a quiet local Ray cluster, or join one, for the length of a search.

Joining a cluster ships this package to its workers in the job's runtime environment (`working_dir`): nodes need
only the dependencies, and trials run the very code the driver runs. Settings that workers need travel in the same
runtime environment (`env_vars`), never through a node's own shell.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray

import text_recognizer
from text_recognizer.util import UserError

PACKAGE = Path(text_recognizer.__file__).resolve().parent


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


# Asks the GCS at argv[1] one question as a process in the given auth mode would: exit 0 answered, 3 refused for
# its token (missing or wrong), 4 another error (printed). Ray's own GCS client, as ray.init's.
PROBE = """
import sys
from ray._raylet import GcsClient
from ray.exceptions import AuthenticationError
try:
    GcsClient(address=sys.argv[1]).internal_kv_get(b"auth-probe", b"text_recognizer", timeout=10)
except AuthenticationError:
    sys.exit(3)
except Exception as error:
    print(str(error).splitlines()[0] if str(error) else type(error).__name__)
    sys.exit(4)
"""
PROBE_SECONDS = 120  # Ray's client gives up on a silent GCS after 40 s; the rest is for starting Python on a busy machine


def gcs_answers(address: str, token: bool) -> tuple[bool, str]:
    """(whether the cluster's GCS answers a process that presents this machine's token (`token`) or none, why
    not: "token" when refused for its token): asked from a separate process, so this one's Ray config stays as it is."""
    env = {**os.environ, "RAY_AUTH_MODE": "token" if token else "disabled"}
    command = [sys.executable, "-c", PROBE, address]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=PROBE_SECONDS)
    except subprocess.TimeoutExpired:
        return False, f"no answer in {PROBE_SECONDS} s"
    if done.returncode == 3:
        return False, "token"
    if done.returncode != 0:
        lines = (done.stdout or done.stderr).strip().splitlines()
        return False, lines[-1] if lines else f"exit status {done.returncode}"
    return True, ""


def token_source() -> str:
    """Where this machine's Ray token comes from, as Ray looks for it."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token"


def has_token() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or Path(token_source()).expanduser().is_file()


def check_auth_matches(address: str) -> None:
    """UserError, before ray.init, when the cluster at `address` and this driver disagree on Ray's token auth: a
    cluster without it, whose processes can't call back into a driver that requires a token (the search's actors
    would all die), a cluster that requires a token this machine lacks, or one that refuses this machine's token.
    The driver never turns token auth off to match: the cluster, or the token here, must change."""
    if address == "auto" or "://" in address:
        return  # Ray resolves these itself; its own errors stand
    here = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    start = f"cannot join the Ray cluster at {address}:"
    copy = f"copy the cluster's token (`ray get-auth-token` on its head) to {token_source()} here, or set RAY_AUTH_TOKEN"
    if here and not has_token():
        raise UserError(f"{start} RAY_AUTH_MODE=token and this machine has no Ray token; {copy}")
    open_, why = gcs_answers(address, token=False)
    if not open_ and why != "token":
        raise UserError(f"{start} {why}")
    if open_ and here:
        raise UserError(
            f"{start} it runs without token authentication and this machine uses a token ({token_source()}), so the "
            "cluster's processes can't reach the search; restart the cluster with token auth (RAY_AUTH_MODE=token "
            "ray start ..., with this machine's token on every node: `ray get-auth-token` prints it)"
        )
    if open_:
        return  # neither uses a token
    if not here and has_token():
        mode = os.environ.get("RAY_AUTH_MODE")
        raise UserError(f"{start} it requires a Ray token and RAY_AUTH_MODE={mode} here sends none; set RAY_AUTH_MODE=token")
    if not here:
        raise UserError(f"{start} it requires a Ray token and this machine has none; {copy}")
    answered, why = gcs_answers(address, token=True)
    if why == "token":
        raise UserError(f"{start} it refuses this machine's Ray token ({token_source()}); {copy}")
    if not answered:
        raise UserError(f"{start} {why}")


def worker_settings() -> dict[str, str]:
    """The environment every worker of the search gets, whatever its node's shell holds. Workers never write
    W&B (the driver logs every trial), so they need no credentials; trials get the data from Ray's object store
    and their threads from their Ray resources; a data dir chosen in the driver's environment goes along."""
    settings = {
        "WANDB_MODE": "disabled",
        "WANDB_SILENT": "true",
        # a reused actor waits this long for its last trial's thread to wind down (Lightning's teardown, gc) before
        # the next trial: Tune's 2 s were missed on a busy 2-core machine, and the next trial then failed for good
        "TUNE_FUNCTION_THREAD_TIMEOUT_S": "60",
    }
    if os.environ.get("TEXT_RECOGNIZER_DATA_DIR"):
        settings["TEXT_RECOGNIZER_DATA_DIR"] = os.environ["TEXT_RECOGNIZER_DATA_DIR"]
    return settings


@contextmanager
def runtime_env(ship_code: bool) -> Iterator[dict[str, Any]]:
    """The search's job runtime environment: its worker settings and, with `ship_code`, a folder that holds only a
    copy of this package as the working_dir (Ray uploads it in ray.init, and then adds no folder of the driver's
    to the workers' sys.path: a node without a checkout imports this copy)."""
    if not ship_code:
        yield {"env_vars": worker_settings()}
        return
    with tempfile.TemporaryDirectory(prefix="text-recognizer-job-") as folder:
        shutil.copytree(PACKAGE, Path(folder) / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        yield {"working_dir": folder, "env_vars": worker_settings()}


@contextmanager
def ray_cluster(address: str | None) -> Iterator[list[dict[str, float]]]:
    """Join the cluster at `address` (shipping this package to it), or start a local one without a dashboard; yields
    its alive nodes' resources. Shuts down only what it started (a joined cluster, or a Ray a caller started, stays up)."""
    started = not ray.is_initialized()
    if started:
        # Ray's token authentication stays on: we never pass anything that turns it off. ray.init says at
        # every start that it is on, one line of noise in every search: keep that logger quiet.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        if address:
            present_token_when_joining()
            check_auth_matches(address)
        try:
            with runtime_env(ship_code=bool(address)) as environment:
                ray.init(
                    address=address or "local",  # "local": a new cluster, never one that happens to run here
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                    runtime_env=environment,
                )
        except (ConnectionError, RuntimeError, ValueError) as error:
            where = f"join the Ray cluster at {address}" if address else "start a local Ray cluster"
            raise UserError(f"cannot {where}: {str(error).splitlines()[0]}") from None
    try:
        yield [node["Resources"] for node in ray.nodes() if node["Alive"]]
    finally:
        if started:
            ray.shutdown()
