"""A trial's checkpoints on Tune's storage (a real folder through pyarrow): which one a resumed trial starts from
when its newest is unreadable, and what an ended trial keeps. The searches that use them: test_reliability.py."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import FIVE_EPOCHS, finish, results, wait_for
from ray import tune
from ray.tune import ExperimentAnalysis

from text_recognizer.facts import CHECKPOINT_NAME, ENDED_NAME, FILLED_KEY, HISTORY_NAME, PART
from text_recognizer.search.outputs.checkpoints import keep_only, repair_tracked, weights_only
from text_recognizer.search.trial.resume import model_only, resumable


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
    with resumable(tune.Checkpoint(str(newest.parent))) as (path, warning, skipped):
        assert path is None or torch.load(path, weights_only=True)["state_dict"]  # readable while inside
        assert [name in (warning or "") for name in skipped] == [True] * len(skipped)  # the ones the warning names
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
    with resumable(None) as (path, warning, skipped):
        assert (path, warning, skipped) == (None, None, [])


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


# --- a resumed search whose saved state names checkpoints that are gone from storage -------------------------------

VAL_ACC = (0.5, 0.9, 0.6, 0.7)  # checkpoint_000000 ... _000003: the best is the second


def tracked_trial(tmp_path: Path, registered: int) -> tune.experiment.Trial:
    """A real Tune trial whose checkpoint manager (Ray's own, the search's settings: the best 2 by val_acc and the
    newest) registered its first `registered` checkpoints, as its driver did; the folders on disk, each with a model
    file and its history, as the trial's actor wrote them."""
    from ray.train._internal.session import _TrainingResult
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    storage = StorageContext(str(tmp_path), "search", trial_dir_name="trial_t")
    config = tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_acc", checkpoint_score_order="max")
    trial = Trial("train_in_actor", config={"fc1": 16}, trial_id="t", storage=storage, stub=True, checkpoint_config=config)
    history = []
    for epoch, val_acc in enumerate(VAL_ACC, start=1):
        folder = Path(storage.trial_fs_path) / f"checkpoint_{epoch - 1:06d}"
        folder.mkdir(parents=True)
        (folder / CHECKPOINT_NAME).write_bytes(b"model")
        history.append({"epoch": epoch, "val_acc": val_acc})
        (folder / HISTORY_NAME).write_text(json.dumps(history))
        if epoch <= registered:
            trial.on_checkpoint(_TrainingResult(tune.Checkpoint(str(folder)), {"training_iteration": epoch, "val_acc": val_acc}))
    return trial


def tracked_names(trial: tune.experiment.Trial) -> tuple[list[str], str | None]:
    manager = trial.run_metadata.checkpoint_manager
    latest = manager.latest_checkpoint_result
    return [Path(r.checkpoint.path).name for r in manager.best_checkpoint_results], latest and Path(latest.checkpoint.path).name


def test_tune_tracks_checkpoints_as_the_repair_expects(tmp_path: Path) -> None:
    """Ray's manager, as retrack relies on: the best 2 and the newest kept, the others deleted from storage."""
    trial = tracked_trial(tmp_path, registered=3)
    assert tracked_names(trial) == (["checkpoint_000002", "checkpoint_000001"], "checkpoint_000002")
    assert not (Path(trial.storage.trial_fs_path) / "checkpoint_000000").exists()  # Tune deleted the worst
    assert trial.storage.current_checkpoint_index == 2


def test_a_trial_whose_saved_latest_checkpoint_is_gone_resumes_from_the_newest_on_storage(tmp_path: Path) -> None:
    """The S3 SIGKILL case: the state names checkpoint_000002; the killed driver had registered _000003 since and
    deleted _000002 (no longer among the best 2). The trial resumes from _000003, which the state never knew."""
    trial = tracked_trial(tmp_path, registered=3)
    shutil.rmtree(Path(trial.storage.trial_fs_path) / "checkpoint_000002")
    state, _ = trial.get_json_state()
    warning = repair_tracked(trial)
    assert warning == "checkpoint_000002, which Tune's state names, is gone from storage: resumed from checkpoint_000003"
    assert tracked_names(trial) == (["checkpoint_000003", "checkpoint_000001"], "checkpoint_000003")
    latest = trial.run_metadata.checkpoint_manager.latest_checkpoint_result
    assert latest.metrics["training_iteration"] == 4 and latest.metrics["val_acc"] == 0.7  # from its saved history
    assert trial.storage.current_checkpoint_index == 3  # the next checkpoint is _000004, not over _000003
    # the experiment state saved from now on holds the repair (a second kill resumes from it)
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    saved = _TrainingRunMetadata.from_json_state(trial.run_metadata.get_json_state()).checkpoint_manager
    assert Path(saved.latest_checkpoint_result.checkpoint.path).name == "checkpoint_000003"
    assert trial.get_json_state()[0] != state  # the trial's own state (its checkpoint index) saved anew, not cached
    assert repair_tracked(trial) is None  # repaired: nothing gone any more


