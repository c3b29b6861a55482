"""Runs in Tune's trial actors: the checkpoint a resumed trial starts from. Its newest one may be unreadable (a file
truncated by a full disk or a killed copy) or weights only (pruned once its trial ended, then restored by a state
older than that end); it then falls back to the one before, or to scratch, and says so in one line. Checkpoints
live in Tune's storage, a folder or a URI: every file operation goes through the checkpoint's own pyarrow
filesystem. No torch here: a fork-mode actor checks checkpoints and never loads it."""

from __future__ import annotations

import os
import pickletools
import posixpath
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow.fs
from ray import tune

from text_recognizer.facts import CHECKPOINT_NAME, TRAINER_STATE

FOLDER = re.compile(r"checkpoint_(\d+)$")  # Tune's name for a trial's checkpoint folders
WARNING_KEY = "checkpoint_warning"  # a result's note that the trial did not resume from its newest checkpoint
SKIPPED_KEY = "checkpoints_skipped"  # beside it: the names of the checkpoint folders it passed over


def index(checkpoint: tune.Checkpoint) -> int:
    match = FOLDER.search(checkpoint.path.rstrip("/"))
    return int(match.group(1)) if match else -1


def siblings(checkpoint: tune.Checkpoint) -> list[tune.Checkpoint]:
    """Every checkpoint folder of the trial that `checkpoint` belongs to, newest (highest index) first."""
    return checkpoint_folders(checkpoint.filesystem, posixpath.dirname(checkpoint.path.rstrip("/")))


def checkpoint_folders(fs: pyarrow.fs.FileSystem, folder: str) -> list[tune.Checkpoint]:
    """The checkpoint folders in a trial's folder as they are on storage, newest (highest index) first."""
    found = [
        tune.Checkpoint(info.path, filesystem=fs)
        for info in fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
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


def model_only(path: str) -> bool:
    """Whether the (readable) model file at `path` holds the model alone, as CheckpointKeeper leaves an ended trial's
    best: Lightning refuses to resume training from one ("checkpoint contains only the model"), so a trial Tune
    restores from it would end in error. Read without torch: the names in the archive's pickle (pickletools parses,
    never runs it) lack the trainer's optimizer state."""
    with zipfile.ZipFile(path) as archive:
        pickled = next((name for name in archive.namelist() if name.endswith("/data.pkl")), None)
        if pickled is None:
            return False
        names = {arg for _, arg, _ in pickletools.genops(archive.read(pickled)) if isinstance(arg, str)}
    return TRAINER_STATE[0] not in names


@contextmanager
def resumable(newest: tune.Checkpoint | None) -> Iterator[tuple[str | None, str | None, list[str]]]:
    """The model file a trial resumes from (None: from scratch), a one-line warning when that is not `newest`, and
    the folders passed over (their names): the newest readable checkpoint of the trial, no newer than the one Tune
    restores (`tune.get_checkpoint()`). The driver forgets the ones passed over (CheckpointKeeper): Tune tracks
    them with their epochs' metrics, and one could be kept as the trial's best."""
    if newest is None:
        yield None, None, []
        return
    skipped, problems = [], []
    for candidate in [c for c in siblings(newest) if index(c) <= index(newest)] or [newest]:
        name = posixpath.basename(candidate.path.rstrip("/"))
        with candidate.as_directory() as directory:
            path = os.path.join(directory, CHECKPOINT_NAME)  # a local folder
            problem = unreadable(path) or ("weights only" if model_only(path) else None)
            if problem is None:
                yield path, fallback_warning(problems, name), skipped
                return
        skipped.append(name)
        problems.append(f"{name}/{CHECKPOINT_NAME} ({problem})")
    yield None, fallback_warning(problems, None), skipped


def fallback_warning(skipped: list[str], used: str | None) -> str | None:
    if not skipped:
        return None
    start = f"resumed from {used}" if used else "restarted from scratch"
    return f"unreadable checkpoint {', '.join(skipped)}: {start}"
