"""The trial process: the same fit() as run_experiment.py, reporting and checkpointing once per epoch.

It runs in a fork of the node's fork server (see forkserver.py) and talks to its Tune actor (trial.py)
over a connection: one message per epoch, then it waits for the actor to say go on.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from multiprocessing.connection import Connection
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint

from text_recognizer.search.trial import CHECKPOINT_NAME, config_to_argv
from text_recognizer.training import EpochTimer, epoch_metrics, fit, parse_args


class ReportCallback(EpochTimer, Checkpoint):
    """Sends the epoch's train and val metrics with a checkpoint to the Tune actor, at the end of every epoch.

    At train-epoch end Lightning has already validated, so one report carries both, and ASHA decides
    at every epoch. Being a Checkpoint callback, it runs after LightningModule.on_train_epoch_end, where
    the epoch's metrics are logged.
    """

    def __init__(self, connection: Connection, started: float, gpu_ids: list[str], shared_data: bool) -> None:
        super().__init__()
        self.connection = connection
        self.started = started
        self.gpu_ids = gpu_ids
        self.shared_data = shared_data

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
            trial_pid=os.getpid(),  # Tune's own `pid` is its actor's
            server_pid=os.getppid(),  # the node's fork server
            shared_data=self.shared_data,
            reported_at=time.time(),
            gpu_memory_mb=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0,
        )
        directory = tempfile.mkdtemp(prefix="trial-ckpt-")  # the actor removes it once Tune has it
        trainer.save_checkpoint(os.path.join(directory, CHECKPOINT_NAME))
        self.connection.send({"metrics": metrics, "checkpoint": directory})
        self.connection.recv()  # Tune took it: go on (EOFError when the actor is gone ends the process)


def trial_args(config: dict[str, Any]) -> argparse.Namespace:
    """The run args of a trial: its config parsed exactly as run_experiment.py would parse it."""
    return parse_args(config_to_argv(config), prog="trial")


def run_trial(connection: Connection, request: dict[str, Any], arrays: dict[str, Any]) -> None:
    """Train one trial as its Tune actor asked (see trial.train_trial); resumes from its checkpoint, if any."""
    torch.set_num_threads(request["threads"])
    args = trial_args(request["config"])
    gpu_ids = request["gpu_ids"]
    # CUDA_VISIBLE_DEVICES is the trial's GPU, so cuda:0 is the one it was given. Without a real GPU
    # behind the ids (Ray told of GPUs on a CPU machine) the trial trains on the CPU.
    on_gpu = bool(gpu_ids) and torch.cuda.is_available()
    overrides = {"accelerator": "gpu" if on_gpu else "cpu", "devices": 1}
    fit(
        args,
        arrays=arrays,
        # the arrays are the fork server's, shared with every trial process of the node, never written
        callbacks=[ReportCallback(connection, request["started"], gpu_ids, shared_data=not arrays["x_train"].flags.writeable)],
        ckpt_path=request["checkpoint"],
        search=True,
        trainer_overrides=overrides,
    )