def test_a_trial_with_none_of_its_checkpoints_left_restarts_from_scratch(tmp_path: Path) -> None:
    trial = tracked_trial(tmp_path, registered=3)
    for folder in Path(trial.storage.trial_fs_path).glob("checkpoint_*"):
        shutil.rmtree(folder)
    assert repair_tracked(trial) == "checkpoint_000002, which Tune's state names, is gone from storage: restarted from scratch"
    assert tracked_names(trial) == ([], None) and trial.checkpoint is None  # Tune restores nothing: a fresh start


@pytest.mark.parametrize("ended", [False, True])
def test_the_keeper_warns_only_for_a_trial_tune_restores(tmp_path: Path, capsys, ended: bool) -> None:
    """A grown search's first step: an ended trial whose checkpoints the finished part deleted on purpose (not one
    of its best) is repaired without a word; one that will be restored says where it restarts (seen: two
    "restarted from scratch" lines for trials ASHA had stopped, in a search grown by --time-budget)."""
    from text_recognizer.search.outputs.checkpoints import CheckpointKeeper

    trial = tracked_trial(tmp_path, registered=3)
    trial.set_status(trial.TERMINATED if ended else trial.PENDING)
    for folder in Path(trial.storage.trial_fs_path).glob("checkpoint_*"):
        shutil.rmtree(folder)
    CheckpointKeeper().on_step_begin(0, [trial])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: trial t:")]
    assert tracked_names(trial) == ([], None)  # repaired either way
    restarted = "checkpoint_000002, which Tune's state names, is gone from storage: restarted from scratch"
    assert lines == ([] if ended else [f"warning: trial t: {restarted}"])


def test_a_folder_without_its_history_or_model_is_not_resumed_from(tmp_path: Path) -> None:
    """A folder the killed actor left half-written (no history, or no model file) is passed over for an older one."""
    trial = tracked_trial(tmp_path, registered=3)
    trial_dir = Path(trial.storage.trial_fs_path)
    shutil.rmtree(trial_dir / "checkpoint_000002")
    (trial_dir / "checkpoint_000003" / HISTORY_NAME).unlink()
    assert repair_tracked(trial).endswith(": resumed from checkpoint_000001")
    assert tracked_names(trial) == (["checkpoint_000001"], "checkpoint_000001")
    assert trial.storage.current_checkpoint_index == 2  # unchanged: newer than the one it resumes from


def test_a_consistent_state_is_left_as_it_is_and_a_gone_older_one_is_dropped_silently(tmp_path: Path) -> None:
    trial = tracked_trial(tmp_path, registered=4)
    assert tracked_names(trial) == (["checkpoint_000003", "checkpoint_000001"], "checkpoint_000003")
    assert repair_tracked(trial) is None and tracked_names(trial)[1] == "checkpoint_000003"
    shutil.rmtree(Path(trial.storage.trial_fs_path) / "checkpoint_000001")  # the best, not the latest
    assert repair_tracked(trial) is None
    assert tracked_names(trial) == (["checkpoint_000003"], "checkpoint_000003")  # Tune won't try to delete it again


@pytest.mark.parametrize("registered", [0, 2])
def test_an_unended_trial_resumes_from_checkpoints_its_saved_state_never_knew(tmp_path: Path, registered: int) -> None:
    """The actor writes each epoch's checkpoint to storage at once; Tune saves the state that records it up to 10 s
    later. A driver killed in between (seen in CI: a trial restarted from scratch, its rows on storage replaced):
    the state knows none of the trial's 4 checkpoints, or its first 2. It resumes from the newest, silently, and
    its next checkpoint goes to _000004."""
    trial = tracked_trial(tmp_path, registered)
    assert repair_tracked(trial) is None
    assert tracked_names(trial)[1] == "checkpoint_000003" and trial.checkpoint.path.endswith("checkpoint_000003")
    latest = trial.run_metadata.checkpoint_manager.latest_checkpoint_result
    assert latest.metrics["training_iteration"] == 4 and latest.metrics["val_acc"] == 0.7  # from its saved history
    assert trial.storage.current_checkpoint_index == 3
    assert repair_tracked(trial) is None and tracked_names(trial)[1] == "checkpoint_000003"  # once is enough


