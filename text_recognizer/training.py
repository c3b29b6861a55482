"""The one training function, and the checks of run flags (flags.py) that need torch.

`train()` builds data, model, LitModel and Trainer from run flags and fits: the single run
(`fit_and_test`, below) and every search trial (search/trial/trial_process.py) call it, and differ only in
their callbacks, logger and checkpointing."""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger

from text_recognizer.data.base_data_module import Arrays, BaseDataModule
from text_recognizer.data.mnist import MNIST, FashionMNIST
from text_recognizer.flags import build_parser, default_wandb_mode
from text_recognizer.lit_models import BaseLitModel
from text_recognizer.models import MODEL_CLASSES
from text_recognizer.util import UserError

EARLY_STOPPING_PATIENCE = 10
MONITOR = "val_loss"  # the lab's metric for early stopping and the best checkpoint of a single run
# CPU flags of native bfloat16 arithmetic: x86's AVX512-BF16 and AMX-BF16, Arm's BF16 (FEAT_BF16)
CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}
# bf16-mixed keeps float32 weights, so the summary's float32 sizes are right: not a warning in every bf16 run
warnings.filterwarnings("ignore", message="Precision bf16-mixed is not supported by the model summary")
# the classes --data_class and --model_class name; their flags: flags.DATA_FLAGS, flags.MODEL_FLAGS
DATA_CLASSES: dict[str, type[BaseDataModule]] = {"MNIST": MNIST, "FashionMNIST": FashionMNIST}


def parse_args(argv: Sequence[str] | None = None, prog: str = "run_experiment.py") -> argparse.Namespace:
    """Parse and check run flags: errors exit with one line and status 2 before any work starts."""
    parser = build_parser(argv, prog)
    args = parser.parse_args(argv)
    try:
        device_kwargs(args)
        if args.load_checkpoint and not Path(args.load_checkpoint).is_file():
            raise UserError(f"--load_checkpoint: no such file {args.load_checkpoint}")
    except UserError as error:
        parser.error(str(error))
    return args


def device_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Trainer accelerator/devices from the flags; UserError when GPUs are asked for and absent."""
    available = torch.cuda.device_count()
    if args.gpus is not None:
        if args.gpus < 0:
            raise UserError(f"--gpus must be >= 0, got {args.gpus}")
        if args.gpus > available:
            raise UserError(
                f"--gpus={args.gpus} but this machine has {available} GPU(s); run on the CPU with --gpus=0 or --accelerator=cpu"
            )
        return {"accelerator": "gpu", "devices": args.gpus} if args.gpus else {"accelerator": "cpu", "devices": 1}
    if args.accelerator == "gpu" and not available:
        raise UserError("--accelerator=gpu but this machine has no GPU; run on the CPU with --accelerator=cpu")
    return {"accelerator": args.accelerator, "devices": args.devices}


def native_bf16(gpu: bool) -> bool:
    """Whether this process's device computes bfloat16 natively: the one place that asks the hardware.

    A GPU: compute capability 8.0 (Ampere) or later, emulation not counted. A CPU: its flags in /proc/cpuinfo
    (Linux), as oneDNN's own check counts AVX-512 without BF16 units, where autocast is slower than float32.
    """
    if gpu:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        with open("/proc/cpuinfo") as file:
            flags = {flag for line in file if line.startswith(("flags", "Features")) for flag in line.split(":", 1)[1].split()}
    except OSError:  # not Linux: no way to tell here, so float32
        return False
    return bool(flags & CPU_BF16_FLAGS) and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def uses_gpu(accelerator: str) -> bool:
    """Whether a Trainer with this accelerator trains on a CUDA GPU (auto picks one when there is one)."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_precision(precision: str, gpu: bool) -> str:
    """The Lightning precision a run trains in: `auto` resolved for its device, anything else as given."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if native_bf16(gpu) else "32-true"


class EpochTimer(Callback):
    """Records when the first training step starts and the wall seconds of each epoch."""

    def __init__(self) -> None:
        self.first_step_time: float | None = None
        self.epoch_start = 0.0
        self.epoch_seconds: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_start = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.first_step_time is None:
            self.first_step_time = time.time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_seconds.append(time.perf_counter() - self.epoch_start)

    def seconds_per_epoch(self) -> float:
        return sum(self.epoch_seconds) / max(len(self.epoch_seconds), 1)


def epoch_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The epoch-level metrics Lightning holds now, as floats, plus `diverged` when a loss is not finite."""
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    metrics["diverged"] = any(not math.isfinite(v) for k, v in metrics.items() if k.endswith("_loss"))
    return metrics


