"""BaseLitModel: optimizer, loss, one-cycle schedule and torchmetrics accuracy around any model."""

from __future__ import annotations

import argparse
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

# its defaults; its flags: flags.add_lit_model_flags
from text_recognizer.flags import LOSS, LOSSES, LR, LR_SCHEDULES, ONE_CYCLE_TOTAL_STEPS, OPTIMIZER, OPTIMIZERS, WEIGHT_DECAY


class BaseLitModel(pl.LightningModule):
    """Trains a classifier; logs train_loss, train_acc, val_loss, val_acc and test_acc once per epoch."""

    def __init__(
        self, model: torch.nn.Module, args: argparse.Namespace | None = None, data_config: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.args = vars(args) if args is not None else {}
        self.data_config = data_config or {}  # saved in checkpoints: what predict needs to read an image
        optimizer, loss = self.args.get("optimizer", OPTIMIZER), self.args.get("loss", LOSS)
        if optimizer not in OPTIMIZERS or loss not in LOSSES:  # never getattr an arbitrary user string
            raise ValueError(f"optimizer must be one of {OPTIMIZERS} and loss one of {LOSSES}")
        self.optimizer_class = getattr(torch.optim, optimizer)
        self.lr = self.args.get("lr", LR)
        self.weight_decay = self.args.get("weight_decay", WEIGHT_DECAY)
        self.lr_schedule = self.args.get("lr_schedule", LR_SCHEDULES[0])
        self.one_cycle_max_lr = self.args.get("one_cycle_max_lr")
        self.one_cycle_total_steps = self.args.get("one_cycle_total_steps", ONE_CYCLE_TOTAL_STEPS)
        self.loss_fn = getattr(F, loss)
        num_classes = model.num_classes  # models expose it from their data config
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.loss_sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_class(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        lr_schedulers = torch.optim.lr_scheduler
        if self.one_cycle_max_lr is not None:  # the lab's flags, kept as they were
            scheduler = lr_schedulers.OneCycleLR(optimizer, max_lr=self.one_cycle_max_lr, total_steps=self.one_cycle_total_steps)
        elif self.lr_schedule == "constant":
            return optimizer
        else:
            # over this run's own length, so a trial's schedule ends where its max_epochs (ASHA's max_t) does
            steps = max(1, int(self.trainer.estimated_stepping_batches))
            if self.lr_schedule == "cosine":
                scheduler = lr_schedulers.CosineAnnealingLR(optimizer, T_max=steps)
            else:
                scheduler = lr_schedulers.OneCycleLR(optimizer, max_lr=self.lr, total_steps=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = self.loss_fn(logits, y)
        # Sums kept here and logged once per epoch: self.log() costs about 1 ms a call, which was 14 % of
        # an MLP epoch on a CPU. Every metric is an epoch mean, weighted by batch size.
        self.loss_sums[stage] = self.loss_sums.get(stage, 0.0) + loss.detach() * len(y)
        self.counts[stage] = self.counts.get(stage, 0) + len(y)
        getattr(self, f"{stage}_acc").update(logits.detach(), y)
        return loss

    def _log_epoch(self, stage: str) -> None:
        if not self.counts.get(stage):
            return
        self.log(f"{stage}_loss", self.loss_sums.pop(stage) / self.counts.pop(stage))
        accuracy = getattr(self, f"{stage}_acc")
        self.log(f"{stage}_acc", accuracy.compute())
        accuracy.reset()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    # Lightning runs these before its "monitoring" callbacks (checkpointing, early stopping, the Tune
    # report), so those see this epoch's values.
    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")
        self.stop_if_diverged()

    def stop_if_diverged(self) -> None:
        """Stop training after an epoch whose train or val loss is not finite: a diverged run learns nothing more.

        Here, and not in a callback, because Lightning runs plain callbacks' on_train_epoch_end before this
        hook logs the epoch's train loss.
        """
        losses = [value for key, value in self.trainer.callback_metrics.items() if key.endswith("_loss")]
        if any(not torch.isfinite(value).all() for value in losses):
            self.trainer.should_stop = True

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # plain types only, so the checkpoint loads with torch.load(weights_only=True) and replays its run
        checkpoint["run_args"] = {k: v for k, v in self.args.items() if isinstance(v, (str, int, float, bool, type(None)))}
        checkpoint["data_config"] = {
            "input_dims": list(self.data_config.get("input_dims", ())),
            "mapping": list(self.data_config.get("mapping", ())),
            "normalization": dict(self.data_config.get("normalization", {})),
        }
