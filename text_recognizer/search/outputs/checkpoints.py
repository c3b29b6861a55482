"""Runs in the driver: which of a trial's checkpoints a search keeps, and Tune's record of them repaired on resume.

- At the start of a resumed search, `repair_tracked`: Tune's saved state of a trial may name checkpoints that are
  gone from storage (the driver was killed after Tune deleted one but before the state that says so reached the
  storage, which on S3 happens later). Tune would then refuse to restore the trial and end it in `error`. Instead
  the trial resumes from its newest checkpoint that is on storage, or from scratch, and the search says so in one line.
- `CheckpointKeeper` (a Tune callback): once a trial has ended, only its best checkpoint is left, weights only,
  and its final result in ENDED_NAME beside them, so that a resume from an older saved state ends it again.
  Unfinished trials keep what Tune keeps for `--resume`; a trial that errored keeps both, as `--resume` retries it
  from its newest.
- `keep_best_trials`: at the end of a finished search, the checkpoints of its best trials only.

The checkpoint a resumed trial starts from is chosen in its actor (trial/resume.py). Every file operation goes through
the checkpoint's own pyarrow filesystem (a folder, or a URI such as s3://...); torch is imported only where a
checkpoint is rewritten.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
import sys
from pathlib import Path
from typing import Any

import pyarrow.fs
from ray import tune
from ray.tune.logger import JsonLoggerCallback

from text_recognizer.facts import (
    CHECKPOINT_NAME,
    ENDED_NAME,
    FILLED_KEY,
    HISTORY_NAME,
    TRAINER_STATE,
    TRIAL_PREFIX,
    TrialStatus,
    search_ended,
    write_whole_to,
)
from text_recognizer.search.trial.resume import FOLDER, SKIPPED_KEY, WARNING_KEY, checkpoint_folders, index, siblings


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
    write_whole_to(fs, path, buffer.getvalue())
    return True


def tracked_results(trial: Any) -> tuple[Any, Any]:
    """The trial's best result with a checkpoint, by the search's metric, and its newest (each with .checkpoint and
    .metrics, or None), as Tune's checkpoint manager keeps them. Tune has no public accessor for them while a search
    runs: this is the one place that reads them (tests/test_reliability.py checks what it leads to, so a Ray
    release that moves them fails there)."""
    manager = trial.run_metadata.checkpoint_manager
    return manager.best_checkpoint_result, manager.latest_checkpoint_result


def tracked(trial: Any) -> tuple[tune.Checkpoint | None, tune.Checkpoint | None]:
    """The trial's best checkpoint by the search's metric and its newest (tracked_results' checkpoints)."""
    best, latest = tracked_results(trial)
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


def stored_folders(fs: pyarrow.fs.FileSystem, trial_dir: str) -> dict[str, set[str]]:
    """The checkpoint folders of the trial at `trial_dir` as they are on storage now, each with the names of its
    files: one listing of the trial's folder (one request on S3)."""
    folders: dict[str, set[str]] = {}
    for info in fs.get_file_info(pyarrow.fs.FileSelector(trial_dir, recursive=True, allow_not_found=True)):
        parent = posixpath.dirname(info.path)
        if info.type == pyarrow.fs.FileType.File and FOLDER.search(parent):
            folders.setdefault(parent, set()).add(info.base_name)
    return folders


def saved_metrics(fs: pyarrow.fs.FileSystem, folder: str) -> dict[str, Any] | None:
    """The last epoch's metrics in the history saved beside a checkpoint's model file, as Tune's result of it (its
    epoch is the trial's training_iteration); None when the history can't be read."""
    try:
        with fs.open_input_stream(posixpath.join(folder, HISTORY_NAME)) as stream:
            last = json.loads(stream.readall())[-1]
        return {**last, "training_iteration": int(last["epoch"])}
    except (OSError, ValueError, IndexError, KeyError, TypeError):
        return None


def retrack(trial: Any, present: set[str], newest: tuple[tune.Checkpoint, dict[str, Any]] | None) -> None:
    """Rewrite the checkpoints Tune tracks for `trial`: keep those whose folder is in `present`, and make `newest` (a
    checkpoint and its metrics; None: none, the trial starts from scratch) its latest, the one Tune restores.

    Tune has no public way to do this: Ray 2.60 keeps them in the private `_checkpoint_results` and
    `_latest_checkpoint_result` of the trial's `_CheckpointManager`, each a private `_TrainingResult`. This is the
    one place that reaches into them (tests/test_checkpoints.py checks it on Ray's own classes, so a Ray release
    that moves them fails there, loudly)."""
    from ray.train._internal.session import _TrainingResult

    manager = trial.run_metadata.checkpoint_manager
    if not all(hasattr(manager, name) for name in ("_checkpoint_results", "_latest_checkpoint_result", "_get_checkpoint_score")):
        raise RuntimeError("this Ray release tracks a trial's checkpoints elsewhere: update checkpoints.retrack")
    kept = [result for result in manager._checkpoint_results if result.checkpoint.path.rstrip("/") in present]
    latest = None
    if newest is not None:
        path = newest[0].path.rstrip("/")
        latest = next((r for r in kept if r.checkpoint.path.rstrip("/") == path), None) or _TrainingResult(*newest)
        kept += [] if latest in kept else [latest]
    manager._checkpoint_results = sorted(kept, key=manager._get_checkpoint_score)  # ascending, as Tune keeps them
    manager._latest_checkpoint_result = latest
    trial.invalidate_json_state()  # the next experiment state saved holds the repaired one
    trial.run_metadata.invalidate_cache()


def newest_stored(
    fs: pyarrow.fs.FileSystem, stored: dict[str, set[str]], above: int = -1
) -> tuple[tune.Checkpoint, dict[str, Any]] | None:
    """The trial's newest checkpoint folder on storage with an index above `above` that holds a model file and a
    history that reads, with its metrics (Tune's result of it); None when there is none."""
    for folder in sorted(stored, key=lambda path: int(FOLDER.search(path).group(1)), reverse=True):
        if int(FOLDER.search(folder).group(1)) <= above or not {CHECKPOINT_NAME, HISTORY_NAME} <= stored[folder]:
            continue
        metrics = saved_metrics(fs, folder)
        if metrics is not None:
            return tune.Checkpoint(folder, filesystem=fs), metrics
    return None


def trial_folder(trial: Any) -> str | None:
    """The trial's folder on storage; None for a trial that never started (no folder yet)."""
    try:
        return trial.path
    except RuntimeError:  # Tune's storage has no folder name for it
        return None


def forget(trial: Any, names: list[str]) -> None:
    """Stop tracking the trial's checkpoints in these folders (by name), which its actor found unreadable or weights
    only and passed over: Tune tracks each with its epoch's metrics and could keep one as the trial's best, whose
    test then fails (seen: a truncated model file kept as the winner's). Its latest, if among them, becomes its
    newest other one until Tune tracks this result's checkpoint."""
    manager = trial.run_metadata.checkpoint_manager
    tracked_now = [*manager.best_checkpoint_results, *filter(None, [manager.latest_checkpoint_result])]
    kept = [r for r in tracked_now if posixpath.basename(r.checkpoint.path.rstrip("/")) not in names]
    latest = manager.latest_checkpoint_result if manager.latest_checkpoint_result in kept else None
    latest = latest or max(kept, key=lambda result: index(result.checkpoint), default=None)
    retrack(trial, {r.checkpoint.path.rstrip("/") for r in kept}, latest and (latest.checkpoint, latest.metrics))


def repair_tracked(trial: Any) -> str | None:
    """Before a resumed trial is restored: make the checkpoint Tune restores it from its newest one on storage.

    - Tune's saved state may name checkpoints that are gone from storage: they are dropped. If its latest is gone,
      the trial resumes from its newest folder on storage that holds a model file and its history, or from scratch,
      and the one-line warning that says so is returned.
    - A trial's actor writes each epoch's checkpoint straight to storage, and Tune saves the state that records it
      up to 10 s later: a driver killed in between leaves an unended trial with newer checkpoints (or its first ones)
      that the state never knew. It resumes from the newest of them, without a word: no epoch is lost, and Tune's
      result.json, which Tune restores only for a trial with a checkpoint, keeps the rows it had (ResultLog fills
      any the killed driver never copied to storage). An ended trial is left as it ended.
    Returns None unless a checkpoint the state names as the latest is gone."""
    folder = trial_folder(trial)
    _, latest = tracked(trial)
    if folder is None or (latest is None and trial.status == trial.TERMINATED):
        return None
    fs = trial.storage.storage_filesystem
    stored = stored_folders(fs, folder)
    present = {path for path, files in stored.items() if CHECKPOINT_NAME in files}
    manager = trial.run_metadata.checkpoint_manager
    named = [r.checkpoint for r in [*manager.best_checkpoint_results, manager.latest_checkpoint_result] if r is not None]
    if latest is None or latest.path.rstrip("/") in present:
        newer = None if trial.status == trial.TERMINATED else newest_stored(fs, stored, index(latest) if latest else -1)
        if newer is not None:
            retrack(trial, present, newer)
            trial.storage.current_checkpoint_index = max(trial.storage.current_checkpoint_index, index(newer[0]))
        elif not all(checkpoint.path.rstrip("/") in present for checkpoint in named):
            retrack(trial, present, (latest, manager.latest_checkpoint_result.metrics))  # an older one is gone
        return None
    gone = posixpath.basename(latest.path.rstrip("/"))
    newest = newest_stored(fs, stored)
    retrack(trial, present, newest)
    if newest is None:
        return f"{gone}, which Tune's state names, is gone from storage: restarted from scratch"
    # its next checkpoint goes to a new folder, not over the one it resumes from
    trial.storage.current_checkpoint_index = max(trial.storage.current_checkpoint_index, index(newest[0]))
    return f"{gone}, which Tune's state names, is gone from storage: resumed from {posixpath.basename(newest[0].path)}"


def result_rows(path: Path) -> list[dict[str, Any]]:
    """A trial's results from Tune's result.json, one per epoch (a line cut short by a killed driver skipped)."""
    rows = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[row["training_iteration"]] = row
    return [rows[epoch] for epoch in sorted(rows)]


class ResultLog(JsonLoggerCallback):
    """Tune's result.json writer (JsonLoggerCallback), which loses no epoch of a trial resumed from a checkpoint
    newer than the rows on storage: a killed driver copied its rows there last up to 10 s before, while the trial's
    actor wrote each checkpoint at once (repair_tracked resumes from the newest). The trial's first report after
    the restore carries its checkpoint's history (trial_process.ReportCallback); its epochs missing from the file
    are written first, from that history, so the file has each epoch once, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.last_epoch: dict[str, int] = {}  # by trial id: the newest epoch in the trial's result.json

    def log_trial_start(self, trial: Any) -> None:
        super().log_trial_start(trial)  # restores the file from storage for a trial with a checkpoint
        rows = result_rows(Path(trial.local_path) / "result.json")
        self.last_epoch[trial.trial_id] = rows[-1]["training_iteration"] if rows else 0

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        last, epoch = self.last_epoch.get(trial.trial_id, 0), result.get("training_iteration", 0)
        for row in result.get("restored_history") or []:
            if last < row["epoch"] < epoch:  # trained before the restore; its row never reached storage
                # as Tune's rows are, with its keys that readers use (but not its timings, which it never measured)
                tune_keys = {"training_iteration": row["epoch"], "trial_id": trial.trial_id, "config": trial.config}
                filled = {**row, **tune_keys, "done": False, FILLED_KEY: True}
                super().log_trial_result(iteration, trial, filled)
        if not (result.get(FILLED_KEY) and epoch <= last):  # a trial resumed from its last epoch reports it again
            super().log_trial_result(iteration, trial, result)
        self.last_epoch[trial.trial_id] = max(last, epoch)


class CheckpointKeeper(tune.Callback):
    """Repairs a resumed search's state of checkpoints gone from storage; prunes an ended trial's checkpoints to its
    best one, weights only; prints a resumed trial's fallback warning.

    Pruning is not at once: Tune saves the search's state (which checkpoint each trial resumes from) every 10 s or
    so, and a driver killed in between resumes an ended trial as still running, from a checkpoint pruning would have
    deleted (seen in the chaos benchmark: the trial then failed for good, "Could not recover from checkpoint"). So a
    trial is pruned once a saved state that has it ended has been written, and is followed by the next: Tune asks
    every callback for its state (get_state) as it saves. `prune_ended` prunes the rest once the search's fit
    returns."""

    def __init__(self) -> None:
        self.repaired = False
        self.ended: list[Any] = []  # ended since the last save of the search's state
        self.saved: list[Any] = []  # ended before it: pruned at the next save

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        """Tune's first step, before it starts (and restores) any trial: a resumed search's trials are all there."""
        if self.repaired:
            return
        self.repaired = True
        for trial in trials:
            warning = repair_tracked(trial)
            # an ended trial is never restored: a finished part deleted its checkpoints on purpose (keep_best_trials)
            if warning and trial.status != trial.TERMINATED:
                print(f"warning: trial {trial.trial_id}: {warning}", file=sys.stderr, flush=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get(WARNING_KEY):
            print(f"warning: trial {trial.trial_id}: {result[WARNING_KEY]}", file=sys.stderr, flush=True)
            forget(trial, result.get(SKIPPED_KEY) or [])

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


def write_ended(trial: Any, best: tune.Checkpoint) -> None:
    """The trial's final result, as ENDED_NAME in its folder (whole or not at all), before pruning takes what an
    older saved state would resume it from: a resume that falls back to one ends it again from this
    (saved_state.repair)."""
    path = posixpath.join(posixpath.dirname(best.path.rstrip("/")), ENDED_NAME)
    write_whole_to(best.filesystem, path, json.dumps(trial.last_result, default=repr).encode())


def prune(trial: Any) -> None:
    best, _ = tracked(trial)
    if best is None:
        return
    try:
        write_ended(trial, best)  # first: if it fails, nothing is pruned
        keep_only(best)
    except Exception as error:  # pruning saves space; it never ends a search
        print(f"warning: trial {trial.trial_id}: its checkpoints were not pruned ({error})", file=sys.stderr, flush=True)


def keep_best_trials(
    results: list[Any],
    rows: list[dict[str, Any]],
    winner: str | None,
    metric: str,
    mode: str,
    keep: int,
    sampled_all: bool = True,
) -> list[str] | None:
    """At the end of a finished search: delete every checkpoint of the ended trials but the winner's and the best
    `keep` by their best metric, and of the diverged ones; returns the ids of the trials whose checkpoint is kept.
    Errored trials keep theirs (--resume retries them); an interrupted search deletes nothing (its ranking is not
    final) and returns None; `sampled_all`: the sampler got to the end (facts.search_ended)."""
    if not search_ended(rows, sampled_all):
        return None
    key, sign = f"best_{metric}", (-1 if mode == "max" else 1)
    ranked = sorted(
        (r for r in rows if r["status"] in TrialStatus.RANKED and r.get(key) is not None), key=lambda r: sign * r[key]
    )
    kept = list(dict.fromkeys([*([winner] if winner else []), *(row["trial_id"] for row in ranked)]))[:keep]
    # not_started: a trial can write its first checkpoint as the budget ends, its result never delivered
    gone = TrialStatus.RANKED | {TrialStatus.DIVERGED, TrialStatus.NOT_STARTED}
    drop = {row["trial_id"] for row in rows if row["status"] in gone} - set(kept)
    better = max if mode == "max" else min
    # trials the time budget stopped never ended in Tune's sense: CheckpointKeeper did not prune them
    unpruned = {row["trial_id"] for row in rows if row["status"] == TrialStatus.STOPPED_BY_BUDGET} & set(kept)
    for result in results:
        trial_id = posixpath.basename(result.path.rstrip("/")).removeprefix(TRIAL_PREFIX)
        known = [c for c in (result.checkpoint, *(c for c, _ in result.best_checkpoints or [])) if c is not None]
        if trial_id in drop:  # what is on storage: a budget's stop can come after a checkpoint Tune never saw
            for folder in checkpoint_folders(result.filesystem, result.path.rstrip("/")):
                folder.filesystem.delete_dir(folder.path)
        # nor did a driver killed between a trial's end and the next save of the search's state
        elif trial_id in kept and result.best_checkpoints and (trial_id in unpruned or len(siblings(known[0])) > 1):
            keep_only(better(result.best_checkpoints, key=lambda pair: pair[1].get(metric, sign * math.inf))[0])
    return kept
