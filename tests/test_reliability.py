"""Reliability: a killed driver resumes, Ctrl-C and SIGTERM stop cleanly, an unreadable checkpoint is passed over, ended
trials keep one small checkpoint, a killed worker retries, divergence is a result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import FIVE_EPOCHS, TRIAL_PROCESSES, finish, results, summary_of, wait_for

from text_recognizer.facts import CHECKPOINT_NAME, FILLED_KEY, HISTORY_NAME
from text_recognizer.predict import load_model
from text_recognizer.search.tracking.wandb_files import offline_runs

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("mode", TRIAL_PROCESSES)]  # each test in both trial modes

CONFIG = FIVE_EPOCHS  # 4 trials of 5 epochs in the tests


def resume(launch_search, tmp: Path, name: str) -> str:
    return finish(launch_search(tmp, name, None, "--resume"))


def check_finished_search(search_dir: Path, trials: int, epochs: int) -> dict:
    """Every trial final and complete; one W&B run per trial with one history row per epoch, no gap or duplicate."""
    summary = summary_of(search_dir)
    assert summary["num_trials"] == trials and not summary["interrupted"]
    assert summary["statuses"] == {"completed": trials}
    assert summary["total_epochs"] == trials * epochs
    for trial_id, rows in results(search_dir).items():
        # Tune's own log may repeat an epoch whose result arrived but whose checkpoint did not (worker killed
        # in between); the retry repeats it from the older checkpoint. W&B below must hold each epoch once.
        iterations = [r["training_iteration"] for r in rows]
        assert sorted(set(iterations)) == list(range(1, epochs + 1)) and iterations[-1] == epochs, trial_id
    runs = [run for run in offline_runs(search_dir) if run.job_type == "trial"]
    assert sorted(run.id for run in runs) == sorted(f"{search_dir.name}-{t}" for t in results(search_dir))
    for run in runs:
        assert [row["epoch"] for row in run.history] == list(range(1, epochs + 1)), run.id
        assert [row["_step"] for row in run.history] == list(range(1, epochs + 1)), run.id
        assert run.exit_code == 0 and run.summary["status"] == "completed"
    assert [run.id for run in offline_runs(search_dir) if run.job_type == "summary"] == [f"{search_dir.name}-summary"]
    return summary


def test_driver_killed_then_resumed(tmp_path: Path, launch_search, mode: str) -> None:
    search = launch_search(tmp_path, "killed", CONFIG, "--num-samples", "4", "--max-concurrent", "2", "--trial-process", mode)
    search_dir = tmp_path / "killed"
    # kill as soon as a trial has checkpointed two epochs; epochs take well under a second here, so a trial
    # may have finished already (seen in CI: 3 and 5 epochs) - the test needs one killed half-way
    wait_for(lambda: any(len(rows) >= 2 for rows in results(search_dir).values()), poll=0.05)
    search.send_signal(signal.SIGKILL)
    search.wait()
    before = {trial_id: len(rows) for trial_id, rows in results(search_dir).items()}
    halfway = {trial_id: done for trial_id, done in before.items() if 0 < done < 5}
    assert halfway and sum(before.values()) < 4 * 5, before

    resume(launch_search, tmp_path, "killed")
    check_finished_search(search_dir, trials=4, epochs=5)
    after = results(search_dir)
    for trial_id, done in halfway.items():
        rows = after[trial_id]
        # it went on from its newest checkpoint in a new worker (also one newer than the saved state knew of: the
        # state is saved up to 10 s after a checkpoint): epochs 1..done from the first driver, none trained twice
        assert [r["training_iteration"] for r in rows] == [1, 2, 3, 4, 5], (trial_id, done)
        assert len({r["pid"] for r in rows[:done]}) == 1 and rows[-1]["pid"] != rows[0]["pid"]
    # the killed driver's runs of the trials it left half-way are kept aside, not synced twice
    assert len(list((search_dir / "wandb" / "superseded").iterdir())) >= len(halfway)


def wait_while_running(search: subprocess.Popen[str], condition: Callable[[], bool], timeout: float = 400) -> None:
    """wait_for the condition while the search runs; a search that ended or hung shows its stderr in the failure."""
    try:
        wait_for(lambda: condition() or search.poll() is not None, timeout=timeout)
    except AssertionError:
        search.kill()
        raise AssertionError(f"timed out; the search's stderr ends:\n{search.communicate()[1][-3000:]}") from None
    assert search.poll() is None, f"the search ended ({search.returncode}):\n{search.communicate()[1][-3000:]}"


def checkpoint_folders(search_dir: Path, trial_id: str) -> list[Path]:
    return sorted((search_dir / f"trial_{trial_id}").glob("checkpoint_*"))


def check_kept_checkpoints(search_dir: Path, summary: dict) -> None:
    """An ended trial keeps exactly one checkpoint, its best, weights only, which loads as predict loads it; an
    interrupted one keeps whole ones (trainer and optimizer state) that --resume starts from. A finished search
    keeps the checkpoints of its best 3 trials (--keep-checkpoints) and the winner's, and no other."""
    interrupted, kept = 0, summary.get("checkpoints_kept")
    ended = [row for row in summary["trials"] if row["status"] in ("completed", "stopped_early")]
    assert kept is None if summary["interrupted"] else len(kept) == min(3, len(ended)) and summary["best"]["trial_id"] in kept
    for row in summary["trials"]:
        folders = checkpoint_folders(search_dir, row["trial_id"])
        if row["status"] in ("completed", "stopped_early") and kept is not None and row["trial_id"] not in kept:
            assert folders == [], (row["trial_id"], folders)
        elif row["status"] in ("completed", "stopped_early"):
            assert len(folders) == 1, (row["trial_id"], folders)
            state = torch.load(folders[0] / CHECKPOINT_NAME, weights_only=True)
            assert not {"optimizer_states", "lr_schedulers", "callbacks"} & set(state), sorted(state)
            model, _ = load_model(folders[0] / CHECKPOINT_NAME)
            assert sum(p.numel() for p in model.parameters()) > 0
        elif row["status"] == "interrupted" and folders:
            for folder in folders:  # its best, its newest, and one whose result Tune never got: all untouched
                state = torch.load(folder / CHECKPOINT_NAME, weights_only=True)
                assert state["optimizer_states"] and state["loops"], folder
            interrupted += 1
    assert interrupted or not summary["interrupted"]
    best = summary["best"]
    if best:  # the summary points at what is kept: the winner's one checkpoint
        assert Path(best["checkpoint"]).parent in checkpoint_folders(search_dir, best["trial_id"])


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])  # Ctrl-C, and what Kubernetes and Slurm stop a job with
def test_stop_signal_saves_state_finishes_runs_and_prints_resume(tmp_path: Path, launch_search, mode: str, stop: str) -> None:
    search = launch_search(
        tmp_path, "interrupted", CONFIG, "--num-samples", "4", "--max-concurrent", "2", "--trial-process", mode
    )
    search_dir = tmp_path / "interrupted"
    wait_while_running(search, lambda: sum(len(rows) >= 2 for rows in results(search_dir).values()) >= 2)
    search.send_signal(getattr(signal, stop))
    stdout = finish(search, timeout=120, returncode=128 + getattr(signal, stop))  # 130, 143: as a shell reports them
    command = f"python search/tune_mlp.py --resume --name interrupted --storage-path {tmp_path}"
    assert command in stdout
    summary = summary_of(search_dir)
    assert summary["interrupted"] and summary["resume_command"] == command
    assert summary["preempted"] == (stop == "SIGTERM")
    check_kept_checkpoints(search_dir, summary)
    # every open run was finished as interrupted; a trial that had finished before Ctrl-C keeps its own end
    runs = offline_runs(search_dir)
    statuses = [(run.summary["status"], run.summary["epochs_trained"]) for run in runs]
    assert all(run.exit_code == 0 for run in runs) and any(status == "interrupted" for status, _ in statuses), statuses
    # a trial may even have delivered its 5th epoch and not yet ended when Ctrl-C came: still interrupted
    assert all(status == "interrupted" and epochs <= 5 or status == "completed" and epochs == 5 for status, epochs in statuses)
    trials = {row["trial_id"]: row["status"] for row in summary["trials"]}
    assert sorted(trials.values()).count("interrupted") == sum(status == "interrupted" for status, _ in statuses)

    resume(launch_search, tmp_path, "interrupted")
    summary = check_finished_search(search_dir, trials=4, epochs=5)
    check_kept_checkpoints(search_dir, summary)
    assert summary["best"]["test_acc"] > 0.5  # the winner's weights-only checkpoint, tested through --load_checkpoint


