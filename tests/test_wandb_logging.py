"""The driver's W&B runs mirror the search and never stop it: a write that fails is a warning, and the run is whole
again once the fit returns (offline, from Tune's results)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import runs_written_here
from ray.train._internal.storage import StorageContext
from ray.tune.experiment import Trial

from text_recognizer.search.config import SMOKE_CONFIG, load_config
from text_recognizer.search.spec import SearchSpec
from text_recognizer.search.tracking.wandb_logging import WandbTrialCallback


def test_a_run_that_missed_writes_warns_and_is_written_whole_after_the_fit(tmp_path: Path, capsys) -> None:
    """The search folder can't take W&B's files for a while (here `wandb` is a file, which even root can't write
    into; in the chaos benchmark the folder was read-only): the callback warns and carries on, the trial gets its run
    once the folder can be written, and rewrite_runs writes that run again with every epoch Tune recorded."""
    spec = SearchSpec("s", tmp_path / "s", load_config(SMOKE_CONFIG), "offline", "test", None, None)
    storage = StorageContext(str(tmp_path), "s", trial_dir_name="trial_t1")
    trial = Trial("train_in_actor", config={"fc1": 16}, trial_id="t1", storage=storage, stub=True)
    folder = spec.folder / "trial_t1"
    folder.mkdir(parents=True)
    callback = WandbTrialCallback(spec)

    def deliver(epoch: int) -> None:
        row = {"training_iteration": epoch, "val_acc": epoch / 10, "trial_id": "t1", "config": {"fc1": 16}}
        with (folder / "result.json").open("a") as results:  # as Tune's JsonLoggerCallback writes it, first
            results.write(json.dumps(row) + "\n")
        callback.on_trial_result(epoch, [trial], trial, dict(row))
        trial.update_last_result(row)

    (spec.folder / "wandb").write_text("")  # the storage refuses W&B's folder
    callback.on_trial_start(0, [trial], trial)
    deliver(1)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: trial t1: its W&B run")]
    assert len(warnings) == 2 and "missed its start (NotADirectoryError" in warnings[0] and "missed epoch 1" in warnings[1]
    (spec.folder / "wandb").unlink()  # the storage is back
    deliver(2)
    deliver(3)
    trial.update_last_result({"training_iteration": 3, "val_acc": 0.3, "done": True})
    callback.on_trial_complete(3, [trial], trial)
    assert callback.damaged == {"t1"}
    history = [row["epoch"] for row in next(run for run in runs_written_here(spec.folder) if run.id == "s-t1").history]
    assert history == [2, 3]  # what the run got while the search ran

    rows = [{"trial_id": "t1", "status": "completed", "config": {"fc1": 16}}]
    assert callback.rewrite_runs(rows) == ["t1"] and not callback.damaged
    runs = [run for run in runs_written_here(spec.folder) if run.id == "s-t1"]
    assert len(runs) == 1 and [row["epoch"] for row in runs[0].history] == [1, 2, 3]
    assert runs[0].summary["status"] == "completed" and runs[0].exit_code == 0
    assert len(list((spec.folder / "wandb" / "superseded").glob("offline-run-*-s-t1"))) == 1  # kept, never synced
    assert callback.rewrite_runs(rows) == []  # a whole, ended run is left as it is
