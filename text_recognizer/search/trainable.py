"""The Tune trial: the same fit() as run_experiment.py, reporting and checkpointing once per epoch."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from contextlib import nullcontext
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint

from text_recognizer.data.base_data_module import Arrays
from text_recognizer.training import EpochTimer, epoch_metrics, fit, parse_args

CHECKPOINT_NAME = "model.ckpt"


def config_to_argv(config: dict[str, Any]) -> list[str]:
    """A trial config (run flag -> value) as command-line flags."""
    argv = []
    for key, value in config.items():
        if isinstance(value, bool):
            argv += [f"--{key}"] if value else []
        elif value is not None:
            argv.append(f"--{key}={value}")
    return argv


class TuneReportCallback(EpochTimer, Checkpoint):
    """Reports the epoch's train and val metrics to Tune with a checkpoint, at the end of every epoch.

    At train-epoch end Lightning has already validated, so one report carries both, and ASHA decides
    at every epoch. Being a Checkpoint callback, it runs after LightningModule.on_train_epoch_end, where
    the epoch's metrics are logged.
    """

    def __init__(self, started: float, gpu_ids: list[Any], shared_data: bool) -> None:
        super().__init__()
        self.started = started
        self.gpu_ids = [str(gpu) for gpu in gpu_ids]
        self.shared_data = shared_data

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from ray import tune

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
            pid=os.getpid(),
            shared_data=self.shared_data,
            reported_at=time.time(),
            gpu_memory_mb=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0,
        )
        with tempfile.TemporaryDirectory(prefix="trial-ckpt-") as directory:
            trainer.save_checkpoint(os.path.join(directory, CHECKPOINT_NAME))
            # blocks until Tune took the result; Tune ends this thread here when ASHA stops the trial
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


def release_memory() -> None:
    """Give a finished trial's memory back, so a reused worker stays the size of one trial.

    Each trial runs in a new thread of a reused worker; glibc keeps what a thread freed in that thread's
    arena, and without a trim a worker grew by ~10 MB per trial (600 MB to 900 MB over 25 trials).
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def trial_args(config: dict[str, Any]) -> argparse.Namespace:
    """The run args of a trial: its config parsed exactly as run_experiment.py would parse it."""
    return parse_args(config_to_argv(config), prog="trial")


def train_trial(config: dict[str, Any], arrays: Arrays | None = None) -> None:
    """Tune function trainable: one training run per trial; resumes from Tune's checkpoint when restarted."""
    import ray
    from ray import tune

    started = time.time()
    args = trial_args(config)
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))  # as many threads as CPUs given, so trials don't fight over cores
    gpu_ids = ray.get_gpu_ids()
    # Ray sets CUDA_VISIBLE_DEVICES to the trial's GPU, so cuda:0 is the one it was given. Without a real
    # GPU behind the ids (Ray told of GPUs on a CPU machine) the trial trains on the CPU.
    on_gpu = bool(gpu_ids) and torch.cuda.is_available()
    overrides = {"accelerator": "gpu" if on_gpu else "cpu", "devices": 1}
    # arrays straight from Ray's object store are read-only views of shared memory, not copies
    shared_data = bool(arrays) and not arrays["x_train"].flags.writeable
    checkpoint = tune.get_checkpoint()
    try:
        with checkpoint.as_directory() if checkpoint else nullcontext(None) as directory:
            fit(
                args,
                arrays=arrays,
                callbacks=[TuneReportCallback(started, gpu_ids, shared_data)],
                ckpt_path=os.path.join(directory, CHECKPOINT_NAME) if directory else None,
                search=True,
                trainer_overrides=overrides,
            )
    finally:
        release_memory()