def test_unreadable_newest_checkpoint_falls_back_with_one_warning(tmp_path: Path, launch_search, mode: str) -> None:
    search = launch_search(tmp_path, "unreadable", CONFIG, "--num-samples", "4", "--max-concurrent", "2", "--trial-process", mode)
    search_dir = tmp_path / "unreadable"
    wait_while_running(search, lambda: sum(len(rows) >= 2 for rows in results(search_dir).values()) >= 2)
    search.send_signal(signal.SIGINT)
    finish(search, timeout=120, returncode=130)
    summary = summary_of(search_dir)
    trial_id = next(
        r["trial_id"] for r in summary["trials"] if r["status"] == "interrupted" and checkpoint_folders(search_dir, r["trial_id"])
    )
    before = results(search_dir)[trial_id]
    # the checkpoint Tune restores it from: its newest whole one on storage (checkpoints.repair_tracked), also one
    # newer than Tune's state or result.json knew of (seen in CI: the state held the one before)
    folders = checkpoint_folders(search_dir, trial_id)
    whole = [f for f in folders if all((f / name).is_file() for name in (CHECKPOINT_NAME, HISTORY_NAME))]
    newest, older = whole[-1], whole[:-1]
    fell_back_to = json.loads((older[-1] / HISTORY_NAME).read_text())[-1]["epoch"] if older else 0  # its epoch
    model = newest / CHECKPOINT_NAME
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # a copy cut short (a full disk, a kill)

    resumed = launch_search(tmp_path, "unreadable", None, "--resume")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    warnings = [line for line in stderr.splitlines() if "checkpoint" in line.lower() and "warning" in line.lower()]
    start = f"resumed from {older[-1].name}" if older else "restarted from scratch"
    problem = f"{newest.name}/{CHECKPOINT_NAME} (BadZipFile: File is not a zip file)"
    assert warnings == [f"warning: trial {trial_id}: unreadable checkpoint {problem}: {start}"]
    summary = check_finished_search(search_dir, trials=4, epochs=5)  # W&B: epochs 1-5 once each, completed
    check_kept_checkpoints(search_dir, summary)
    # it went on from the epoch after the checkpoint it fell back to (from 1 without one), as Tune counts epochs too
    first_after = next(r for r in results(search_dir)[trial_id][len(before) :] if not r.get(FILLED_KEY))
    assert first_after["training_iteration"] == first_after["epoch"] == fell_back_to + 1


