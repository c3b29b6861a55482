"""Shared fixtures and helpers: tiny IDX datasets, the real Fashion-MNIST, and the one fixture that launches a search."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("WANDB_MODE", "offline")  # never reach for a W&B server from tests
os.environ.setdefault("WANDB_SILENT", "true")

from text_recognizer.data.mnist import FashionMNIST  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "search" / "tune_mlp.py"
# a search config of small trials of exactly 5 epochs (ASHA stops none): the reliability and storage tests' search
FIVE_EPOCHS = """
metric: val_acc
mode: max
scheduler: {max_t: 5, grace_period: 5, reduction_factor: 2}
fixed: {data_class: FashionMNIST, limit_train_batches: 60}
space:
  fc1: {choice: [16, 64]}
  lr: {loguniform: [1.0e-3, 1.0e-2]}
"""
TRIAL_PROCESSES = ["actor", "fork"]  # every end-to-end and reliability test runs in both


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (magic 2051 for images (N, 28, 28), 2049 for labels (N,))."""
    magic = 2051 if array.ndim == 3 else 2049
    header = np.array([magic, *array.shape], dtype=">i4")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.tobytes() + array.astype(np.uint8).tobytes())


def write_tiny_mnist(data_dir: Path, folder: str = "MNIST", n_train: int = 120, n_test: int = 40, seed: int = 0) -> Path:
    """Tiny learnable IDX files: each class is a bright horizontal band at its own rows. Returns the raw folder."""
    rng = np.random.default_rng(seed)
    raw = data_dir / folder / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 40, (n, 28, 28))
        for i, label in enumerate(labels):
            images[i, 2 + 2 * label : 4 + 2 * label, :] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return raw


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 1 CPU for a test module's Tune calls; never another process's cluster (address "local")."""
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def tiny_data_dir(tmp_path: Path) -> Path:
    """A data dir holding tiny MNIST and FashionMNIST raw files (120 train / 40 test images)."""
    for folder in ("MNIST", "FashionMNIST"):
        write_tiny_mnist(tmp_path / "data", folder)
    return tmp_path / "data"


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Fashion-MNIST (Debian's dataset-fashion-mnist), verified and placed once per session."""
    if not FashionMNIST.debian_dir.is_dir():
        pytest.fail("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist")
    data_dir = tmp_path_factory.mktemp("fashion")
    FashionMNIST.ensure_raw_files(data_dir)
    return data_dir


# --- searches: one way to launch them, and what they leave behind -------------------------------------------------

Launch = Callable[..., "subprocess.Popen[str]"]


@pytest.fixture(scope="session")
def launch_search(fashion_dir: Path) -> Launch:
    """Start the real search on real Fashion-MNIST, quiet, W&B offline; returns the running process.

    launch_search(storage, name, config_text, *flags, env=None, prelude="") writes the config (None: no
    --config, e.g. with --smoke-test) and runs `python search/tune_mlp.py` from the repo root; with a
    `prelude` (e.g. a ray.init that declares GPUs) it runs the same entry point after that code instead.
    A --resume gets only the flags given: it takes everything else from the saved search.
    """

    def launch(
        storage: Path, name: str, config: str | None, *flags: str, env: dict | None = None, prelude: str = ""
    ) -> subprocess.Popen[str]:
        args = ["--storage-path", str(storage), "--name", name, "--quiet", *flags]
        if config is not None:
            (storage / f"{name}.yaml").write_text(config)
            args += ["--config", str(storage / f"{name}.yaml")]
        if "--resume" not in flags:
            args += [f"--data_dir={fashion_dir}", "--wandb-mode", "offline"]
        code = f"import sys\n{prelude}\nfrom text_recognizer.cli import tune_mlp\ntune_mlp(sys.argv[1:])\n"
        command = [sys.executable, "-c", code, *args] if prelude else [sys.executable, str(SCRIPT), *args]
        environment = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)

    return launch


def finish(process: subprocess.Popen[str], timeout: float = 300, returncode: int = 0) -> str:
    """Wait for a launched search; assert its exit status; return its stdout."""
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == returncode, stderr[-3000:]
    return stdout


def summary_of(search_dir: Path) -> dict:
    return json.loads((search_dir / "summary.json").read_text())


def complete_lines(path: Path) -> list[dict]:
    """The JSON lines of a file another process may be writing: a last line without its newline is not there yet."""
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def results(search_dir: Path) -> dict[str, list[dict]]:
    """Tune's per-trial results (result.json), as the driver wrote them, by trial id."""
    return {path.parent.name.removeprefix("trial_"): complete_lines(path) for path in search_dir.glob("trial_*/result.json")}


def wait_for(condition: Callable[[], bool], timeout: float = 180, poll: float = 0.3) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(poll)


def runs_written_here(folder: Path) -> list:
    """The offline W&B runs under `folder` that this (test) process wrote, read once W&B has closed their files.

    In wandb 0.31, run.finish() returns once the run's exit record is acknowledged, then only *publishes*
    inform_finish to W&B's service (ServiceConnection.inform_finish does not wait), which closes the run's
    `.wandb` file later: read at once, the file can still lack records (seen: no config, KeyError 'fc1').
    wandb.teardown() sends inform_teardown and joins the service process, so every run's file is complete.
    A search run as a subprocess needs none of this: its exit joins its service the same way (W&B's atexit).
    """
    import wandb

    from text_recognizer.search.tracking.wandb_files import offline_runs

    wandb.teardown()
    return offline_runs(folder)
