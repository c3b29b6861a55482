"""Small facts shared by every process of a run or a search: the standard library only, and nothing of ours.

The driver, Tune's actors, the fork server and trial processes all import this module, so it stays at
the bottom of the import graph.
"""

from __future__ import annotations

import enum
import os
import re
import shlex
from collections.abc import Collection
from pathlib import Path
from typing import Any

WANDB_PROJECT = "text-recognizer"  # the one default W&B project, of single runs and searches alike
CHECKPOINT_NAME = "model.ckpt"  # the file inside every Tune checkpoint folder of a trial
HISTORY_NAME = "history.json"  # beside it: every epoch's metrics up to that checkpoint
# in a trial's folder once CheckpointKeeper pruned it: its final result, which an older saved state may lack
ENDED_NAME = "ended.json"
# in a result.json row written from a checkpoint's history after a resume, not from a Tune result (ResultLog)
FILLED_KEY = "filled_from_checkpoint"
TRAINER_STATE = ("optimizer_states", "lr_schedulers", "callbacks")  # what Lightning leaves out of weights-only files
SEARCH_FILE = "search.json"  # the resolved description of a search, so --resume needs nothing else
SUMMARY_FILE = "summary.json"  # a search's results, written at its end (and at every interruption)
TUNE_STATE_FILE = "tuner.pkl"  # Tune's own record of a search (Tuner.restore needs it): its presence marks one
TRIAL_PREFIX = "trial_"  # a trial's folder and name in Tune's storage: trial_<trial id>
PART = ".part"  # a file being written whole (write_whole): a name no pattern of Tune's or ours matches
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


