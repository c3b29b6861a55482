"""A trial's checkpoints on Tune's storage (a real folder through pyarrow): which one a resumed trial starts from
when its newest is unreadable, and what an ended trial keeps. The searches that use them: test_reliability.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ray import tune

from text_recognizer.facts import CHECKPOINT_NAME
from text_recognizer.search.checkpoints import keep_only, resumable


def write_trial(folder: Path, epochs: int) -> list[Path]:
    """A trial folder as Tune leaves it: checkpoint_000000 ... with a Lightning-style model file each."""
    files = []
    for epoch in range(epochs):
        path = folder / f"checkpoint_{epoch:06d}" / CHECKPOINT_NAME
        path.parent.mkdir(parents=True)
        state = {"epoch": epoch, "state_dict": {"model.w": torch.full((200, 50), float(epoch))}, "run_args": {"fc1": 8}}
        state |= {"optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(200, 50)}}}], "lr_schedulers": [], "callbacks": {}}
        torch.save(state, path)
        files.append(path)
    return files


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def resumed(newest: Path) -> tuple[str | None, str | None]:
    with resumable(tune.Checkpoint(str(newest.parent))) as (path, warning):
        assert path is None or torch.load(path, weights_only=True)["state_dict"]  # readable while inside
        return path, warning


def test_a_readable_newest_checkpoint_is_used_without_a_warning(tmp_path: Path) -> None:
    files = write_trial(tmp_path / "trial", 3)
    assert resumed(files[2]) == (str(files[2]), None)
    # a folder newer than the one Tune restores (persisted, its result never delivered) is not a candidate
    assert resumed(files[1]) == (str(files[1]), None)


def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_then_to_scratch(tmp_path: Path) -> None:
    files = write_trial(tmp_path / "trial", 3)
    truncate(files[2])
    path, warning = resumed(files[2])
    assert path == str(files[1])
    assert warning.startswith("unreadable checkpoint checkpoint_000002/model.ckpt (BadZipFile")
    assert warning.endswith(": resumed from checkpoint_000001") and "\n" not in warning

    flipped = bytearray(files[1].read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # same length, one byte wrong: its CRC gives it away
    files[1].write_bytes(bytes(flipped))
    path, warning = resumed(files[2])
    assert path == str(files[0]) and "checkpoint_000001/model.ckpt" in warning and "CRC" in warning

    files[0].unlink()
    path, warning = resumed(files[2])
    assert path is None and warning.endswith("restarted from scratch") and "checkpoint_000000/model.ckpt (missing)" in warning


def test_no_checkpoint_means_a_fresh_trial() -> None:
    with resumable(None) as (path, warning):
        assert (path, warning) == (None, None)


def test_keep_only_leaves_the_best_checkpoint_weights_only(tmp_path: Path) -> None:
    files = write_trial(tmp_path / "trial", 3)
    before = files[1].stat().st_size
    deleted = keep_only(tune.Checkpoint(str(files[1].parent)))
    assert sorted(Path(path).name for path in deleted) == ["checkpoint_000000", "checkpoint_000002"]
    assert [p.name for p in (tmp_path / "trial").iterdir()] == ["checkpoint_000001"]
    assert [p.name for p in files[1].parent.iterdir()] == [CHECKPOINT_NAME]  # no partial file left behind
    state = torch.load(files[1], weights_only=True)
    assert set(state) == {"epoch", "state_dict", "run_args"} and state["epoch"] == 1
    assert torch.equal(state["state_dict"]["model.w"], torch.full((200, 50), 1.0))
    assert files[1].stat().st_size < before / 1.8  # the optimizer state was as big as the weights
    keep_only(tune.Checkpoint(str(files[1].parent)))  # again: nothing changes
    assert torch.load(files[1], weights_only=True).keys() == state.keys()


def test_a_checkpoint_that_is_not_a_torch_file_is_reported_not_rewritten(tmp_path: Path) -> None:
    files = write_trial(tmp_path / "trial", 1)
    truncate(files[0])
    with pytest.raises(Exception):  # noqa: B017 - torch's own error; CheckpointKeeper turns it into a warning
        keep_only(tune.Checkpoint(str(files[0].parent)))
    assert files[0].is_file()
