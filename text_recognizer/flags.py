"""Run flags: every flag of run_experiment.py with its default, in one place, and the parser that reads them.

The standard library only (and the leaf modules facts and util): a search's driver parses and checks its trials'
flags with this parser without importing torch or Lightning, which were 5.3 of its 6.8 s of imports. The classes
these flags configure (the data modules, the models, the LitModel) read their defaults from here.
"""

from __future__ import annotations

import argparse
import netrc
import os
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path

from text_recognizer.facts import CHECKOUT, WANDB_PROJECT
from text_recognizer.util import Parser, non_negative_float, positive_float, positive_int, probability

# --- Trainer -------------------------------------------------------------------------------------------------------
DATA_CLASS = "MNIST"
MODEL_CLASS = "MLP"
MAX_EPOCHS = 5
SEED = 42
# auto: bf16-mixed where the run's device computes bfloat16 natively, else 32-true (training.resolve_precision); on
# a CPU without bf16 units autocast only adds casts, so it is never picked there
PRECISION = "auto"
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true")
# training/logs/ in a checkout; an installed package writes its runs' logs under the working folder
LOG_DIR = CHECKOUT / "training" / "logs" if CHECKOUT else Path("logs") / "runs"

# --- data modules ----------------------------------------------------------------------------------------------------
BATCH_SIZE = 128
NUM_WORKERS = 0  # DataLoader workers; 0 slices batches from tensors in memory, in-process: the fastest here
# data/downloaded/ in a checkout; an installed package never writes into site-packages: ~/.cache instead
DEFAULT_DATA = CHECKOUT / "data" / "downloaded" if CHECKOUT else Path.home() / ".cache" / "text-recognizer" / "data"
DATA_DIRNAME = Path(os.environ.get("TEXT_RECOGNIZER_DATA_DIR", DEFAULT_DATA))

# --- the MLP ---------------------------------------------------------------------------------------------------------
FC1_DIM = 1024
FC2_DIM = 128
DROPOUT = 0.5

# --- the LitModel ----------------------------------------------------------------------------------------------------
OPTIMIZER = "Adam"
LR = 1e-3
ONE_CYCLE_TOTAL_STEPS = 100
WEIGHT_DECAY = 0.0
# how the learning rate moves over a run's own steps (max_epochs x batches), from --lr:
# constant; cosine: down to 0; one_cycle: up to --lr and down (torch's OneCycleLR)
LR_SCHEDULES = ("constant", "cosine", "one_cycle")
LOSS = "cross_entropy"
# Names a user may give; looked up in torch.optim / torch.nn.functional, never arbitrary attributes.
OPTIMIZERS = ("Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "NAdam", "RAdam")
LOSSES = ("cross_entropy", "nll_loss", "multi_margin_loss")


def data_dir(given: str | Path | None) -> Path:
    """Where a data module's raw files live: --data_dir, else DATA_DIRNAME (read now, so a test may point it elsewhere)."""
    return Path(given or DATA_DIRNAME)


def batches(text: str) -> int | float:
    """argparse type for Lightning's limit_*/overfit_batches: an int count or a float fraction."""
    value = float(text) if "." in text else int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_trainer_flags(group: argparse._ActionsContainer) -> None:
    group.add_argument("--max_epochs", type=positive_int, default=MAX_EPOCHS, help=f"default {MAX_EPOCHS}")
    group.add_argument("--accelerator", choices=("auto", "cpu", "gpu"), default="auto", help="default auto")
    group.add_argument("--devices", default="auto", help="devices per run (default auto)")
    group.add_argument("--gpus", type=int, default=None, help="old spelling of --accelerator=gpu --devices=N; 0 means CPU")
    group.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=PRECISION,
        help="Lightning precision; auto (default): bf16-mixed where the device computes bfloat16 natively, else 32-true",
    )
    for split in ("train", "val", "test"):
        group.add_argument(f"--limit_{split}_batches", type=batches, default=1.0, help="batches per epoch: int or fraction")
    group.add_argument("--overfit_batches", type=batches, default=0.0, help="train and validate on this many batches")
    group.add_argument("--fast_dev_run", type=int, nargs="?", const=1, default=0, help="run N batches of each stage")
    group.add_argument("--deterministic", action="store_true", help="use deterministic algorithms")
    group.add_argument("--check_val_every_n_epoch", type=positive_int, default=1)
    group.add_argument("--gradient_clip_val", type=float, default=None)
    group.add_argument("--log_every_n_steps", type=positive_int, default=50)
    group.add_argument("--seed", type=int, default=SEED, help=f"seed for torch, numpy and python (default {SEED})")
    group.add_argument("--load_checkpoint", type=str, default=None, help="start from the weights of this checkpoint")
    group.add_argument("--log_dir", type=str, default=str(LOG_DIR), help=f"where runs write logs and checkpoints ({LOG_DIR})")
    group.add_argument("--wandb", action="store_true", help="log the run to W&B (offline without credentials)")
    group.add_argument("--wandb_project", type=str, default=WANDB_PROJECT)