def write_whole(path: Path | str, text: str) -> None:
    """Write a file so that a reader, or a driver killed mid-write, finds the old text or the new, never a part:
    a temporary name beside it, then a rename (atomic on one filesystem). A resume reads these files after any kill.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}{PART}")  # one writer per file (one driver per search): a fixed name
    partial.write_text(text)
    os.replace(partial, path)


def write_whole_to(fs: Any, path: str, data: bytes) -> None:
    """write_whole on a pyarrow filesystem `fs` (a folder or an object store): `data` to `path` through a temporary
    name and a move, so a reader never sees half a file (an object store's upload is whole anyway)."""
    with fs.open_output_stream(path + PART) as stream:
        stream.write(data)
    fs.move(path + PART, path)


def config_to_argv(config: dict[str, Any]) -> list[str]:
    """A trial config (run flag -> value) as run_experiment.py flags."""
    argv = []
    for key, value in config.items():
        if isinstance(value, bool):
            argv += [f"--{key}"] if value else []
        elif value is not None:
            argv.append(f"--{key}={value}")
    return argv


def with_precision(config: dict[str, Any], precision: str | None) -> dict[str, Any]:
    """A trial's run flags with the precision it trained in (--precision auto, as resolved on its node), if known."""
    return {**config, "precision": precision} if precision else dict(config)


def replay_command(config: dict[str, Any], epochs: int | None = None) -> str:
    """The run_experiment.py command line that trains a trial's config as a single run."""
    run_args = {**config, **({"max_epochs": epochs} if epochs else {})}
    return shlex.join(["python", RUN_SCRIPT, *config_to_argv(run_args)])


def resume_command(name: str, storage: str) -> str:
    """The command line that continues an interrupted search."""
    return shlex.join(["python", SEARCH_SCRIPT, "--resume", "--name", name, "--storage-path", storage])


def leet_command(folder: str) -> str:
    """The command line of W&B's terminal viewer (wandb leet) on a search's offline runs: every trial's curves, live."""
    return shlex.join(["wandb", "leet", str(Path(folder) / "wandb")])


def search_sync_command(folder: str) -> str:
    """The command line that uploads an offline search's W&B runs and makes them a sweep."""
    return shlex.join(["python", SEARCH_SCRIPT, "sync", folder])


class TrialStatus(str, enum.Enum):
    """How a trial ended, or why it has not: the strings summary.json, trials.csv and W&B show (a str enum, so they
    stay the same strings, and a status read back from JSON compares equal to its member)."""

    COMPLETED = "completed"  # ran max_t epochs
    STOPPED_EARLY = "stopped_early"  # by ASHA, at a rung
    DIVERGED = "diverged"  # a loss became NaN or infinite
    ERROR = "error"  # failed, after its retries
    STOPPED_BY_BUDGET = "stopped_by_budget"  # started, and the search's time budget ended it
    NOT_STARTED = "not_started"  # the time budget ended the search before it started
    INTERRUPTED = "interrupted"  # started, not finished: --resume continues it
    PENDING = "pending"  # never started: --resume starts it

    __hash__ = str.__hash__  # "completed" in a set of members, as a status read back from JSON is a plain string

    def __str__(self) -> str:
        return self.value


TrialStatus.FINAL = frozenset(set(TrialStatus) - {TrialStatus.INTERRUPTED, TrialStatus.PENDING})  # a search that ended
TrialStatus.RANKED = frozenset({TrialStatus.COMPLETED, TrialStatus.STOPPED_EARLY, TrialStatus.STOPPED_BY_BUDGET})
TrialStatus.BUDGET = frozenset({TrialStatus.STOPPED_BY_BUDGET, TrialStatus.NOT_STARTED})  # what a spent time budget does
TrialStatus.FAILED = frozenset({TrialStatus.ERROR, TrialStatus.DIVERGED})  # no best checkpoint, never the winner


def its_end(trial_id: str, last: dict[str, Any], live: Collection[str], max_t: int) -> dict[str, Any]:
    """A trial's last result, with `done` saying whether the trial has ended. Not for a trial Tune had not ended
    (`live`, TrialClock), whatever its result says. Yes for one that trained all max_t epochs: a trial resumed from a
    checkpoint of its last epoch (newer than Tune's state knew, checkpoints.repair_tracked) reports no result again,
    and Tune ends it with the checkpoint's metrics, which carry no `done` (seen in the chaos benchmark: the trial
    stayed interrupted, and every --resume exited 130)."""
    if trial_id in live:
        return {**last, "done": False}
    return {**last, "done": True} if last.get("training_iteration", 0) >= max_t else last


def trial_status(
    last: dict[str, Any], max_t: int, error: bool = False, budget_ended: bool = False, started: bool = False
) -> TrialStatus:
    """A trial's outcome from its last result: completed (ran max_t epochs), stopped_early (by ASHA),
    diverged, error, interrupted (started, not finished) or pending (never started); when the search's time
    budget ended it, its unfinished trials are stopped_by_budget (started) or not_started. `started`: the driver
    saw it start, so it was, even with no result yet (as its W&B run, open since then, says).

    Tune marks the last result of a finished trial `done` (ASHA's stop included), so no Tune status is needed.
    """
    if error:
        return TrialStatus.ERROR
    if last.get("diverged"):
        return TrialStatus.DIVERGED
    if not last.get("training_iteration") and not started:
        return TrialStatus.NOT_STARTED if budget_ended else TrialStatus.PENDING
    if not last.get("done"):
        return TrialStatus.STOPPED_BY_BUDGET if budget_ended else TrialStatus.INTERRUPTED
    return TrialStatus.COMPLETED if last["training_iteration"] >= max_t else TrialStatus.STOPPED_EARLY


def search_ended(rows: list[dict[str, Any]], sampled_all: bool = True) -> bool:
    """Whether a search ended: its sampler got to the end (`sampled_all`: the driver knows) and every trial it made
    ended (TrialStatus.FINAL). Else it was interrupted, and --resume goes on."""
    return sampled_all and all(row["status"] in TrialStatus.FINAL for row in rows)


def wandb_run_id(search_name: str, trial_id: str) -> str:
    """A stable W&B run id for a trial: the search name and Tune's trial id."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", f"{search_name}-{trial_id}")[:128]
