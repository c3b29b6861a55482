"""The MLP and BaseLitModel: sizes and flags, overfitting one batch, optimizers, schedule, checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from text_recognizer.cli import run_experiment
from text_recognizer.lit_models import BaseLitModel
from text_recognizer.lit_models.base import OPTIMIZERS
from text_recognizer.models import MLP
from text_recognizer.training import parse_args
from text_recognizer.training import test_checkpoint as evaluate  # not test_*: pytest would collect it

DATA_CONFIG = {"input_dims": (1, 28, 28), "output_dims": (1,), "mapping": list(range(10))}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- MLP -----------------------------------------------------------------------------------------------------------


def test_mlp_default_size() -> None:
    model = MLP(DATA_CONFIG)
    assert n_params(model) == (784 * 1024 + 1024) + (1024 * 128 + 128) + (128 * 10 + 10)
    assert model.num_classes == 10
    # the same model from the parsed defaults of run_experiment.py
    assert n_params(MLP(DATA_CONFIG, parse_args([]))) == n_params(model)


def test_mlp_flags() -> None:
    args = parse_args(["--fc1=32", "--fc2=16", "--dropout=0.25"])
    assert (args.fc1, args.fc2, args.dropout) == (32, 16, 0.25)
    model = MLP(DATA_CONFIG, args)
    assert (model.fc1.in_features, model.fc1.out_features) == (784, 32)
    assert (model.fc2.in_features, model.fc2.out_features) == (32, 16)
    assert (model.fc3.in_features, model.fc3.out_features) == (16, 10)
    assert model.dropout.p == 0.25
    assert n_params(model) == (784 * 32 + 32) + (32 * 16 + 16) + (16 * 10 + 10)
    out = model(torch.zeros(5, 1, 28, 28))
    assert out.shape == (5, 10)


def test_mlp_follows_the_data_config() -> None:
    model = MLP({"input_dims": (3, 8, 8), "output_dims": (1,), "mapping": list("abcde")}, argparse.Namespace(fc1=4, fc2=4))
    assert model.fc1.in_features == 3 * 8 * 8 and model.fc3.out_features == 5
    assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 5)


def test_mlp_dropout_only_in_training() -> None:
    model = MLP(DATA_CONFIG, argparse.Namespace(fc1=64, fc2=32, dropout=0.9))
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


# --- BaseLitModel --------------------------------------------------------------------------------------------------


def test_overfits_one_batch() -> None:
    """32 random images with fixed labels can only be learned by memorizing them: the loss must fall near zero."""
    pl.seed_everything(0, verbose=False)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 28, 28, generator=generator)
    y = torch.arange(32) % 10
    args = argparse.Namespace(fc1=64, fc2=32, dropout=0.0, lr=3e-3, optimizer="Adam")
    model = MLP(DATA_CONFIG, args)
    lit_model = BaseLitModel(model, args)
    with torch.no_grad():
        initial = F.cross_entropy(model(x), y).item()
    assert initial > 1.5  # about ln(10) before training

    trainer = pl.Trainer(
        overfit_batches=1,
        max_epochs=40,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(lit_model, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=32))
    assert trainer.current_epoch == 40
    assert float(trainer.callback_metrics["train_loss"]) < 0.05
    assert float(trainer.callback_metrics["train_acc"]) == 1.0
    model.eval()
    with torch.no_grad():
        assert F.cross_entropy(model(x), y).item() < 0.05


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_allowed_optimizers(name: str) -> None:
    args = parse_args([f"--optimizer={name}", "--lr=0.01", "--fc1=8", "--fc2=8"])
    lit_model = BaseLitModel(MLP(DATA_CONFIG, args), args)
    optimizer = lit_model.configure_optimizers()
    assert type(optimizer) is getattr(torch.optim, name)
    assert optimizer.param_groups[0]["lr"] == 0.01


def test_optimizer_allowlist() -> None:
    assert set(OPTIMIZERS) == {"Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "NAdam", "RAdam"}
    for name in ("Nope", "Optimizer", "lr_scheduler", "adam"):
        with pytest.raises(SystemExit) as error:
            parse_args([f"--optimizer={name}"])
        assert error.value.code == 2


def test_no_scheduler_by_default() -> None:
    args = parse_args(["--fc1=8", "--fc2=8"])
    assert args.one_cycle_max_lr is None
    assert isinstance(BaseLitModel(MLP(DATA_CONFIG, args), args).configure_optimizers(), torch.optim.Adam)


def test_one_cycle_scheduler() -> None:
    args = parse_args(["--fc1=8", "--fc2=8", "--one_cycle_max_lr=0.05", "--one_cycle_total_steps=7"])
    config = BaseLitModel(MLP(DATA_CONFIG, args), args).configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.Adam)
    scheduler = config["lr_scheduler"]["scheduler"]
    assert isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)
    assert scheduler.total_steps == 7
    assert config["lr_scheduler"]["interval"] == "step"
    assert config["optimizer"].param_groups[0]["max_lr"] == 0.05


def test_checkpoint_loads_with_weights_only(tiny_data_dir: Path, tmp_path: Path) -> None:
    argv = [
        f"--data_dir={tiny_data_dir}",
        f"--log_dir={tmp_path / 'logs'}",
        "--max_epochs=1",
        "--fc1=16",
        "--fc2=8",
        "--batch_size=32",
        "--accelerator=cpu",
    ]
    metrics = run_experiment(argv)
    path = Path(metrics["best_model_path"])
    assert path.is_file() and tmp_path / "logs" in path.parents
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    run_args = checkpoint["run_args"]
    assert run_args["fc1"] == 16 and run_args["fc2"] == 8 and run_args["data_class"] == "MNIST"
    assert all(isinstance(v, (str, int, float, bool, type(None))) for v in run_args.values())
    assert checkpoint["state_dict"]["model.fc1.weight"].shape == (16, 784)
    # --load_checkpoint starts from the checkpoint's weights: tested without training, they score what the run's
    # test of its best checkpoint scored (freshly initialised weights would not)
    loaded = evaluate(parse_args([*argv, f"--load_checkpoint={path}"]))
    assert loaded["test_acc"] == pytest.approx(metrics["test_acc"]) and loaded["test_loss"] == pytest.approx(metrics["test_loss"])
    fresh = evaluate(parse_args([*argv, "--seed=7"]))
    assert fresh["test_loss"] != pytest.approx(metrics["test_loss"])


@pytest.mark.parametrize("schedule", ["cosine", "one_cycle"])
def test_lr_schedule_spans_the_runs_own_steps(tmp_path, schedule: str) -> None:
    """A schedule runs over max_epochs x batches of this run: the lr ends near 0 at the last step, whatever the length."""
    args = parse_args(["--fc1=8", "--fc2=8", "--lr=0.01", "--weight_decay=0.1", f"--lr_schedule={schedule}"])
    model = BaseLitModel(MLP(DATA_CONFIG, args), args)
    x, y = torch.randn(40, *DATA_CONFIG["input_dims"]), torch.randint(0, 10, (40,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    trainer = pl.Trainer(
        max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    trainer.fit(model, loader)
    optimizer = trainer.optimizers[0]
    assert optimizer.param_groups[0]["weight_decay"] == 0.1
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 15  # 3 epochs x 5 batches, stepped per batch
    assert optimizer.param_groups[0]["lr"] < 0.01 / 20  # far below the peak --lr by the end


def test_weight_decay_must_not_be_negative() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--weight_decay=-0.1"])
