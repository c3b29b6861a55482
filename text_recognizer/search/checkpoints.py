"""Runs in the driver and in Tune's trial actors: which of a trial's checkpoints a search keeps, and which one a
resumed trial starts from.

- In the actor, `resumable`: a resumed trial starts from its newest readable checkpoint. Its newest one may be
  unreadable (a file truncated by a full disk or a killed copy); it then falls back to the one before, or to
  scratch, and says so in one line.
- In the driver, `CheckpointKeeper` (a Tune callback): once a trial has ended, only its best checkpoint is left,
  weights only. Unfinished trials keep what Tune keeps for `--resume`; a trial that errored keeps both, as
  `--resume` retries it from its newest.

Checkpoints live in Tune's storage, a folder or a URI (s3://...): every file operation goes through the
checkpoint's own pyarrow filesystem. Torch is imported only where a checkpoint is rewritten (in the driver), so a
fork-mode actor, which checks checkpoints here, never loads it.
"""

from __future__ import annotations

import io
import math
import os
import posixpath
import re
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow.fs
from ray import tune

from text_recognizer.facts import CHECKPOINT_NAME, search_ended

FOLDER = re.compile(r"checkpoint_(\d+)$")  # Tune's name for a trial's checkpoint folders
TRAINER_STATE = ("optimizer_states", "lr_schedulers", "callbacks")  # what Lightning leaves out of weights-only files
WARNING_KEY = "checkpoint_warning"  # a result's note that the trial did not resume from its newest checkpoint


def index(checkpoint: tune.Checkpoint) -> int:
    match = FOLDER.search(checkpoint.path.rstrip("/"))
    return int(match.group(1)) if match else -1


def siblings(checkpoint: tune.Checkpoint) -> list[tune.Checkpoint]:
    """Every checkpoint folder of the trial that `checkpoint` belongs to, newest (highest index) first."""
    fs, folder = checkpoint.filesystem, posixpath.dirname(checkpoint.path.rstrip("/"))
    found = [
        tune.Checkpoint(info.path, filesystem=fs)
        for info in fs.get_file_info(pyarrow.fs.FileSelector(folder))
        if info.type == pyarrow.fs.FileType.Directory and FOLDER.search(info.base_name)
    ]
    return sorted(found, key=index, reverse=True)


def unreadable(path: str) -> str | None:
    """Why the checkpoint file at `path` can't be read, or None when it can. torch saves a zip archive: one whose
    members all match their CRC-32 is whole; a truncated or overwritten file is not."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except FileNotFoundError:
        return "missing"
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return f"{bad} fails its CRC check" if bad else None


@contextmanager
def resumable(newest: tune.Checkpoint | None) -> Iterator[tuple[str | None, str | None]]:
    """The model file a trial resumes from (None: from scratch), and a one-line warning when that is not `newest`:
    the newest readable checkpoint of the trial, no newer than the one Tune restores (`tune.get_checkpoint()`)."""
    if newest is None:
        yield None, None
        return
    skipped = []
    for candidate in [c for c in siblings(newest) if index(c) <= index(newest)] or [newest]:
        with candidate.as_directory() as directory:
            path = os.path.join(directory, CHECKPOINT_NAME)  # a local folder
            problem = unreadable(path)
            if problem is None:
                yield path, fallback_warning(skipped, posixpath.basename(candidate.path.rstrip("/")))
                return
        skipped.append(f"{posixpath.basename(candidate.path.rstrip('/'))}/{CHECKPOINT_NAME} ({problem})")
    yield None, fallback_warning(skipped, None)


def fallback_warning(skipped: list[str], used: str | None) -> str | None:
    if not skipped:
        return None
    start = f"resumed from {used}" if used else "restarted from scratch"
    return f"unreadable checkpoint {', '.join(skipped)}: {start}"


def weights_only(checkpoint: tune.Checkpoint) -> bool:
    """Rewrite a checkpoint's model file without the trainer's state (optimizer, schedulers, callbacks), as Lightning's
    weights-only checkpoints are: --load_checkpoint and predict read it as before. False when it already was."""
    import torch  # the driver has it loaded; actors that only check checkpoints never import it

    fs, path = checkpoint.filesystem, posixpath.join(checkpoint.path, CHECKPOINT_NAME)
    with fs.open_input_stream(path) as stream:
        state = torch.load(io.BytesIO(stream.readall()), map_location="cpu", weights_only=True)
    if not any(key in state for key in TRAINER_STATE):
        return False
    buffer = io.BytesIO()
    torch.save({key: value for key, value in state.items() if key not in TRAINER_STATE}, buffer)
    with fs.open_output_stream(path + ".partial") as stream:
        stream.write(buffer.getvalue())
    fs.move(path + ".partial", path)  # whole or not at all: a reader never sees half a file
    return True


def tracked(trial: Any) -> tuple[tune.Checkpoint | None, tune.Checkpoint | None]:
    """The trial's best checkpoint by the search's metric and its newest, as Tune's checkpoint manager keeps them.
    Tune has no public accessor for the best one of a running search's trial: this is the one place that reads it
    (tests/test_reliability.py checks what it leads to, so a Ray release that moves it fails there)."""
    manager = trial.run_metadata.checkpoint_manager
    best, latest = manager.best_checkpoint_result, manager.latest_checkpoint_result
    return (best.checkpoint if best else None), (latest.checkpoint if latest else None)


def keep_only(best: tune.Checkpoint) -> list[str]:
    """Delete every other checkpoint folder of best's trial and make best weights only; returns what was deleted."""
    deleted = []
    for other in siblings(best):
        if other.path.rstrip("/") != best.path.rstrip("/"):
            other.filesystem.delete_dir(other.path)
            deleted.append(other.path)
    weights_only(best)
    return deleted