def build(args: argparse.Namespace, arrays: Arrays | None = None) -> tuple[BaseDataModule, BaseLitModel]:
    """The data module, model and LitModel that run flags describe; `arrays` are the decoded data, if at hand."""
    pl.seed_everything(args.seed, workers=True, verbose=False)
    data = DATA_CLASSES[args.data_class](args, arrays=arrays)
    data.prepare_data()  # before the Trainer: missing or corrupt data is a one-line error, not after its banner
    model = MODEL_CLASSES[args.model_class](data_config=data.config(), args=args)
    lit_model = BaseLitModel(model=model, args=args, data_config=data.config())
    if args.load_checkpoint:
        state = torch.load(args.load_checkpoint, map_location="cpu", weights_only=True)
        lit_model.load_state_dict(state["state_dict"])
    return data, lit_model


def trainer_args(args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """The Trainer arguments that run flags set, with the caller's `overrides` (callbacks, logger, checkpointing,
    a trial's device); the precision resolved for the device it trains on, and recorded in `args` (so the
    checkpoint's run_args, the W&B config and a replay name the precision it trained in)."""
    kwargs: dict[str, Any] = dict(
        max_epochs=args.max_epochs,
        limit_train_batches=args.limit_train_batches,
        limit_val_batches=args.limit_val_batches,
        limit_test_batches=args.limit_test_batches,
        overfit_batches=args.overfit_batches,
        fast_dev_run=args.fast_dev_run,
        deterministic=args.deterministic or None,
        check_val_every_n_epoch=args.check_val_every_n_epoch,
        gradient_clip_val=args.gradient_clip_val,
        log_every_n_steps=args.log_every_n_steps,
    )
    kwargs.update(device_kwargs(args), **overrides)  # the caller's overrides win
    args.precision = kwargs["precision"] = resolve_precision(args.precision, uses_gpu(kwargs["accelerator"]))
    return kwargs


def train(
    args: argparse.Namespace,
    *,
    callbacks: Sequence[Callback],
    logger: Logger | list[Logger] | bool,
    arrays: Arrays | None = None,
    ckpt_path: str | None = None,
    **trainer_overrides: Any,
) -> tuple[pl.Trainer, BaseDataModule, BaseLitModel]:
    """The one training function: build from the flags, fit (resuming from `ckpt_path`), return what was fit.

    A diverged run (a loss not finite) stops after its epoch: BaseLitModel.stop_if_diverged.
    """
    kwargs = trainer_args(args, callbacks=list(callbacks), logger=logger, **trainer_overrides)
    data, lit_model = build(args, arrays)  # after the precision is resolved: the model's run_args record it
    trainer = pl.Trainer(**kwargs)
    trainer.fit(lit_model, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    return trainer, data, lit_model


def test_checkpoint(args: argparse.Namespace, arrays: Arrays | None = None) -> dict[str, float]:
    """The test split's metrics (test_acc, test_loss) of the weights in args.load_checkpoint, without training."""
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    kwargs = trainer_args(args, **quiet)
    data, lit_model = build(args, arrays)
    trainer = pl.Trainer(**kwargs)
    (metrics,) = trainer.test(lit_model, datamodule=data, verbose=False)
    return {key: float(value) for key, value in metrics.items()}


def run_loggers(args: argparse.Namespace) -> list[Logger]:
    """A single run logs to CSV, and to W&B with --wandb."""
    loggers: list[Logger] = [CSVLogger(save_dir=args.log_dir, name=f"{args.data_class}_{args.model_class}")]
    if args.wandb:
        run = WandbLogger(
            project=args.wandb_project, save_dir=args.log_dir, log_model=True, mode=default_wandb_mode(), config=vars(args)
        )
        loggers.append(run)
    return loggers


def fit_and_test(args: argparse.Namespace) -> dict[str, Any]:
    """The single run: train with early stopping and checkpoints of the best val_loss, then test the best.

    Returns the final metrics, the test metrics and the best checkpoint's path.
    """
    trainer_args(args)  # resolves --precision auto into args before the loggers take the flags as the run's config
    timer = EpochTimer()
    checkpoint = ModelCheckpoint(
        monitor=MONITOR, mode="min", filename="epoch={epoch:03d}-val_loss={val_loss:.3f}", auto_insert_metric_name=False
    )
    # divergence is BaseLitModel's to stop, not early stopping's: check_finite off
    stopping = EarlyStopping(monitor=MONITOR, mode="min", patience=EARLY_STOPPING_PATIENCE, check_finite=False)
    loggers = run_loggers(args)
    trainer, data, lit_model = train(
        args, callbacks=[timer, stopping, checkpoint], logger=loggers, enable_progress_bar=os.isatty(2)
    )
    metrics = epoch_metrics(trainer)
    metrics.update(
        epochs=trainer.current_epoch, seconds_per_epoch=timer.seconds_per_epoch(), first_step_time=timer.first_step_time
    )
    best = checkpoint.best_model_path or None
    (test_metrics,) = trainer.test(lit_model, datamodule=data, ckpt_path=best, weights_only=True, verbose=False)
    metrics.update(test_metrics, best_model_path=best)
    for logger in loggers:
        logger.finalize("success")
    if args.wandb:
        import wandb  # only with --wandb: W&B's import costs a second

        wandb.finish()
    return metrics
