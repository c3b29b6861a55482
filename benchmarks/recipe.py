"""The textbook Tune + Lightning recipe, the baseline of the benchmarks.

A Tune function trainable; inside it a Lightning Trainer with Ray's TuneReportCheckpointCallback, fed by
torchvision's FashionMNIST with ToTensor + Normalize per sample through a DataLoader; 1 CPU per trial,
Tune's defaults otherwise (fresh worker per trial, default loggers). Same MLP and optimizer as ours.
The only addition is instrumentation: the time of the first training step, written to the trial folder.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any


def recipe_trainable(config: dict[str, Any]) -> None:
    """One textbook trial."""
    import pytorch_lightning as pl
    import torch
    import torch.nn.functional as F
    import torchvision
    from ray import tune
    from ray.tune.integration.pytorch_lightning import TuneReportCheckpointCallback
    from torch.utils.data import DataLoader, random_split
    from torchvision import transforms

    from text_recognizer.models import MLP

    class LitMLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            mapping = list(range(10))
            args = {k: config[k] for k in ("fc1", "fc2", "dropout") if k in config}
            self.model = MLP({"input_dims": (1, 28, 28), "mapping": mapping}, argparse.Namespace(**args))
            self.first_step_at: float | None = None

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if self.first_step_at is None:
                self.first_step_at = time.time()
                directory = tune.get_context().get_trial_dir()
                with open(os.path.join(directory, "first_step.json"), "w") as file:
                    json.dump({"first_step_at": self.first_step_at, "pid": os.getpid()}, file)
            x, y = batch
            logits = self.model(x)
            loss = F.cross_entropy(logits, y)
            self.log("train_loss", loss)
            self.log("train_acc", (logits.argmax(1) == y).float().mean(), on_epoch=True)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            logits = self.model(x)
            self.log("val_loss", F.cross_entropy(logits, y))
            self.log("val_acc", (logits.argmax(1) == y).float().mean())

        def configure_optimizers(self) -> Any:
            return getattr(torch.optim, config.get("optimizer", "Adam"))(self.parameters(), lr=config["lr"])

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))])
    full = torchvision.datasets.FashionMNIST(config["data_dir"], train=True, download=False, transform=transform)
    train, val = random_split(full, [55_000, 5_000], generator=torch.Generator().manual_seed(42))
    batch_size = config.get("batch_size", 128)
    trainer = pl.Trainer(
        max_epochs=config["max_epochs"],
        accelerator="cpu",
        enable_progress_bar=False,
        limit_train_batches=config.get("limit_train_batches", 1.0),
        callbacks=[
            TuneReportCheckpointCallback(
                {"val_loss": "val_loss", "val_acc": "val_acc", "train_loss": "train_loss", "train_acc": "train_acc"},
                on="train_epoch_end",
            )
        ],
    )
    trainer.fit(LitMLP(), DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(val, batch_size=batch_size))
