"""The one training function: the single run and the trial build the same things; a diverged run stops itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from text_recognizer.facts import FILLED_KEY
from text_recognizer.search.trial.trial_process import train_trial
from text_recognizer.training import default_wandb_mode, epoch_metrics, parse_args, train


def test_a_diverged_run_stops_after_its_first_diverged_epoch(tiny_data_dir: Path) -> None:
    """No early stopping among the callbacks: the LitModel itself stops a run whose loss is not finite."""
    config = {"data_dir": str(tiny_data_dir), "optimizer": "SGD", "lr": 1e6, "max_epochs": 10, "fc1": 16, "fc2": 8}
    reports: list[dict] = []
    train_trial(config, None, lambda metrics, _: reports.append(metrics), checkpoint=None, threads=1, gpu_ids=[], started=0.0)
    diverged = [metrics["diverged"] for metrics in reports]
    assert diverged[-1] and not any(diverged[:-1]) and len(reports) < 10, diverged


def test_a_healthy_run_trains_every_epoch(tiny_data_dir: Path) -> None:
    args = parse_args([f"--data_dir={tiny_data_dir}", "--max_epochs=3", "--fc1=16", "--fc2=8"])
    trainer, _, _ = train(args, callbacks=[], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert trainer.current_epoch == 3 and not epoch_metrics(trainer)["diverged"]


def test_a_trial_reports_every_epoch_with_a_checkpoint_and_resumes_from_it(tiny_data_dir: Path, tmp_path: Path) -> None:
    """The trial's training, called as the Tune actor calls it, with a report function that keeps what it gets."""
    from text_recognizer.data.mnist import MNIST

    arrays = MNIST.load_arrays(tiny_data_dir)
    for array in arrays.values():
        array.flags.writeable = False  # as Ray's object store hands them over
    config = {"data_dir": str(tiny_data_dir), "max_epochs": 3, "fc1": 16, "fc2": 8}
    reports: list[tuple[dict, Path]] = []

    def report(metrics: dict, directory: str) -> None:
        kept = tmp_path / f"epoch{metrics['epoch']}"
        Path(directory).rename(kept)
        reports.append((metrics, kept))

    settings = {"threads": 1, "gpu_ids": [], "started": 0.0}
    train_trial(config, arrays, report, checkpoint=None, **settings)
    assert [m["epoch"] for m, _ in reports] == [1, 2, 3]
    assert not any(m["data_copied"] for m, _ in reports)  # trained on the arrays it was given, not a copy
    assert all((folder / "model.ckpt").is_file() for _, folder in reports)
    state = torch.load(reports[0][1] / "model.ckpt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and state["run_args"]["fc1"] == 16
    # restarted from epoch 1's checkpoint: it trains epochs 2 and 3 only
    resumed: list[tuple[dict, Path]] = []
    restart = str(reports[0][1] / "model.ckpt")
    train_trial(config, arrays, lambda m, d: resumed.append((m, Path(d))), checkpoint=restart, **settings)
    assert [m["epoch"] for m, _ in resumed] == [2, 3]
    assert resumed[-1][0]["val_acc"] == pytest.approx(reports[-1][0]["val_acc"])  # same data order, same result
    # restarted from its last epoch's checkpoint (its result may never have reached Tune): it trains nothing and
    # reports that epoch again, marked, with the checkpoint's history and no new checkpoint
    last: list[tuple[dict, str | None]] = []
    train_trial(config, arrays, lambda m, d: last.append((m, d)), checkpoint=str(reports[-1][1] / "model.ckpt"), **settings)
    assert [(m["epoch"], [row["epoch"] for row in m["restored_history"]], d) for m, d in last] == [(3, [1, 2, 3], None)]
    assert last[0][0]["val_acc"] == reports[-1][0]["val_acc"] and last[0][0][FILLED_KEY]


@pytest.mark.parametrize(
    "native, flag, expected", [(True, [], "bf16-mixed"), (False, [], "32-true"), (True, ["--precision=32-true"], "32-true")]
)
def test_precision_auto_resolves_for_the_device_and_the_run_records_it(
    monkeypatch: pytest.MonkeyPatch, tiny_data_dir: Path, native: bool, flag: list[str], expected: str
) -> None:
    """--precision auto (the default) trains in bf16-mixed only where the device computes bfloat16 natively; the
    checkpoint's run flags and the trial's reports name the precision it trained in, so a replay is the same run."""
    from text_recognizer import training

    asked: list[bool] = []
    monkeypatch.setattr(training, "native_bf16", lambda gpu: asked.append(gpu) or native)
    args = parse_args([f"--data_dir={tiny_data_dir}", "--max_epochs=1", "--fc1=16", "--fc2=8", *flag])
    trainer, _, lit_model = train(args, callbacks=[], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert trainer.precision == expected and args.precision == expected and lit_model.args["precision"] == expected
    assert asked == ([] if flag else [False])  # asked about the CPU, the device it trained on
    reports: list[dict] = []
    config = {"data_dir": str(tiny_data_dir), "max_epochs": 1, "fc1": 16, "fc2": 8, **dict(f[2:].split("=") for f in flag)}
    train_trial(config, None, lambda metrics, _: reports.append(metrics), checkpoint=None, threads=1, gpu_ids=[], started=0.0)
    assert [metrics["precision"] for metrics in reports] == [expected]


def test_wandb_credentials_are_looked_up_for_the_configured_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key in netrc for a self-hosted server (WANDB_BASE_URL) means online there; W&B's cloud needs its own."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine wandb.example.com\n  login user\n  password local-key\n")
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert default_wandb_mode() == "offline"  # a key for another server is no key for api.wandb.ai
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com:8080")
    assert default_wandb_mode() == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "http://other.example.com")
    assert default_wandb_mode() == "offline"
    netrc_file.write_text("machine api.wandb.ai login user password cloud-key\n")
    monkeypatch.delenv("WANDB_BASE_URL")
    assert default_wandb_mode() == "online"
    netrc_file.write_text("machine api.wandb.ai login user\n")  # no password: no key
    assert default_wandb_mode() == "offline"
