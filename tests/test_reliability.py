"""Reliability: a killed driver resumes, Ctrl-C stops cleanly, a killed worker retries, divergence is a result."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from conftest import TRIAL_PROCESSES, finish, results, summary_of, wait_for

from text_recognizer.search.wandb_files import offline_runs

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("mode", TRIAL_PROCESSES)]  # each test in both trial modes

CONFIG = """
metric: val_acc
mode: max
scheduler: {max_t: 5, grace_period: 5, reduction_factor: 2}
fixed: {data_class: FashionMNIST, limit_train_batches: 60}
space:
  fc1: {choice: [16, 64]}
  lr: {loguniform: [1.0e-3, 1.0e-2]}
"""


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
        # it went on from its checkpoint in a new worker: epochs 1..done from the first driver, not run again
        assert rows[done]["pid"] != rows[0]["pid"]
        assert len({r["pid"] for r in rows[:done]}) == 1
    # the killed driver's runs of the trials it left half-way are kept aside, not synced twice
    assert len(list((search_dir / "wandb" / "superseded").iterdir())) >= len(halfway)


def test_ctrl_c_saves_state_finishes_runs_and_prints_resume(tmp_path: Path, launch_search, mode: str) -> None:
    search = launch_search(
        tmp_path, "interrupted", CONFIG, "--num-samples", "4", "--max-concurrent", "2", "--trial-process", mode
    )
    search_dir = tmp_path / "interrupted"
    wait_for(lambda: sum(len(rows) >= 2 for rows in results(search_dir).values()) >= 2)
    search.send_signal(signal.SIGINT)
    stdout = finish(search, timeout=120, returncode=130)
    command = f"python search/tune_mlp.py --resume --name interrupted --storage-path {tmp_path}"
    assert command in stdout
    summary = summary_of(search_dir)
    assert summary["interrupted"] and summary["resume_command"] == command
    # every open run was finished as interrupted; a trial that had finished before Ctrl-C keeps its own end
    runs = offline_runs(search_dir)
    statuses = [(run.summary["status"], run.summary["epochs_trained"]) for run in runs]
    assert all(run.exit_code == 0 for run in runs) and any(status == "interrupted" for status, _ in statuses), statuses
    # a trial may even have delivered its 5th epoch and not yet ended when Ctrl-C came: still interrupted
    assert all(status == "interrupted" and epochs <= 5 or status == "completed" and epochs == 5 for status, epochs in statuses)
    trials = {row["trial_id"]: row["status"] for row in summary["trials"]}
    assert sorted(trials.values()).count("interrupted") == sum(status == "interrupted" for status, _ in statuses)

    resume(launch_search, tmp_path, "interrupted")
    check_finished_search(search_dir, trials=4, epochs=5)


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
