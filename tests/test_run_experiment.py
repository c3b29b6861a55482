"""run_experiment.py end to end: a real run, --help, one-line errors for bad flags, and missing data."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, runs_written_here

from text_recognizer.cli import run_experiment
from text_recognizer.data.raw_files import IDX_FILES

SCRIPT = ROOT / "training" / "run_experiment.py"


def run_script(*argv: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run training/run_experiment.py in a fresh interpreter, as a user would."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )


def printed_test_acc(stdout: str) -> float:
    matches = re.findall(r"^test_acc=([0-9.]+)$", stdout, flags=re.MULTILINE)
    assert len(matches) == 1, stdout
    return float(matches[0])


# --- (a) a short real run ------------------------------------------------------------------------------------------


def test_short_run_on_fashion_mnist(fashion_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metrics = run_experiment(
        [
            "--data_class=FashionMNIST",
            f"--data_dir={fashion_dir}",
            "--max_epochs=1",
            "--limit_train_batches=100",
            "--limit_val_batches=2",
            "--limit_test_batches=2",
            f"--log_dir={tmp_path / 'logs'}",
        ]
    )
    assert metrics["test_acc"] > 0.6
    assert metrics["epochs"] == 1 and not metrics["diverged"]
    best = Path(metrics["best_model_path"])
    assert best.is_file() and tmp_path / "logs" in best.parents
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    assert checkpoint["run_args"]["data_class"] == "FashionMNIST"
    assert checkpoint["state_dict"]["model.fc1.weight"].shape == (1024, 784)
    out = capsys.readouterr().out
    assert printed_test_acc(out) == pytest.approx(metrics["test_acc"], abs=1e-4)
    assert f"best checkpoint: {best}" in out


# --- (b) help ------------------------------------------------------------------------------------------------------


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as error:
        run_experiment(["--help"])
    assert error.value.code == 0
    out = capsys.readouterr().out
    for group in ("Trainer Args", "Data Args", "Model Args", "LitModel Args"):
        assert f"{group}:" in out
    for flag in (
        "--fc1",
        "--fc2",
        "--dropout",
        "--data_dir",
        "--batch_size",
        "--optimizer",
        "--one_cycle_max_lr",
        "--max_epochs",
    ):
        assert flag in out


# --- (c) bad flags: exit status 2 and one line ---------------------------------------------------------------------

BAD_FLAGS = [
    # (flag, what the one line must say)
    ("--data_class=Nope", ["--data_class", "MNIST", "FashionMNIST"]),
    ("--model_class=Nope", ["--model_class", "MLP"]),
    ("--gpus=1", ["--gpus", "run on the CPU"]),
    ("--accelerator=gpu", ["--accelerator", "run on the CPU"]),
    ("--fc1=0", ["--fc1"]),
    ("--fc1=-3", ["--fc1"]),
    ("--fc1=abc", ["--fc1", "abc"]),
    ("--dropout=1.5", ["--dropout"]),
    ("--lr=0", ["--lr"]),
    ("--optimizer=Nope", ["--optimizer", "Adam"]),
    ("--batch_size=0", ["--batch_size"]),
    ("--load_checkpoint=/nonexistent", ["--load_checkpoint", "/nonexistent"]),
    ("--nope=1", ["--nope=1"]),
]


@pytest.mark.parametrize("flag, words", BAD_FLAGS, ids=[flag for flag, _ in BAD_FLAGS])
def test_bad_flag(flag: str, words: list[str], tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if flag in ("--gpus=1", "--accelerator=gpu") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    # otherwise good flags on tiny data: a flag wrongly accepted trains for a moment and returns, failing the test
    argv = [f"--data_dir={tiny_data_dir}", f"--log_dir={tmp_path / 'logs'}", "--max_epochs=1", "--fc2=8", flag]
    with pytest.raises(SystemExit) as error:
        run_experiment(argv)
    assert error.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("run_experiment.py: error:")
    for word in words:
        assert word in lines[0]
    assert "Traceback" not in captured.err and "usage:" not in captured.err
    assert not (tmp_path / "logs").exists()  # nothing ran


# --- (d) MNIST with no files and no network, through the real script -----------------------------------------------


def test_missing_mnist_fails_fast_with_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    start = time.monotonic()
    result = run_script(f"--data_dir={empty}", "--max_epochs=1", f"--log_dir={tmp_path / 'logs'}", timeout=120)
    assert time.monotonic() - start < 60
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    # the error is the one thing printed: no Trainer banner or traceback around it
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("run_experiment.py: error:")
    for name in IDX_FILES:
        assert name in line
    assert str(empty / "MNIST" / "raw") in line
    assert "test_acc" not in result.stdout


# --- (e) full runs -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_epoch_on_fashion_mnist(fashion_dir: Path, tmp_path: Path) -> None:
    common = ["--data_class=FashionMNIST", f"--data_dir={fashion_dir}", "--max_epochs=1"]
    default = run_script(*common, f"--log_dir={tmp_path / 'default'}", timeout=900)
    assert default.returncode == 0, default.stderr[-3000:]
    default_acc = printed_test_acc(default.stdout)
    assert default_acc > 0.80
    tiny = run_script(*common, "--fc1=4", "--fc2=8", f"--log_dir={tmp_path / 'tiny'}", timeout=900)
    assert tiny.returncode == 0, tiny.stderr[-3000:]
    tiny_acc = printed_test_acc(tiny.stdout)
    assert tiny_acc < default_acc


def test_wandb_run_is_an_offline_run_with_the_args_and_the_model(tiny_data_dir: Path, tmp_path: Path) -> None:
    metrics = run_experiment(
        ["--wandb", f"--data_dir={tiny_data_dir}", f"--log_dir={tmp_path}", "--max_epochs=2", "--fc1=16", "--fc2=8"]
    )
    (run,) = runs_written_here(tmp_path)
    assert run.config["fc1"] == 16 and run.config["data_class"] == "MNIST" and run.config["seed"] == 42
    epochs = sorted({row["epoch"] for row in run.history if "val_acc" in row})
    assert epochs == [0, 1]
    assert run.summary["test_acc"] == pytest.approx(metrics["test_acc"])
    assert any(name.startswith("model-") for name in run.artifacts)  # the best checkpoint, uploaded on sync
