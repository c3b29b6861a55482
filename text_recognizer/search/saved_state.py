"""Runs in the driver, before `Tuner.restore`: Tune restores the newest saved state of the search that reads.

Tune saves a search's state as a set of files that share a timestamp: experiment_state-<ts>.json and its search
algorithm's basic-variant-state-<ts>.json, search_gen_state-<ts>.json or searcher-state-<ts>.pkl. It writes them in
the driver's staging folder and copies them to storage without a rename, so a driver killed mid-copy leaves a set
cut short there. Tune restores from the newest set by name; when that one does not read, it logs an error and starts
the search again from nothing under the same name (seen in the long chaos run: 436 trials dropped for a new search
of 1). So, before a restore, every set newer than the newest that reads is moved aside, as <file>.unreadable (kept,
never deleted), and Tune restores that one. The ids of the trials it holds (`repair`'s) let the search algorithm,
saved in another file of the set and restored from the driver's staging folder, agree with it (grow.reconcile_*).
The sets older than the one restored go into superseded-state/ (kept): Tune downloads every .json and .pkl of the
search folder at each restore and uploads them all again at each save.

A driver's saves all share its start as their stamp: each overwrites the one before, on storage too. So a
first driver killed mid-copy (seen in CI: SIGKILL right as a trial's second epoch reached storage) would leave no set
that reads. `WholeState` keeps a second copy of the set, written whole or not at all: every WHOLE_EVERY_S, at a save,
once Tune has written the set in its staging folder, and after the final save, it copies it to storage under the
stamp `<stamp>~whole` through a temporary name and a move. A resume tries Tune's own copy first (it is the newer),
then that one (`preference`).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
from ray import cloudpickle, tune
from ray.train._internal.storage import get_fs_and_path

from text_recognizer.facts import ENDED_NAME, PART, TRIAL_PREFIX, TrialStatus, its_end, trial_status, write_whole_to
from text_recognizer.util import UserError

STATE_FILE = re.compile(r"(?:experiment_state|basic-variant-state|search_gen_state|searcher-state)-(.+)\.(?:json|pkl)")
EXPERIMENT_STATE = "experiment_state-{}.json"  # Tune's TuneController.CKPT_FILE_TMPL
SET_ASIDE = ".unreadable"  # a suffix no Tune pattern matches
WHOLE = "~whole"  # WholeState's stamp suffix: '~' sorts after every character of Tune's stamps
# how often WholeState copies: at every save a copy took 32 ms of the driver's loop on a 1,000-trial state (28 MB),
# and Tune saves about twice a trial there; Tune's own unforced saves are 10 s apart
WHOLE_EVERY_S = 10.0
SUPERSEDED = "superseded-state"  # the sets older than the one restored: Tune reads only the search folder's own files
TRIAL_FOLDER = re.compile(re.escape(TRIAL_PREFIX) + r"(.+?)(?:_[0-9a-f]{4})?")  # its id: see trial_folders


def reads(fs: pafs.FileSystem, path: str) -> bool:
    """The file decodes whole, as Tune reads it: the experiment's state is JSON, its searcher's a cloudpickle (even
    in a .json; unpickling imports its searcher)."""
    try:
        with fs.open_input_stream(path) as stream:
            data = stream.readall()
        json.loads(data) if path.rpartition("/")[2].startswith("experiment_state-") else cloudpickle.loads(data)
    except Exception:  # cut short, empty, or gone: any of them is a state Tune can't restore
        return False
    return True


def file_names(fs: pafs.FileSystem, root: str, infos: list[pafs.FileInfo] | None = None) -> list[str]:
    """The names of the files in the search's folder (not its trial folders); `infos`: its listing, if made."""
    infos = fs.get_file_info(pafs.FileSelector(root)) if infos is None else infos
    return [info.base_name for info in infos if info.type == pafs.FileType.File]


def preference(stamp: str) -> tuple[str, bool]:
    """The order a resume tries the sets in: the newest driver's first; of one driver's, Tune's own copy (its newest
    save, when it reads) before WholeState's, which is up to WHOLE_EVERY_S older."""
    return stamp.removesuffix(WHOLE), not stamp.endswith(WHOLE)


