"""Runs in the driver, before `Tuner.restore`: Tune restores the newest saved state of the search that reads.

Tune saves a search's state as a set of files that share a timestamp: experiment_state-<ts>.json and its search
algorithm's basic-variant-state-<ts>.json, search_gen_state-<ts>.json or searcher-state-<ts>.pkl. It writes them in
the driver's staging folder and copies them to storage without a rename, so a driver killed mid-copy leaves a set
cut short there. Tune restores from the newest set by name; when that one does not read, it logs an error and starts
the search again from nothing under the same name (seen in the long chaos run: 436 trials dropped for a new search
of 1). So, before a restore, every set newer than the newest that reads is moved aside, as <file>.unreadable (kept,
never deleted), and Tune restores that one. The ids of the trials it holds (`trial_ids`) let the search algorithm,
saved in another file of the set and restored from the driver's staging folder, agree with it (grow.reconcile_*).
"""

from __future__ import annotations

import json
import re

import pyarrow.fs as pafs
from ray import cloudpickle
from ray.train._internal.storage import get_fs_and_path

from text_recognizer.util import UserError

STATE_FILE = re.compile(r"(?:experiment_state|basic-variant-state|search_gen_state|searcher-state)-(.+)\.(?:json|pkl)")
EXPERIMENT_STATE = "experiment_state-{}.json"  # Tune's TuneController.CKPT_FILE_TMPL
SET_ASIDE = ".unreadable"  # a suffix no Tune pattern matches


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


def file_names(fs: pafs.FileSystem, root: str) -> list[str]:
    """The names of the files in the search's folder (not its trial folders)."""
    return [info.base_name for info in fs.get_file_info(pafs.FileSelector(root)) if info.type == pafs.FileType.File]


def restorable(experiment: str, storage_filesystem: pafs.FileSystem | None = None) -> str | None:
    """Make the newest readable state set of the search at `experiment` (a path or URI) the one Tune restores, by
    moving the newer sets aside; returns a one-line warning when it moved any, None when the newest reads."""
    fs, root = get_fs_and_path(experiment, storage_filesystem)
    names = file_names(fs, root)
    sets: dict[str, list[str]] = {}
    for name in names:
        if match := STATE_FILE.fullmatch(name):
            sets.setdefault(match.group(1), []).append(name)
    stamps = sorted(sets, reverse=True)
    whole = (stamp for stamp in stamps if EXPERIMENT_STATE.format(stamp) in sets[stamp])
    chosen = next((stamp for stamp in whole if all(reads(fs, f"{root}/{name}") for name in sets[stamp])), None)
    if chosen is None:
        if not stamps:
            return None  # nothing saved: Tune says so itself
        raise UserError(f"no saved state of the search at {experiment} reads (experiment_state-*.json); nothing was changed")
    newer = [name for stamp in stamps if stamp > chosen for name in sorted(sets[stamp])]
    for name in newer:
        fs.move(f"{root}/{name}", f"{root}/{name}{SET_ASIDE}")
    if not newer:
        return None
    return (
        f"warning: the search's newest saved state ({', '.join(newer)}) does not read, cut short by a killed driver;"
        f" resuming from the one before ({chosen}); the unread files are kept as *{SET_ASIDE}"
    )


def trial_ids(experiment: str, storage_filesystem: pafs.FileSystem | None = None) -> set[str]:
    """The ids of the trials in the saved state Tune restores (its newest experiment_state, by name, as Tune picks)."""
    fs, root = get_fs_and_path(experiment, storage_filesystem)
    names = file_names(fs, root)
    newest = max((name for name in names if name.startswith("experiment_state-") and name.endswith(".json")), default=None)
    if newest is None:
        return set()
    with fs.open_input_stream(f"{root}/{newest}") as stream:
        state = json.loads(stream.readall())
    return {json.loads(trial_state)["trial_id"] for trial_state, _ in state["trial_data"]}