class CheckpointKeeper(tune.Callback):
    """Prunes an ended trial's checkpoints to its best one, weights only; prints a resumed trial's fallback warning.

    Not at once: Tune saves the search's state (which checkpoint each trial resumes from) every 10 s or so, and a
    driver killed in between resumes an ended trial as still running, from a checkpoint pruning would have deleted
    (seen in the chaos benchmark: the trial then failed for good, "Could not recover from checkpoint"). So a trial
    is pruned once a saved state that has it ended has been written, and is followed by the next: Tune asks every
    callback for its state (get_state) as it saves. `prune_ended` prunes the rest once the search's fit returns."""

    def __init__(self) -> None:
        self.ended: list[Any] = []  # ended since the last save of the search's state
        self.saved: list[Any] = []  # ended before it: pruned at the next save

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get(WARNING_KEY):
            print(f"warning: trial {trial.trial_id}: {result[WARNING_KEY]}", file=sys.stderr, flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended.append(trial)

    def get_state(self) -> None:
        """Called as Tune saves the search's state, after it has written the trials': prunes those whose end an
        earlier save already holds. No state of its own to save (None)."""
        ready, self.saved, self.ended = self.saved, self.ended, []
        for trial in ready:
            prune(trial)

    def prune_ended(self) -> None:
        """Prune every ended trial left: once the fit has returned, Tune has saved the search's final state."""
        ready, self.saved, self.ended = [*self.saved, *self.ended], [], []
        for trial in ready:
            prune(trial)


def prune(trial: Any) -> None:
    best, _ = tracked(trial)
    if best is None:
        return
    try:
        keep_only(best)
    except Exception as error:  # noqa: BLE001 - pruning saves space; it never ends a search
        print(f"warning: trial {trial.trial_id}: its checkpoints were not pruned ({error})", file=sys.stderr, flush=True)


ENDED = ("completed", "stopped_early", "stopped_by_budget")  # ended trials ranked by their best metric


def keep_best_trials(
    results: list[Any], rows: list[dict[str, Any]], winner: str | None, metric: str, mode: str, keep: int
) -> list[str] | None:
    """At the end of a finished search: delete every checkpoint of the ended trials but the winner's and the best
    `keep` by their best metric, and of the diverged ones; returns the ids of the trials whose checkpoint is kept.
    Errored trials keep theirs (--resume retries them); an interrupted search deletes nothing (its ranking is not
    final) and returns None."""
    if not search_ended(rows):
        return None
    key, sign = f"best_{metric}", (-1 if mode == "max" else 1)
    ranked = sorted((r for r in rows if r["status"] in ENDED and r.get(key) is not None), key=lambda r: sign * r[key])
    kept = list(dict.fromkeys([*([winner] if winner else []), *(row["trial_id"] for row in ranked)]))[:keep]
    drop = {row["trial_id"] for row in rows if row["status"] in (*ENDED, "diverged")} - set(kept)
    better = max if mode == "max" else min
    # trials the time budget stopped never ended in Tune's sense: CheckpointKeeper did not prune them
    unpruned = {row["trial_id"] for row in rows if row["status"] == "stopped_by_budget"} & set(kept)
    for result in results:
        trial_id = posixpath.basename(result.path.rstrip("/")).removeprefix("trial_")  # its folder is trial_<id>
        known = [c for c in (result.checkpoint, *(c for c, _ in result.best_checkpoints or [])) if c is not None]
        if trial_id in drop and known:
            for folder in siblings(known[0]):
                folder.filesystem.delete_dir(folder.path)
        # nor did a driver killed between a trial's end and the next save of the search's state
        elif trial_id in kept and result.best_checkpoints and (trial_id in unpruned or len(siblings(known[0])) > 1):
            keep_only(better(result.best_checkpoints, key=lambda pair: pair[1].get(metric, sign * math.inf))[0])
    return kept