def restorable(experiment: str, storage_filesystem: pafs.FileSystem | None = None) -> str | None:
    """Make the first readable state set of the search at `experiment` (a path or URI), in `preference` order, the
    only one in its folder, so the one Tune restores: the sets tried before it are moved aside, as *.unreadable, and
    the rest into SUPERSEDED (every set would otherwise be downloaded at each restore and uploaded again at each save
    of every later driver); returns a one-line warning when any did not read, None when the first does."""
    fs, root = get_fs_and_path(experiment, storage_filesystem)
    names = file_names(fs, root)
    sets: dict[str, list[str]] = {}
    for name in names:
        if match := STATE_FILE.fullmatch(name):
            sets.setdefault(match.group(1), []).append(name)
    stamps = sorted(sets, key=preference, reverse=True)
    complete = (stamp for stamp in stamps if EXPERIMENT_STATE.format(stamp) in sets[stamp])
    chosen = next((stamp for stamp in complete if all(reads(fs, f"{root}/{name}") for name in sets[stamp])), None)
    if chosen is None:
        if not stamps:
            return None  # nothing saved: Tune says so itself
        raise UserError(f"no saved state of the search at {experiment} reads (experiment_state-*.json); nothing was changed")
    at = stamps.index(chosen)
    unread = [name for stamp in stamps[:at] for name in sorted(sets[stamp])]
    for name in unread:
        fs.move(f"{root}/{name}", f"{root}/{name}{SET_ASIDE}")
    rest = [name for stamp in stamps[at + 1 :] for name in sorted(sets[stamp])]
    if rest:  # kept, out of the folder Tune downloads at each restore and uploads again at each save
        fs.create_dir(f"{root}/{SUPERSEDED}")
    for name in rest:
        fs.move(f"{root}/{name}", f"{root}/{SUPERSEDED}/{name}")
    if not unread:
        return None
    return (
        f"warning: the search's newest saved state ({', '.join(unread)}) does not read, cut short by a killed driver;"
        f" resuming from the one before ({chosen}); the unread files are kept as *{SET_ASIDE}"
    )


def newest_state(fs: pafs.FileSystem, root: str, infos: list[pafs.FileInfo] | None = None) -> str | None:
    """The experiment_state file Tune restores: the newest by name, as Tune picks; None when there is none."""
    names = file_names(fs, root, infos)
    return max((name for name in names if name.startswith("experiment_state-") and name.endswith(".json")), default=None)


@dataclass
class Repair:
    """What `repair` found in (and did to) the saved state Tune restores."""

    trial_ids: set[str]  # every trial in it: the search algorithm must agree with them (grow.Part.restored)
    ended: dict[str, dict[str, Any]]  # trials it had unended that a pruning had ended: their final results
    warnings: list[str]  # one line each
    folders: set[str] = field(default_factory=set)  # the ids of the trials with a folder (a lost one's too)


