"""A resumed search restores the newest of Tune's saved states that reads: a set cut short by a killed driver's
copy is moved aside, kept. Real Tune searches on a local Ray, their state files cut as a killed copy leaves them."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from conftest import FIVE_EPOCHS, complete_lines, finish, summary_of
from ray import tune

from text_recognizer.facts import ENDED_NAME
from text_recognizer.search import saved_state
from text_recognizer.util import UserError


def trainable() -> object:
    """Made here, so that Ray pickles it by value: a worker can't import this test module."""

    def two_epochs(config: dict) -> None:
        for epoch in (1, 2):
            tune.report({"epoch": epoch, "score": config["x"] * epoch})

    return two_epochs


def search(tmp_path: Path, samples: int, callbacks: list | None = None) -> Path:
    """A search of `samples` trials; run again with more, it is restored and grown: two saved state sets."""
    folder = tmp_path / "s"
    if tune.Tuner.can_restore(str(folder)):
        time.sleep(1.1)  # a set's name is its driver's start, to the second
        tuner = tune.Tuner.restore(str(folder), trainable(), resume_unfinished=True)
        tuner._local_tuner._tune_config.num_samples = samples  # noqa: SLF001 (as grow.py raises it)
    else:
        run = tune.RunConfig(name="s", storage_path=str(tmp_path), verbose=0, callbacks=callbacks)
        tuner = tune.Tuner(
            trainable(), param_space={"x": tune.uniform(0, 1)}, tune_config=tune.TuneConfig(num_samples=samples), run_config=run
        )
    tuner.fit()
    return folder


def states(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob("experiment_state-*"))


