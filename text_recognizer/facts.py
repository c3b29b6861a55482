"""Small facts shared by every process of a run or a search: the standard library only, and nothing of ours.

The driver, Tune's actors, the fork server and trial processes all import this module, so it stays at
the bottom of the import graph.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

WANDB_PROJECT = "text-recognizer"  # the one default W&B project, of single runs and searches alike
CHECKPOINT_NAME = "model.ckpt"  # the file inside every Tune checkpoint folder of a trial
HISTORY_NAME = "history.json"  # beside it: every epoch's metrics up to that checkpoint
SEARCH_FILE = "search.json"  # the resolved description of a search, so --resume needs nothing else
# how a trial of a search that ended ended; "interrupted" and "pending" trials are what --resume continues
FINAL_STATUSES = ("completed", "stopped_early", "diverged", "error", "stopped_by_budget", "not_started")
RUN_SCRIPT = "training/run_experiment.py"
SEARCH_SCRIPT = "search/tune_mlp.py"
REPORT_PAGE = Path("report") / "report.html"  # a search's offline report, inside its folder
# md5 of Fashion-MNIST's decompressed files (Debian recompressed the .gz files: only the decompressed bytes can be
# checked); here so that the data class and the GPU kit's carry builder (no torch) check the same bytes
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
_ROOT = Path(__file__).resolve().parents[1]
# the repository when the package runs from a checkout (editable install), else None (installed in site-packages)
CHECKOUT = _ROOT if (_ROOT / "pyproject.toml").is_file() and (_ROOT / SEARCH_SCRIPT).is_file() else None


def config_to_argv(config: dict[str, Any]) -> list[str]:
    """A trial config (run flag -> value) as run_experiment.py flags."""
    argv = []
    for key, value in config.items():
        if isinstance(value, bool):
            argv += [f"--{key}"] if value else []
        elif value is not None:
            argv.append(f"--{key}={value}")
    return argv


def replay_command(config: dict[str, Any], epochs: int | None = None) -> str:
    """The run_experiment.py command line that trains a trial's config as a single run."""
    run_args = {**config, **({"max_epochs": epochs} if epochs else {})}
    return shlex.join(["python", RUN_SCRIPT, *config_to_argv(run_args)])


def resume_command(name: str, storage: str) -> str:
    """The command line that continues an interrupted search."""
    return shlex.join(["python", SEARCH_SCRIPT, "--resume", "--name", name, "--storage-path", storage])


def search_sync_command(folder: str) -> str:
    """The command line that uploads an offline search's W&B runs and makes them a sweep."""
    return shlex.join(["python", SEARCH_SCRIPT, "sync", folder])


def trial_status(last: dict[str, Any], max_t: int, error: bool = False, budget_ended: bool = False) -> str:
    """A trial's outcome from its last result: completed (ran max_t epochs), stopped_early (by ASHA),
    diverged, error, interrupted (started, not finished) or pending (never started); when the search's time
    budget ended it, its unfinished trials are stopped_by_budget (started) or not_started.

    Tune marks the last result of a finished trial `done` (ASHA's stop included), so no Tune status is needed.
    """
    if error:
        return "error"
    if last.get("diverged"):
        return "diverged"
    if not last.get("training_iteration"):
        return "not_started" if budget_ended else "pending"
    if not last.get("done"):
        return "stopped_by_budget" if budget_ended else "interrupted"
    return "completed" if last["training_iteration"] >= max_t else "stopped_early"


def search_ended(rows: list[dict[str, Any]]) -> bool:
    """Whether every trial of a search ended (FINAL_STATUSES): else it was interrupted, and --resume goes on."""
    return all(row["status"] in FINAL_STATUSES for row in rows)


def wandb_run_id(search_name: str, trial_id: str) -> str:
    """A stable W&B run id for a trial: the search name and Tune's trial id."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", f"{search_name}-{trial_id}")[:128]