def ended_results(fs: pafs.FileSystem, root: str, trials: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The final results CheckpointKeeper left (ENDED_NAME) in these trials' folders, by trial id: one file check a
    trial (one batch of requests on S3); a file that does not read counts as none."""
    paths = {t["trial_id"]: f"{root}/{t['relative_logdir']}/{ENDED_NAME}" for t in trials if t.get("relative_logdir")}
    results = {}
    for (trial_id, path), info in zip(paths.items(), fs.get_file_info(list(paths.values())), strict=True):
        if info.type != pafs.FileType.File:
            continue
        try:
            with fs.open_input_stream(path) as stream:
                results[trial_id] = json.loads(stream.readall())
        except (OSError, ValueError):
            continue
    return results


def repair(experiment: str, max_t: int, stopped: set[str], storage_filesystem: pafs.FileSystem | None = None) -> Repair:
    """Make the saved state Tune restores (its newest experiment_state, by name, as Tune picks) agree with each
    trial's end, in one read and at most one write of it:

    - A trial whose folder has ENDED_NAME ended, and CheckpointKeeper pruned it to its best checkpoint, weights only.
      A state that still has it unended is older than that end (the resume fell back to WholeState's copy, up to
      WHOLE_EVERY_S older, as Tune's own was cut by a killed driver). Tune would resume it from checkpoints that are
      gone or weights only, and Lightning refuses those: the trial ended in `error` (the long chaos run of
      2026-12-03, trial 00784). It goes back to TERMINATED with its final result.
    - A trial Tune's state has ended (TERMINATED) whose last result is not an end goes back to PENDING, so that the
      resume runs it on from its newest checkpoint. Not an end: what summary.json would call interrupted or pending
      (facts.its_end, trial_status: no `done`, fewer than max_t epochs, not diverged), and no time budget stopped it
      (`stopped`, search.json's budget_stopped: those stay stopped). Tune would never run it again, and every
      --resume exited 130 with it interrupted (the same run, trial 00170: a resumed driver ended it after its first
      epoch's result, which said go on, and handed its actor to the next trial 0.5 s later; how Tune came to was
      not found)."""
    fs, root = get_fs_and_path(experiment, storage_filesystem)
    infos = fs.get_file_info(pafs.FileSelector(root))  # one listing: the state files and the trial folders
    if (newest := newest_state(fs, root, infos)) is None:
        return Repair(set(), {}, [])
    with fs.open_input_stream(f"{root}/{newest}") as stream:
        state = json.loads(stream.readall())
    entries = [(entry, json.loads(entry[0]), json.loads(entry[1])) for entry in state["trial_data"]]
    ended = ended_results(fs, root, [trial for _, trial, _ in entries if trial["status"] != "TERMINATED"])
    reopened, closed = [], []
    for entry, trial, metadata in entries:
        trial_id, last = trial["trial_id"], metadata.get("last_result") or {}
        if trial_id in ended:
            trial["status"], metadata["last_result"] = "TERMINATED", ended[trial_id]
            entry[0], entry[1] = json.dumps(trial), json.dumps(metadata)
            closed.append(f"{trial_id} (epoch {ended[trial_id].get('training_iteration', 0)} of {max_t})")
            continue
        unended = trial_status(its_end(trial_id, last, (), max_t), max_t) not in TrialStatus.FINAL
        if trial["status"] == "TERMINATED" and unended and trial_id not in stopped:
            trial["status"] = "PENDING"
            entry[0] = json.dumps(trial)
            reopened.append(f"{trial_id} (epoch {last.get('training_iteration', 0)} of {max_t})")
    warnings = [f"warning: Tune's saved state ended trials {', '.join(reopened)} without their end: they run on"] * bool(reopened)
    warnings += [f"warning: the saved state is older than the end of trials {', '.join(closed)}: they stay ended"] * bool(closed)
    if warnings:
        write_whole_to(fs, f"{root}/{newest}", json.dumps(state).encode())  # whole or not at all, as WholeState writes
    return Repair({trial["trial_id"] for _, trial, _ in entries}, ended, warnings, trial_folders(infos))


def trial_folders(infos: list[pafs.FileInfo]) -> set[str]:
    """The ids of the trials with a folder in the search's (`infos`, its listing): trial_<id>, or trial_<id>_<4 hex>
    (Tune's name for a folder whose name was taken)."""
    return {
        m.group(1) for info in infos if info.type == pafs.FileType.Directory and (m := TRIAL_FOLDER.fullmatch(info.base_name))
    }


def copy_whole(staging: str, fs: pafs.FileSystem, root: str) -> list[str]:
    """Copy the newest state set (by name, as Tune picks) in the driver's staging folder to `root` on `fs`, each file
    as <name>~whole, written to a temporary name then moved into place (a rename on a local disk; an object store's
    upload is whole anyway).
    The experiment state goes last: a copy killed half-way leaves the set before it, or a newer searcher beside it,
    which grow.reconcile_* makes agree. Returns the names written."""
    names = [name for name in os.listdir(staging) if STATE_FILE.fullmatch(name) and WHOLE not in name]
    states = [name for name in names if name.startswith("experiment_state-")]
    if not states:
        return []
    stamp = STATE_FILE.fullmatch(max(states)).group(1)  # this driver's: its start is the newest (a resume downloads older)
    written = []
    for name in sorted((n for n in names if STATE_FILE.fullmatch(n).group(1) == stamp), key=lambda n: n in states):
        stem, _, suffix = name.rpartition(".")
        target = f"{root}/{stem}{WHOLE}.{suffix}"
        # as Tune's own sync copies (pyarrow, one thread): 10 ms on 14 MB, 26 ms as a read and a write in Python
        pafs.copy_files(os.path.join(staging, name), target + PART, destination_filesystem=fs, use_threads=False)
        fs.move(target + PART, target)
        written.append(f"{stem}{WHOLE}.{suffix}")
    return written


class WholeState(tune.Callback):
    """Keeps a copy of Tune's saved state on storage that is always whole (copy_whole): at a save of Tune's once
    WHOLE_EVERY_S have passed since the last copy, and after the search's final save.

    Tune asks each callback for its state (get_state) as it saves, after it has written the trials' and the
    searcher's state to its staging folder: the moment the set there is complete. No state of its own (None)."""

    def __init__(self) -> None:
        self.storage: Any = None  # the search's StorageContext, from its first trial
        self.copied = -math.inf  # time.monotonic() of the last copy

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self.storage is None and trials:
            self.storage = trials[0].storage

    def get_state(self) -> None:
        if time.monotonic() - self.copied >= WHOLE_EVERY_S:
            self.copy()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.copy()  # Tune's final save (Ctrl-C and SIGTERM included) has just been written

    def copy(self) -> None:
        if self.storage is None:  # before the first trial there is nothing to lose
            return
        storage, self.copied = self.storage, time.monotonic()
        try:
            copy_whole(storage.experiment_driver_staging_path, storage.storage_filesystem, storage.experiment_fs_path)
        except Exception as error:  # Tune's own copy still goes on: a storage hiccup never ends a search
            print(f"warning: the search's state was not copied whole to storage ({error})", file=sys.stderr, flush=True)
