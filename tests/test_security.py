"""Secure defaults: Ray's token auth stays on, no dashboard, safe loading of YAML and checkpoints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

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