def add_data_flags(group: argparse._ActionsContainer) -> None:
    """The flags of every data module (data/base_data_module.py)."""
    group.add_argument("--batch_size", type=positive_int, default=BATCH_SIZE, help=f"default {BATCH_SIZE}")
    group.add_argument(
        "--num_workers",
        type=int,
        default=NUM_WORKERS,
        help="DataLoader worker processes; 0 (default) slices batches from memory in-process, the fastest here",
    )
    group.add_argument("--data_dir", type=str, default=None, help=f"where the raw files live (default {DATA_DIRNAME})")


def add_mlp_flags(group: argparse._ActionsContainer) -> None:
    """The MLP's flags (models/mlp.py)."""
    group.add_argument("--fc1", type=positive_int, default=FC1_DIM, help=f"first hidden layer width (default {FC1_DIM})")
    group.add_argument("--fc2", type=positive_int, default=FC2_DIM, help=f"second hidden layer width (default {FC2_DIM})")
    group.add_argument(
        "--dropout", type=probability, default=DROPOUT, help=f"dropout after each hidden layer (default {DROPOUT})"
    )


def add_lit_model_flags(group: argparse._ActionsContainer) -> None:
    """The LitModel's flags (lit_models/base.py): optimizer, learning rate and its schedule, loss."""
    group.add_argument("--optimizer", choices=OPTIMIZERS, default=OPTIMIZER, help=f"torch.optim class (default {OPTIMIZER})")
    group.add_argument("--lr", type=positive_float, default=LR, help=f"learning rate (default {LR})")
    group.add_argument(
        "--weight_decay", type=non_negative_float, default=WEIGHT_DECAY, help=f"optimizer weight decay ({WEIGHT_DECAY})"
    )
    group.add_argument(
        "--lr_schedule",
        choices=LR_SCHEDULES,
        default=LR_SCHEDULES[0],
        help="learning rate over the run's steps: constant (default), cosine to 0, one_cycle peaking at --lr",
    )
    group.add_argument(
        "--one_cycle_max_lr", type=positive_float, default=None, help="the lab's OneCycleLR: this max lr, fixed steps"
    )
    group.add_argument("--one_cycle_total_steps", type=positive_int, default=ONE_CYCLE_TOTAL_STEPS, help="OneCycleLR total steps")
    group.add_argument("--loss", choices=LOSSES, default=LOSS, help=f"torch.nn.functional loss (default {LOSS})")


# Each name --data_class and --model_class take, with its flags. training.DATA_CLASSES and models.MODEL_CLASSES hold
# the classes by the same names (a test checks that they agree).
DATA_FLAGS: dict[str, Callable[[argparse._ActionsContainer], None]] = {"MNIST": add_data_flags, "FashionMNIST": add_data_flags}
MODEL_FLAGS: dict[str, Callable[[argparse._ActionsContainer], None]] = {"MLP": add_mlp_flags}


def build_parser(argv: Sequence[str] | None = None, prog: str = "run_experiment.py") -> Parser:
    """The run parser, with the Data, Model and LitModel flags of the classes that `argv` chooses."""
    parser = Parser(prog=prog, add_help=False, description="Train one model on one dataset, then test it.")
    add_trainer_flags(parser.add_argument_group("Trainer Args"))
    parser.add_argument("--data_class", choices=sorted(DATA_FLAGS), default=DATA_CLASS, help=f"default {DATA_CLASS}")
    parser.add_argument("--model_class", choices=sorted(MODEL_FLAGS), default=MODEL_CLASS, help=f"default {MODEL_CLASS}")
    # first pass: which classes? (-h comes last, so help shows the chosen classes' flags)
    known, _ = parser.parse_known_args(argv)
    DATA_FLAGS[known.data_class](parser.add_argument_group("Data Args"))
    MODEL_FLAGS[known.model_class](parser.add_argument_group("Model Args"))
    add_lit_model_flags(parser.add_argument_group("LitModel Args"))
    parser.add_argument("-h", "--help", action="help", help="show this help message and exit")
    return parser


def default_wandb_mode() -> str:
    """WANDB_MODE if set, else online when W&B credentials exist for the configured server, else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    return "online" if netrc_has_key(wandb_host()) else "offline"


def wandb_host() -> str:
    """The W&B server's host name: WANDB_BASE_URL's (a self-hosted server), else W&B's cloud, as the SDK picks it."""
    url = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    return urllib.parse.urlsplit(url if "://" in url else f"https://{url}").hostname or url


def netrc_has_key(host: str) -> bool:
    """Whether the netrc file that `wandb login` writes ($NETRC, else ~/.netrc) holds a key for `host`. Read with
    the standard library: importing W&B to ask it costs a second, and a --wandb-mode disabled search never does."""
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        entry = netrc.netrc(str(path)).authenticators(host) if path.is_file() else None
    except (netrc.NetrcParseError, OSError):
        return False
    return bool(entry and entry[2])  # the key is the entry's password