def test_a_checkpoint_the_actor_passed_over_is_no_longer_tracked(tmp_path: Path) -> None:
    """Its actor found _000003 unreadable and resumed from _000001 (CheckpointKeeper.on_trial_result): Tune must not
    keep it as the trial's best (seen: a truncated model file kept, and the winner's test failed on it)."""
    from text_recognizer.search.outputs.checkpoints import forget

    trial = tracked_trial(tmp_path, registered=4)
    forget(trial, ["checkpoint_000003"])
    assert tracked_names(trial) == (["checkpoint_000001"], "checkpoint_000001")


def test_an_ended_trial_is_not_resumed_from_newer_checkpoints(tmp_path: Path) -> None:
    trial = tracked_trial(tmp_path, registered=2)
    trial.set_status(trial.TERMINATED)
    assert repair_tracked(trial) is None and tracked_names(trial)[1] == "checkpoint_000001"


def test_the_result_log_fills_the_epochs_a_killed_driver_never_copied_to_storage(tmp_path: Path, local_ray) -> None:
    """result.json on storage has epochs 1-2 (the killed driver's last copy); the trial resumes from its epoch-4
    checkpoint, and its first report (epoch 5) carries that checkpoint's history: the file then has 1-5 once each."""
    from text_recognizer.search.outputs.checkpoints import ResultLog

    trial = tracked_trial(tmp_path, registered=0)
    rows = [{"training_iteration": epoch, "val_acc": VAL_ACC[epoch - 1], "pid": 1} for epoch in (1, 2)]
    (Path(trial.path) / "result.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
    repair_tracked(trial)
    trial.relative_logdir = "trial_t"  # as a restored trial has it
    trial.init_local_path()  # as Tune does before it starts a trial
    log = ResultLog()
    log.log_trial_start(trial)  # Tune restores the file from storage: the trial has a checkpoint now
    history = [{"epoch": epoch, "val_acc": value} for epoch, value in enumerate(VAL_ACC, start=1)]
    log.log_trial_result(5, trial, {"training_iteration": 5, "epoch": 5, "val_acc": 0.8, "restored_history": history})
    log.log_trial_result(6, trial, {"training_iteration": 6, "epoch": 6, "val_acc": 0.8, "restored_history": []})
    # resumed from its last epoch's checkpoint, whose row the file has: the epoch reported again is not written twice
    log.log_trial_result(7, trial, {"training_iteration": 6, "epoch": 6, "restored_history": history, FILLED_KEY: True})
    log.log_trial_end(trial)
    written = [json.loads(line) for line in (Path(trial.local_path) / "result.json").read_text().splitlines()]
    assert [row["training_iteration"] for row in written] == [1, 2, 3, 4, 5, 6]
    assert [row["val_acc"] for row in written[2:4]] == list(VAL_ACC[2:4]) and written[2]["trial_id"] == "t"
    assert [bool(row.get(FILLED_KEY)) for row in written] == [False, False, True, True, False, False]
    assert written[2]["config"] == trial.config and written[2]["done"] is False  # Tune's keys that readers use
    assert written[0]["pid"] == 1  # the rows on storage, as they were


@pytest.mark.slow
def test_a_resumed_search_whose_state_names_gone_checkpoints_loses_no_trial(tmp_path: Path, launch_search) -> None:
    """A real search stopped by Ctrl-C, then its storage made to disagree with Tune's saved state as a SIGKILL before
    the state reached S3 leaves it: trial A's latest checkpoint gone and a newer one there that the state never knew,
    trial B's checkpoints all gone. --resume: A goes on from the newer one, B from scratch, one warning line each;
    neither ends in `error`, and each W&B run holds epochs 1-5 once."""
    from test_reliability import check_finished_search

    config = FIVE_EPOCHS.replace("limit_train_batches: 60", "limit_train_batches: 150")  # epochs long enough to stop in
    search = launch_search(tmp_path, "stale", config, "--num-samples", "2", "--max-concurrent", "2")
    search_dir = tmp_path / "stale"
    # two epochs each: a checkpoint the saved state names, even if the stop cut off the newest one's save
    # (by the checkpoint folders, which a trial writes at once: Tune copies the rows there with its state, up to 10 s
    # later, and a trial had finished by the time its second row showed, seen here under load)
    folders = lambda: [list(trial.glob("checkpoint_*")) for trial in search_dir.glob("trial_*")]  # noqa: E731
    wait_for(lambda: len(folders()) == 2 and all(len(of_trial) >= 2 for of_trial in folders()), poll=0.05)
    search.send_signal(signal.SIGINT)
    finish(search, timeout=120, returncode=130)
    done = {trial_id: len(rows) for trial_id, rows in results(search_dir).items()}
    first_pid = {trial_id: rows[0]["pid"] for trial_id, rows in results(search_dir).items()}
    assert all(0 < epochs < 5 for epochs in done.values()), done
    a, b = sorted(done)
    # the newest checkpoint Tune's saved state names (epoch N is in folder N-1): a trial's last row can be newer, its
    # checkpoint registered by a save task the stop cut off (seen in CI), and the resume repeats that epoch in Tune's log
    named = {trial.trial_id: Path(trial.checkpoint.path) for trial in ExperimentAnalysis(str(search_dir)).trials}
    folders = sorted((search_dir / f"trial_{a}").glob("checkpoint_*"))
    latest, resumed_at = named[a], int(named[a].name[-6:]) + 1
    assert latest in folders and resumed_at <= done[a], (folders, done)
    newer = latest.with_name(f"checkpoint_{int(folders[-1].name[-6:]) + 1:06d}")
    latest.rename(newer)  # the state names `latest`, gone; `newer` holds the same epochs, unknown to the state
    for folder in (search_dir / f"trial_{b}").glob("checkpoint_*"):
        shutil.rmtree(folder)

    resumed = launch_search(tmp_path, "stale", None, "--resume")
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    warnings = sorted(line for line in stderr.splitlines() if "which Tune's state names" in line)
    assert warnings == [
        f"warning: trial {a}: {latest.name}, which Tune's state names, is gone from storage: resumed from {newer.name}",
        f"warning: trial {b}: {named[b].name}, which Tune's state names, is gone from storage: restarted from scratch",
    ], stderr[-3000:]
    assert "does not exist on storage" not in stderr
    check_finished_search(search_dir, trials=2, epochs=5)
    after = results(search_dir)
    # on from the epoch it resumed at: none trained twice but those the saved state never knew of
    assert [r["training_iteration"] for r in after[a]] == [*range(1, done[a] + 1), *range(resumed_at + 1, 6)]
    # B trained all over again in a new worker; Tune's log of it starts afresh too
    assert [r["training_iteration"] for r in after[b]] == list(range(1, 6)) and after[b][0]["pid"] != first_pid[b]


def test_pruning_leaves_the_trial_s_final_result_beside_its_best_checkpoint(tmp_path: Path) -> None:
    """Before pruning takes the checkpoints an older saved state would resume the trial from, its final result goes
    into its folder (ENDED_NAME): a resume from that state ends it again (saved_state.repair)."""
    import torch

    from text_recognizer.search.outputs.checkpoints import prune

    trial = tracked_trial(tmp_path, registered=4)  # Tune kept _000001 (val_acc 0.9) and _000003 (0.7, the newest)
    trial_dir = Path(trial.storage.trial_fs_path)
    for folder in trial_dir.glob("checkpoint_*"):
        torch.save({"state_dict": {"w": torch.ones(2)}, "optimizer_states": [{"step": 4}]}, folder / CHECKPOINT_NAME)
    final = {"training_iteration": 4, "val_acc": 0.7, "done": True, "config": {"fc1": 16}}
    trial.update_last_result(final)
    prune(trial)
    assert sorted(path.name for path in trial_dir.iterdir() if path.name.startswith("checkpoint_")) == ["checkpoint_000001"]
    assert "optimizer_states" not in torch.load(trial_dir / "checkpoint_000001" / CHECKPOINT_NAME, weights_only=True)
    ended = json.loads((trial_dir / ENDED_NAME).read_text())
    assert {key: ended[key] for key in final} == final
    assert not list(trial_dir.glob(f"*{PART}"))  # no file left half-written


def test_a_weights_only_checkpoint_is_not_resumed_from(tmp_path: Path) -> None:
    """A pruned trial's best checkpoint (weights only) restored by a state older than its end: Lightning would refuse
    it ("checkpoint contains only the model") at every retry. The trial resumes from an older full one, or from
    scratch, with one warning."""
    files = write_trial(tmp_path / "trial", 2)
    assert not model_only(str(files[1]))
    weights_only(tune.Checkpoint(str(files[1].parent)))
    assert model_only(str(files[1]))
    path, warning = resumed(files[1])
    assert path == str(files[0])
    assert warning == "unreadable checkpoint checkpoint_000001/model.ckpt (weights only): resumed from checkpoint_000000"
    keep_only(tune.Checkpoint(str(files[1].parent)))
    path, warning = resumed(files[1])
    assert path is None and warning == "unreadable checkpoint checkpoint_000001/model.ckpt (weights only): restarted from scratch"