def test_killed_worker_is_retried_from_its_checkpoint(tmp_path: Path, launch_search, mode: str) -> None:
    search = launch_search(tmp_path, "worker", CONFIG, "--num-samples", "2", "--max-concurrent", "1", "--trial-process", mode)
    search_dir = tmp_path / "worker"
    wait_for(lambda: any(len(rows) >= 2 for rows in results(search_dir).values()))
    trial_id, rows = next((t, r) for t, r in results(search_dir).items() if len(r) >= 2)
    os.kill(rows[0]["trial_pid"], signal.SIGKILL)  # the process that trains (the OOM killer's pick): actor or fork
    finish(search)
    summary = summary_of(search_dir)
    assert summary["statuses"] == {"completed": 2} and summary["total_epochs"] == 10
    row = next(r for r in summary["trials"] if r["trial_id"] == trial_id)
    assert row["failures"] == 1 and row["status"] == "completed" and row["epochs"] == 5
    after = results(search_dir)[trial_id]
    pids = [r["trial_pid"] for r in after]
    assert len(set(pids)) == 2 and pids[0] == rows[0]["trial_pid"]  # retried in a new trial process...
    first_retried = next(r for r in after if r["trial_pid"] != pids[0])
    assert first_retried["training_iteration"] > 1  # ...from its checkpoint, not from scratch
    # When the worker dies between Tune keeping an epoch's checkpoint and logging its result, Tune never
    # delivers that result (seen: [1, 2, 4, 5]); so only order and completeness at the end are asserted here.
    runs = {run.id: run for run in offline_runs(search_dir) if run.job_type == "trial"}
    assert set(runs) == {f"worker-{t}" for t in results(search_dir)}
    for run in runs.values():
        epochs = [h["epoch"] for h in run.history]
        assert epochs == sorted(set(epochs)) and epochs[-1] == 5 and run.summary["status"] == "completed"