def test_a_cut_newest_state_is_moved_aside_and_the_one_before_restores(local_ray: None, tmp_path: Path) -> None:
    folder = search(tmp_path, 2)
    older = states(folder)
    assert len(older) == 1 and saved_state.restorable(str(folder)) is None  # the newest reads: nothing moved
    search(tmp_path, 3)
    newest = (set(states(folder)) - set(older)).pop()
    text = (folder / newest).read_text()
    (folder / newest).write_text(text[: len(text) // 2])  # a copy killed half-way
    warning = saved_state.restorable(str(folder))
    assert warning.startswith("warning: the search's newest saved state (") and newest in warning
    assert states(folder) == [*older, f"{newest}.unreadable"]
    assert (folder / f"{newest}.unreadable").read_text() == text[: len(text) // 2]  # kept as it was
    stamp = newest.removeprefix("experiment_state-").removesuffix(".json")
    assert not list(folder.glob(f"*-{stamp}.json")) and not list(folder.glob(f"*-{stamp}.pkl"))  # its searcher too
    restored = tune.Tuner.restore(str(folder), trainable()).get_results()
    assert len(restored) == 2 and all(result.metrics["epoch"] == 2 for result in restored)  # the older set's trials


def test_no_state_that_reads_is_a_clear_error_and_changes_nothing(local_ray: None, tmp_path: Path) -> None:
    folder = search(tmp_path, 1)
    (only,) = states(folder)
    (folder / only).write_text("")
    with pytest.raises(UserError, match="no saved state of the search at .* reads"):
        saved_state.restorable(str(folder))
    assert states(folder) == [only]


def trial_ids_in(path: Path) -> set[str]:
    return {json.loads(trial)["trial_id"] for trial, _ in json.loads(path.read_text())["trial_data"]}


def test_whole_state_keeps_a_copy_that_reads_beside_tune_s_own(local_ray: None, tmp_path: Path) -> None:
    folder = search(tmp_path, 3, callbacks=[saved_state.WholeState()])
    own = states(folder)[0]
    whole = own.replace(".json", f"{saved_state.WHOLE}.json")
    assert states(folder) == [own, whole]  # newer by name: the one Tune restores
    searchers = sorted(path.name for path in folder.glob("basic-variant-state-*"))
    assert searchers == [
        own.replace("experiment_state", "basic-variant-state"),
        whole.replace("experiment_state", "basic-variant-state"),
    ]
    assert trial_ids_in(folder / whole) == trial_ids_in(folder / own) and len(trial_ids_in(folder / whole)) == 3
    assert not list(folder.glob(f"*{saved_state.PART}"))
    assert saved_state.repair(str(folder), 2, set()).trial_ids == trial_ids_in(folder / whole)


def test_a_first_driver_s_state_cut_short_restores_from_the_whole_copy(local_ray: None, tmp_path: Path) -> None:
    """A first driver killed as Tune copied its state (seen in CI) leaves its only set of its own cut short; without
    the whole copy nothing reads (test_no_state_that_reads...), with it the search restores with all its trials."""
    folder = search(tmp_path, 3, callbacks=[saved_state.WholeState()])
    own, whole = states(folder)
    text = (folder / own).read_text()
    (folder / own).write_text(text[: len(text) // 2])
    warning = saved_state.restorable(str(folder))
    assert warning.endswith(
        f"resuming from the one before ({whole.removeprefix('experiment_state-')[:-5]}); "
        f"the unread files are kept as *{saved_state.SET_ASIDE}"
    ), warning
    assert states(folder) == [f"{own}{saved_state.SET_ASIDE}", whole]
    restored = tune.Tuner.restore(str(folder), trainable()).get_results()
    assert len(restored) == 3 and all(result.metrics["epoch"] == 2 for result in restored)


def test_tune_s_own_copy_restores_when_it_reads_and_the_whole_one_is_kept_aside(local_ray: None, tmp_path: Path) -> None:
    """Tune's own copy holds its newest save; the whole one, copied every WHOLE_EVERY_S, can be older."""
    folder = search(tmp_path, 3, callbacks=[saved_state.WholeState()])
    own, whole = states(folder)
    assert saved_state.restorable(str(folder)) is None
    assert states(folder) == [own] and (folder / saved_state.SUPERSEDED / whole).is_file()
    assert saved_state.repair(str(folder), 2, set()).trial_ids == trial_ids_in(folder / own)
    assert len(tune.Tuner.restore(str(folder), trainable()).get_results()) == 3


def test_the_sets_older_than_the_one_restored_are_kept_out_of_tune_s_folder(local_ray: None, tmp_path: Path) -> None:
    """Tune downloads every set at a restore and uploads them all at each save: three drivers, and only the newest
    set stays in the search folder; the others are kept in superseded-state/, and the restore has every trial."""
    for _ in range(3):
        folder = search(tmp_path, 3)
    first, second, third = states(folder)
    assert saved_state.restorable(str(folder)) is None
    assert states(folder) == [third]
    kept = sorted(path.name for path in (folder / saved_state.SUPERSEDED).iterdir())
    stamps = [name.removeprefix("experiment_state-").removesuffix(".json") for name in (first, second)]
    assert kept == sorted([first, second, *(f"basic-variant-state-{stamp}.json" for stamp in stamps)])
    assert len(tune.Tuner.restore(str(folder), trainable()).get_results()) == 3


def saved_trials(folder: Path) -> dict[str, tuple[str, dict]]:
    """Each trial's status and last result in the state Tune restores."""
    state = json.loads((folder / states(folder)[-1]).read_text())
    return {
        json.loads(trial)["trial_id"]: (json.loads(trial)["status"], json.loads(metadata)["last_result"])
        for trial, metadata in state["trial_data"]
    }


def test_trials_ended_without_their_end_run_on_and_no_others(local_ray: None, tmp_path: Path) -> None:
    """The long chaos run left trial 00170 TERMINATED in Tune's state with a last result at epoch 1 of 3 and no
    `done`, and no --resume would run it again. Two real trials' saved state made so (their last results at epoch
    2, `done` dropped), taken as trials of up to 3 epochs: they go back to PENDING, one warning names them, and the
    restore trains them; ended ones (max_t 2) and those a time budget stopped stay as they are."""
    folder = search(tmp_path, 2)
    path = folder / states(folder)[-1]
    state = json.loads(path.read_text())
    for entry in state["trial_data"]:
        metadata = json.loads(entry[1])
        assert json.loads(entry[0])["status"] == "TERMINATED" and metadata["last_result"]["training_iteration"] == 2
        metadata["last_result"]["done"] = False
        entry[1] = json.dumps(metadata)
    path.write_text(json.dumps(state))
    a, b = sorted(saved_trials(folder))
    before = path.read_text()
    assert saved_state.repair(str(folder), max_t=2, stopped=set()).warnings == []  # 2 of 2 epochs: ended
    assert saved_state.repair(str(folder), max_t=3, stopped={a, b}).warnings == []  # a time budget stopped them
    assert path.read_text() == before
    repaired = saved_state.repair(str(folder), max_t=3, stopped={a})
    assert repaired.warnings == [f"warning: Tune's saved state ended trials {b} (epoch 2 of 3) without their end: they run on"]
    assert repaired.trial_ids == {a, b} and repaired.ended == {}
    assert {trial_id: status for trial_id, (status, _) in saved_trials(folder).items()} == {a: "TERMINATED", b: "PENDING"}
    tune.Tuner.restore(str(folder), trainable(), resume_unfinished=True).fit()
    rows = {p.parent.name: len(p.read_text().splitlines()) for p in folder.glob("*/result.json")}
    assert sorted(rows.values()) == [2, 4], rows  # b trained again (from scratch: it saved no checkpoint); a did not


def test_a_trial_a_pruning_ended_stays_ended_in_an_older_state(local_ray: None, tmp_path: Path) -> None:
    """The long chaos run's trial 00784: it ended and was pruned (its end in ENDED_NAME), then the resume fell back
    to a state older than its end, which had it RUNNING at its first epoch. Tune would run it again from the
    checkpoints pruning took (here: from scratch, 2 more rows). The repair ends it with its final result; the other
    trial is left alone, and the restore trains neither."""
    folder = search(tmp_path, 2)
    path = folder / states(folder)[-1]
    a, b = sorted(saved_trials(folder))
    final = saved_trials(folder)[a][1]
    state = json.loads(path.read_text())
    for entry in state["trial_data"]:
        trial, metadata = json.loads(entry[0]), json.loads(entry[1])
        if trial["trial_id"] == a:
            trial["status"], metadata["last_result"] = "RUNNING", {**final, "training_iteration": 1, "done": False}
            entry[0], entry[1] = json.dumps(trial), json.dumps(metadata)
            (folder / trial["relative_logdir"] / ENDED_NAME).write_text(json.dumps(final))
    path.write_text(json.dumps(state))
    (folder / "trial_of_no_state").mkdir()  # a folder the state does not name is not looked at
    repaired = saved_state.repair(str(folder), max_t=2, stopped=set())
    assert repaired.warnings == [f"warning: the saved state is older than the end of trials {a} (epoch 2 of 2): they stay ended"]
    assert repaired.ended == {a: final} and repaired.trial_ids == {a, b}
    assert saved_trials(folder) == {a: ("TERMINATED", final), b: saved_trials(folder)[b]}
    assert saved_state.repair(str(folder), max_t=2, stopped=set()).warnings == []  # repaired: nothing left to do
    tune.Tuner.restore(str(folder), trainable(), resume_unfinished=True, resume_errored=True).fit()
    rows = {p.parent.name: len(p.read_text().splitlines()) for p in folder.glob("*/result.json")}
    assert sorted(rows.values()) == [2, 2], rows


def finished_search(tmp_path: Path, name: str, launch_search) -> tuple[Path, str]:
    """The real search, 2 trials of 5 tiny epochs, finished; returns its folder and its first trial's id."""
    config = FIVE_EPOCHS.replace("limit_train_batches: 60", "limit_train_batches: 5, limit_val_batches: 2")
    finish(launch_search(tmp_path, name, config, "--num-samples", "2", "--max-concurrent", "2"))
    search_dir = tmp_path / name
    return search_dir, sorted(summary_of(search_dir)["trials"], key=lambda row: row["trial_id"])[0]["trial_id"]


def set_saved_trial(search_dir: Path, trial_id: str, status: str | None, last_result: dict) -> None:
    """Make a trial's entry in every saved state (Tune's own copy and WholeState's) have this status (None: as it
    is) and last result."""
    for path in search_dir.glob("experiment_state-*.json"):
        state = json.loads(path.read_text())
        for entry in state["trial_data"]:
            trial, metadata = json.loads(entry[0]), json.loads(entry[1])
            if trial["trial_id"] == trial_id:
                trial["status"], metadata["last_result"] = status or trial["status"], last_result
                entry[0], entry[1] = json.dumps(trial), json.dumps(metadata)
        path.write_text(json.dumps(state))


def resume_to_the_end(tmp_path: Path, name: str, launch_search, trial_id: str, warning: str) -> None:
    """--resume the search: it exits 0 with the warning line, and both trials are completed, trial_id's 5 epochs."""
    resumed = launch_search(tmp_path, name, None, "--resume")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    assert warning in stderr
    rows = {row["trial_id"]: row for row in summary_of(tmp_path / name)["trials"]}
    assert (rows[trial_id]["status"], rows[trial_id]["epochs"]) == ("completed", 5), rows[trial_id]
    assert summary_of(tmp_path / name)["statuses"] == {"completed": 2}


@pytest.mark.slow
def test_a_resume_trains_on_a_trial_its_state_ended_early(tmp_path: Path, launch_search) -> None:
    """The real search, its saved state then made as the long chaos run left trial 00170 (TERMINATED, its last
    result at epoch 1 of 5 with no `done`, its checkpoints gone): without the repair every --resume would exit 130
    with the trial interrupted. --resume says so in one line, trains it to its end, and exits 0."""
    search_dir, a = finished_search(tmp_path, "early", launch_search)
    first = complete_lines(search_dir / f"trial_{a}" / "result.json")[0]
    set_saved_trial(search_dir, a, None, {**first, "done": False})
    for folder in (search_dir / f"trial_{a}").glob("checkpoint_*"):
        shutil.rmtree(folder)

    warning = f"warning: Tune's saved state ended trials {a} (epoch 1 of 5) without their end: they run on"
    resume_to_the_end(tmp_path, "early", launch_search, a, warning)


@pytest.mark.slow
def test_a_resume_from_a_state_older_than_a_pruned_trial_s_end_loses_nothing(tmp_path: Path, launch_search) -> None:
    """The long chaos run's trial 00784 through the real driver: a finished search, its trials pruned to their best
    checkpoint (weights only), its saved state then made as the older copy a resume fell back to had it: trial a
    RUNNING at epoch 2 of 5. Without the repair Tune resumes a from the weights-only checkpoint, Lightning refuses
    ("contains only the model") at every retry and a ends in error. With it --resume says so in one line, keeps a
    completed with its 5 epochs, and exits 0."""
    search_dir, a = finished_search(tmp_path, "older", launch_search)
    assert (search_dir / f"trial_{a}" / ENDED_NAME).is_file()
    second = complete_lines(search_dir / f"trial_{a}" / "result.json")[1]
    set_saved_trial(search_dir, a, "RUNNING", {**second, "done": False})

    warning = f"warning: the saved state is older than the end of trials {a} (epoch 5 of 5): they stay ended"
    resume_to_the_end(tmp_path, "older", launch_search, a, warning)
    assert not (search_dir / f"trial_{a}" / "error.txt").exists()


def test_a_storage_blip_at_the_start_is_waited_out_and_a_lasting_one_is_one_line(tmp_path: Path) -> None:
    """The chaos benchmark's read-only storage, as a driver wrote search.json: a traceback and exit 1. The driver's
    writes at its start (util.patiently) wait out a failing write, here a file where the search's folder goes,
    which a second later becomes the folder; one that lasts is a UserError of one line."""
    import threading

    from text_recognizer.facts import write_whole
    from text_recognizer.util import patiently

    folder = tmp_path / "search"
    folder.write_text("")  # every write under it fails: NotADirectoryError, an OSError

    def repair() -> None:
        folder.unlink()
        folder.mkdir()

    threading.Timer(1.0, repair).start()
    began = time.monotonic()
    patiently(lambda: write_whole(folder / "search.json", "{}"), "the search folder", seconds=10)
    assert (folder / "search.json").read_text() == "{}" and 0.9 < time.monotonic() - began < 5

    (tmp_path / "file").write_text("")
    with pytest.raises(UserError) as raised:
        patiently(lambda: write_whole(tmp_path / "file" / "search.json", "{}"), "the search folder", seconds=1)
    assert str(raised.value) == "the search folder: Not a directory (tried for 1 s)"
