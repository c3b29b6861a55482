"""Secure defaults: Ray's token auth stays on, no dashboard, safe loading of YAML and checkpoints."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import ray
import torch
from conftest import ROOT, SCRIPT, wait_for
from test_search_cli import assert_one_line_error

from text_recognizer.search.config import load_config
from text_recognizer.training import parse_args
from text_recognizer.util import UserError


def test_local_ray_cluster_has_token_auth_and_no_dashboard() -> None:
    code = (
        "import os, ray\n"
        "from text_recognizer.search.cluster import ray_cluster\n"
        "with ray_cluster(None):\n"
        "    print('auth', os.environ.get('RAY_AUTH_MODE'))\n"
        "    print('dashboard', ray._private.worker.global_worker.node.address_info.get('webui_url'))\n"
        "print('after', ray.is_initialized())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "auth token" in result.stdout
    assert re.search(r"dashboard (None|)$", result.stdout, re.M)
    assert "after False" in result.stdout  # the cluster it started is gone with the search


def test_search_refuses_to_turn_token_auth_off(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "search/tune_mlp.py", "--smoke-test", "--storage-path", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "RAY_AUTH_MODE" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_yaml_is_read_with_safe_load(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f'space: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(UserError, match="evil.yaml"):
        load_config(config)
    assert not marker.exists()


def test_classes_come_from_the_registry_only() -> None:
    for argv in (
        ["--data_class=os.system"],
        ["--model_class=text_recognizer.models.MLP"],
        ["--optimizer=os.system"],
        ["--loss=__import__"],
    ):
        with pytest.raises(SystemExit) as error:
            parse_args(argv)
        assert error.value.code == 2


def test_trial_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    from conftest import write_tiny_mnist

    from text_recognizer.training import fit_and_test

    write_tiny_mnist(tmp_path / "data")
    metrics = fit_and_test(
        parse_args([f"--data_dir={tmp_path / 'data'}", f"--log_dir={tmp_path}", "--max_epochs=1", "--fc1=8", "--fc2=8"])
    )
    checkpoint = torch.load(metrics["best_model_path"], map_location="cpu", weights_only=True)
    assert checkpoint["run_args"]["fc1"] == 8


def test_joining_presents_the_token_that_ray_start_saved(tmp_path: Path) -> None:
    """With a token in ~/.ray/auth_token and no RAY_AUTH_MODE, joining turns token auth on (Ray's private set-up)."""
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("a" * 64)
    code = (
        "import os\n"
        "from text_recognizer.search.cluster import present_token_when_joining\n"
        "present_token_when_joining()\n"
        "print('mode', os.environ.get('RAY_AUTH_MODE'))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mode token" in result.stdout


# --- joining a cluster whose token auth differs from this machine's: one line, exit 2, before ray.init ----------


def without_ray_auth(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    return {**env, **extra}


@contextmanager
def ray_head(folder: Path, token: str | None) -> Iterator[str]:
    """A real one-node cluster from `ray start --head`, with token auth (and this token) or without, in its own HOME,
    temp dir and port; yields its address; stops exactly the processes it started (its process group)."""
    (folder / ".ray").mkdir(parents=True)
    if token:
        (folder / ".ray" / "auth_token").write_text(token)
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    address = f"{ray.util.get_node_ip_address()}:{port}"
    mode = "token" if token else "disabled"
    env = without_ray_auth(HOME=str(folder), RAY_TMPDIR=tempfile.mkdtemp(prefix="ray", dir="/tmp"), RAY_AUTH_MODE=mode)
    command = ["ray", "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false"]
    head = subprocess.Popen(
        [*command, "--disable-usage-stats", "--block"], env=env, start_new_session=True, stdout=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: subprocess.run(["ray", "status", f"--address={address}"], env=env, capture_output=True).returncode == 0)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def heads(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Two real clusters: one without token auth ("open"), one with token "a"*64 ("token")."""
    with ray_head(tmp_path_factory.mktemp("open"), None) as open_, ray_head(tmp_path_factory.mktemp("token"), "a" * 64) as token:
        yield {"open": open_, "token": token}


def join(address: str, home: Path, token: str | None, fashion_dir: Path, storage: Path) -> subprocess.CompletedProcess:
    """The real search joining `address` from a machine whose ~/.ray/auth_token is `token` (None: none)."""
    (home / ".ray").mkdir(parents=True)
    if token:
        (home / ".ray" / "auth_token").write_text(token)
    args = ["--smoke-test", f"--address={address}", "--storage-path", str(storage), "--name", "x", f"--data_dir={fashion_dir}"]
    env = without_ray_auth(HOME=str(home), WANDB_MODE="offline")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("cluster", "token", "needles"),
    [
        # a cluster without token auth, a machine with a token (any local search writes one): Ray would turn token
        # auth on for the driver, and the cluster's processes could not call back into it (every actor would die)
        ("open", "b" * 64, ("it runs without token authentication", "~/.ray/auth_token", "RAY_AUTH_MODE=token ray start")),
        ("token", None, ("it requires a Ray token and this machine has none", "ray get-auth-token", "RAY_AUTH_TOKEN")),
        ("token", "b" * 64, ("it refuses this machine's Ray token (~/.ray/auth_token)", "ray get-auth-token")),
    ],
)
def test_joining_a_cluster_whose_auth_differs_is_one_line_and_exit_2(
    heads: dict[str, str], tmp_path: Path, fashion_dir: Path, cluster: str, token: str | None, needles: tuple[str, ...]
) -> None:
    result = join(heads[cluster], tmp_path / "home", token, fashion_dir, tmp_path / "storage")
    line = assert_one_line_error(result, f"cannot join the Ray cluster at {heads[cluster]}: ", *needles)
    assert "disabled" not in line.replace("RAY_AUTH_MODE=disabled", "")  # never advice to turn token auth off
    assert not (tmp_path / "storage" / "x").exists()  # refused before Ray and Tune: nothing written


@pytest.mark.slow
def test_joining_with_the_cluster_s_token_passes_the_check(heads: dict[str, str], tmp_path: Path) -> None:
    """The same check lets a matching machine through: the cluster's own token here."""
    code = "from text_recognizer.search.cluster import check_auth_matches, present_token_when_joining\n"
    code += f"present_token_when_joining()\ncheck_auth_matches({heads['token']!r})\nprint('joined')\n"
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("a" * 64)
    env = without_ray_auth(HOME=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    assert result.returncode == 0 and "joined" in result.stdout, result.stderr[-2000:]