DIVERGING = """
metric: val_acc
mode: max
scheduler: {max_t: 3, grace_period: 3, reduction_factor: 2}
fixed: {data_class: FashionMNIST, limit_train_batches: 20, optimizer: SGD}
space:
  lr: {grid: [1.0e+6, 0.05]}
"""


def test_diverging_trial_is_a_result_and_no_secret_is_written(tmp_path: Path, launch_search, mode: str) -> None:
    key = "dummy0wandb0api0key0that0must0never0be0written0anywhere"
    finish(launch_search(tmp_path, "diverge", DIVERGING, "--trial-process", mode, env={"WANDB_API_KEY": key}))
    summary = summary_of(tmp_path / "diverge")
    status = {row["config"]["lr"]: row for row in summary["trials"]}
    assert status[1e6]["status"] == "diverged" and status[1e6]["epochs"] < 3
    assert status[0.05]["status"] == "completed" and status[0.05]["epochs"] == 3
    assert summary["best"]["config"]["lr"] == 0.05  # a diverged trial is never the best
    runs = {run.config["lr"]: run for run in offline_runs(tmp_path / "diverge") if run.job_type == "trial"}
    assert runs[1e6].summary["status"] == "diverged" and runs[1e6].history[-1]["diverged"] is True
    # the API key is in the environment of every process, and in no file the search wrote
    written = [path for path in (tmp_path / "diverge").rglob("*") if path.is_file()]
    assert len(written) > 20
    assert not [path for path in written if key.encode() in path.read_bytes()]


def test_a_resumed_search_writes_again_the_runs_a_killed_driver_left_without_their_end(
    tmp_path: Path, launch_search, mode: str
) -> None:
    """A driver SIGKILLed right after a trial ended can leave that trial's offline run without its end, or with no
    file at all (W&B's service dies with it; the chaos benchmark found a completed trial with no run). Tune's state
    has the trial ended, so no callback sees it again: the resumed driver writes its run again from result.json."""
    finish(launch_search(tmp_path, "s", None, "--smoke-test", "--trial-process", mode), timeout=300)
    folder, before = tmp_path / "s", summary_of(tmp_path / "s")
    trials = [row for row in before["trials"] if row["epochs"]]
    runs = {run.id: run for run in offline_runs(folder)}
    gone, cut = (f"s-{row['trial_id']}" for row in trials[:2])
    for path in folder.glob(f"wandb/offline-run-*-{gone}"):  # no run at all
        subprocess.run(["rm", "-r", str(path)], check=True)
    cut_file = runs[cut].path  # a run whose file stops before its end
    cut_file.write_bytes(cut_file.read_bytes()[: cut_file.stat().st_size // 3])
    process = launch_search(tmp_path, "s", None, "--resume")
    finish(process, timeout=300)
    after = {run.id: run for run in offline_runs(folder) if run.job_type == "trial"}
    assert set(after) == {f"s-{row['trial_id']}" for row in before["trials"]}
    for row in trials:
        run = after[f"s-{row['trial_id']}"]
        assert run.exit_code == 0 and [r["epoch"] for r in run.history] == list(range(1, row["epochs"] + 1))
        assert run.summary["status"] == row["status"] and run.config["trial_id"] == row["trial_id"]
    assert {path.name.rsplit("-", 1)[-1] for path in (folder / "wandb" / "superseded").glob("offline-run-*")} >= {
        cut.rsplit("-", 1)[-1]
    }
    assert summary_of(folder)["best"]["trial_id"] == before["best"]["trial_id"]
