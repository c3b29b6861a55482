"""Runs where a trial trains: its Tune actor (the default), or a fork of the node's fork server (`--trial-process fork`).

`train_trial` is the trial's training: the same `training.train()` as run_experiment.py, with a callback that
reports each epoch's metrics and a checkpoint. Where the report goes is the caller's: straight to
`tune.report` in the actor (tune_actor.py), or over the fork server's connection to the actor
(`run_in_fork`, which the fork server runs by name).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint

import text_recognizer
from text_recognizer.facts import CHECKPOINT_NAME, FILLED_KEY, HISTORY_NAME, config_to_argv, write_whole
from text_recognizer.training import EpochTimer, epoch_metrics, parse_args, test_checkpoint, train

# report(metrics, checkpoint folder or None): returns once Tune took the epoch; the folder is the reporter's to remove
Report = Callable[[dict[str, Any], str | None], None]


class ReportCallback(EpochTimer, Checkpoint):
    """Reports the epoch's train and val metrics with a checkpoint, at the end of every epoch.

    At train-epoch end Lightning has already validated, so one report carries both, and ASHA decides
    at every epoch. Being a Checkpoint callback, it runs after LightningModule.on_train_epoch_end, where
    the epoch's metrics are logged.

    Why not Ray's TuneReportCheckpointCallback: it calls tune.report, which a fork-mode trial process (no Ray
    session) can't, so this one reports through `report`; and it saves Lightning's full checkpoint, without the
    epoch history, timings and node/resource fields that summary.json and W&B read from each report.
    """

    def __init__(
        self,
        report: Report,
        started: float,
        gpu_ids: list[str],
        arrays: dict[str, np.ndarray] | None,
        where: dict[str, Any] | None = None,
        history: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.report, self.started, self.gpu_ids, self.arrays = report, started, gpu_ids, arrays
        self.data_copied = True
        # where it trains (node, resources) and where this package was imported from: in every report
        self.where = {**(where or {}), "package_dir": os.path.dirname(text_recognizer.__file__)}
        # every epoch's metrics so far, restored with the checkpoint; the first report after a restore carries them
        self.history, self.restored = list(history or []), list(history or [])
        # where an epoch's wall time goes besides its training steps (benchmarks/run.py prints the split)
        self.validation_start, self.validation_seconds, self.report_seconds = 0.0, 0.0, 0.0

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.validation_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.validation_seconds = time.perf_counter() - self.validation_start

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.data_copied = data_copied(self.arrays, trainer.datamodule.tensors)  # set up by now

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        metrics = epoch_metrics(trainer)
        metrics.update(
            epoch=trainer.current_epoch + 1,
            epoch_seconds=self.epoch_seconds[-1],
            trial_started_at=self.started,
            first_step_at=self.first_step_time,
            startup_seconds=self.first_step_time - self.started,
            gpu_ids=",".join(self.gpu_ids),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            torch_threads=torch.get_num_threads(),
            precision=trainer.precision,  # as resolved on this node (--precision auto): the replay trains in it
            trial_pid=os.getpid(),  # the process that trains: the actor's, or a fork's (Tune's `pid` is the actor's)
            data_copied=self.data_copied,
            reported_at=time.time(),
            gpu_memory_mb=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0,
            **self.where,
        )
        began = time.perf_counter()
        directory = tempfile.mkdtemp(prefix="trial-ckpt-")
        # all of the trainer's state, not only the weights: a trial resumes from it
        trainer.save_checkpoint(os.path.join(directory, CHECKPOINT_NAME), weights_only=False)
        metrics.update(
            validation_seconds=self.validation_seconds,
            checkpoint_seconds=time.perf_counter() - began,
            previous_report_seconds=self.report_seconds,  # handing the last epoch to Tune, until Tune took it
        )
        self.history.append(dict(metrics))
        save_history(self.history, directory)
        # the first report after a restore carries the epochs its checkpoint holds, for any Tune never delivered;
        # every report has the key (empty), so that Tune's progress.csv keeps one set of columns
        metrics["restored_history"], self.restored = self.restored, []
        began = time.perf_counter()
        self.report(metrics, directory)
        self.report_seconds = time.perf_counter() - began

    def report_restored(self) -> None:
        """A trial resumed from its last epoch's checkpoint trains nothing (its result may never have reached Tune:
        the driver was killed first, checkpoints.repair_tracked): report that epoch again, marked FILLED_KEY and
        without a checkpoint (Tune has it), so that Tune, result.json and W&B get its epochs. Nothing when an epoch
        was reported."""
        if not self.restored:
            return
        metrics = {**self.restored[-1], "restored_history": self.restored, FILLED_KEY: True}
        self.restored = []
        self.report(metrics, None)


def save_history(history: list[dict[str, Any]], directory: str) -> None:
    """Every epoch's metrics up to this checkpoint, beside its model file: a trial restored from it can hand the
    driver an epoch whose result Tune never delivered (its checkpoint kept, its worker killed before the result)."""
    write_whole(os.path.join(directory, HISTORY_NAME), json.dumps(history))


def restored_history(checkpoint: str | None) -> list[dict[str, Any]]:
    """The metrics history saved beside a checkpoint's model file; [] without one (a fresh trial, an older checkpoint)."""
    path = os.path.join(os.path.dirname(checkpoint), HISTORY_NAME) if checkpoint else None
    if path is None or not os.path.isfile(path):
        return []
    with open(path) as file:
        return json.load(file)


def data_copied(arrays: dict[str, np.ndarray] | None, tensors: dict[str, torch.Tensor]) -> bool:
    """Whether training works on a copy of the arrays it was given, rather than on the shared, read-only arrays."""
    if not arrays:
        return True
    array = arrays["x_train"]
    return array.flags.writeable or tensors["x_train"].data_ptr() != array.ctypes.data


def train_trial(
    config: dict[str, Any],
    arrays: dict[str, np.ndarray] | None,
    report: Report,
    *,
    checkpoint: str | None,
    threads: int,
    gpu_ids: list[str],
    started: float,
    where: dict[str, Any] | None = None,
) -> None:
    """Train one trial (its config parsed as run_experiment.py would), resuming from `checkpoint` if given;
    `where`: its node and resources, recorded in every report."""
    torch.set_num_threads(threads)  # as many threads as CPUs given, so trials don't fight over cores
    args = parse_args(config_to_argv(config), prog="trial")
    # CUDA_VISIBLE_DEVICES is the trial's GPU, so cuda:0 is the one it was given. Without a real GPU
    # behind the ids (Ray told of GPUs on a CPU machine) the trial trains on the CPU.
    on_gpu = bool(gpu_ids) and torch.cuda.is_available()
    callback = ReportCallback(report, started, gpu_ids, arrays, where, restored_history(checkpoint))
    train(
        args,
        arrays=arrays,
        callbacks=[callback],
        logger=False,  # the driver logs every trial (search/tracking/wandb_logging.py)
        ckpt_path=checkpoint,
        accelerator="gpu" if on_gpu else "cpu",
        devices=1,
        enable_checkpointing=True,  # through the report callback only
        # nobody watches a trial's terminal: no progress bar, summary or sanity check
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    callback.report_restored()


def release_memory() -> None:
    """Give a finished trial's memory back, so a reused actor stays the size of one trial.

    Each trial runs in a new thread of a reused actor; glibc keeps what a thread freed in that thread's
    arena, and without a trim an actor grew by ~10 MB per trial.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def run_in_fork(connection: Connection, request: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """The fork server's target (named in tune_actor.py): train, sending each epoch to the Tune actor."""

    def report(metrics: dict[str, Any], directory: str) -> None:
        connection.send({"metrics": metrics, "checkpoint": directory})  # the actor removes the folder
        connection.recv()  # Tune took it: go on (EOFError when the actor is gone ends the process)

    train_trial(request["config"], arrays, report, **request["trial"])


def test_winner(config: dict[str, Any], checkpoint: str, arrays: dict[str, np.ndarray]) -> dict[str, float]:
    """Runs in a Ray worker, like a trial: the test metrics of a trial's checkpoint, its config parsed as
    run_experiment.py would (so `run_experiment.py ... --load_checkpoint CKPT --limit_train_batches=0` agrees)."""
    args = parse_args(config_to_argv({**config, "load_checkpoint": checkpoint}), prog="test")
    return test_checkpoint(args, arrays)
