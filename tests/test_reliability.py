"""Reliability: a killed driver resumes, Ctrl-C stops cleanly, a killed worker retries, divergence is a result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from text_recognizer.search.wandb_files import offline_runs

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """
metric: val_acc
mode: max
scheduler: {max_t: 5, grace_period: 5, reduction_factor: 2}
fixed: {data_class: FashionMNIST, limit_train_batches: 60}
space:
  fc1: {choice: [16, 64]}
  lr: {loguniform: [1.0e-3, 1.0e-2]}
"""


def start_search(tmp: Path, name: str, data_dir: Path, *extra: str, config: str = CONFIG) -> subprocess.Popen:
    (tmp / f"{name}.yaml").write_text(config)
    command = [
        sys.executable,
        "search/tune_mlp.py",
        "--config",
        str(tmp / f"{name}.yaml"),
        "--storage-path",
        str(tmp),
        "--name",
        name,
        f"--data_dir={data_dir}",
        "--wandb-mode",
        "offline",
        "--quiet",
        *extra,
    ]
    return subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "WANDB_MODE": "offline"}
    )


def results(search_dir: Path) -> dict[str, list[dict]]:
    """Tune's per-trial results, as the driver wrote them."""
    return {path.parent.name.removeprefix("trial_"): complete_lines(path) for path in search_dir.glob("trial_*/result.json")}


def complete_lines(path: Path) -> list[dict]:
    """The JSON lines of a file another process may be writing: a last line without its newline is not there yet."""
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def wait_for(condition, timeout: float = 180, poll: float = 0.3) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(poll)


def resume(tmp: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "search/tune_mlp.py", "--resume", "--name", name, "--storage-path", str(tmp), "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def check_finished_search(search_dir: Path, trials: int, epochs: int) -> dict:
    """Every trial final and complete; one W&B run per trial with one history row per epoch, no gap or duplicate."""
    summary = json.loads((search_dir / "summary.json").read_text())
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


def test_driver_killed_then_resumed(tmp_path: Path, fashion_dir: Path) -> None:
    search = start_search(tmp_path, "killed", fashion_dir, "--num-samples", "4", "--max-concurrent", "2")
    search_dir = tmp_path / "killed"
    # kill as soon as a trial has checkpointed two epochs; epochs take well under a second here, so a trial
    # may have finished already (seen in CI: 3 and 5 epochs) - the test needs one killed half-way
    wait_for(lambda: any(len(rows) >= 2 for rows in results(search_dir).values()), poll=0.05)
    search.send_signal(signal.SIGKILL)
    search.wait()
    before = {trial_id: len(rows) for trial_id, rows in results(search_dir).items()}
    halfway = {trial_id: done for trial_id, done in before.items() if 0 < done < 5}
    assert halfway and sum(before.values()) < 4 * 5, before

    resumed = resume(tmp_path, "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    check_finished_search(search_dir, trials=4, epochs=5)
    after = results(search_dir)
    for trial_id, done in halfway.items():
        rows = after[trial_id]
        # it went on from its checkpoint in a new worker: epochs 1..done from the first driver, not run again
        assert rows[done]["pid"] != rows[0]["pid"]
        assert len({r["pid"] for r in rows[:done]}) == 1
    # the killed driver's runs of the trials it left half-way are kept aside, not synced twice
    assert len(list((search_dir / "wandb" / "superseded").iterdir())) >= len(halfway)


def test_ctrl_c_saves_state_finishes_runs_and_prints_resume(tmp_path: Path, fashion_dir: Path) -> None:
    search = start_search(tmp_path, "interrupted", fashion_dir, "--num-samples", "4", "--max-concurrent", "2")
    search_dir = tmp_path / "interrupted"
    wait_for(lambda: sum(len(rows) >= 2 for rows in results(search_dir).values()) >= 2)
    search.send_signal(signal.SIGINT)
    stdout, stderr = search.communicate(timeout=120)
    assert search.returncode == 130, stderr[-3000:]
    command = f"python search/tune_mlp.py --resume --name interrupted --storage-path {tmp_path}"
    assert command in stdout
    summary = json.loads((search_dir / "summary.json").read_text())
    assert summary["interrupted"] and summary["resume_command"] == command
    runs = offline_runs(search_dir)
    assert runs and all(run.exit_code == 0 and run.summary["status"] == "interrupted" for run in runs)

    resumed = resume(tmp_path, "interrupted")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    check_finished_search(search_dir, trials=4, epochs=5)


def test_killed_worker_is_retried_from_its_checkpoint(tmp_path: Path, fashion_dir: Path) -> None:
    search = start_search(tmp_path, "worker", fashion_dir, "--num-samples", "2", "--max-concurrent", "1")
    search_dir = tmp_path / "worker"
    wait_for(lambda: any(len(rows) >= 2 for rows in results(search_dir).values()))
    trial_id, rows = next((t, r) for t, r in results(search_dir).items() if len(r) >= 2)
    os.kill(rows[0]["trial_pid"], signal.SIGKILL)  # the process that trains (the OOM killer's pick)
    stdout, stderr = search.communicate(timeout=300)
    assert search.returncode == 0, stderr[-3000:]
    summary = json.loads((search_dir / "summary.json").read_text())
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


def test_diverging_trial_is_a_result_and_no_secret_is_written(tmp_path: Path, fashion_dir: Path) -> None:
    key = "dummy0wandb0api0key0that0must0never0be0written0anywhere"
    (tmp_path / "diverge.yaml").write_text(DIVERGING)
    result = subprocess.run(
        [
            sys.executable,
            "search/tune_mlp.py",
            "--config",
            str(tmp_path / "diverge.yaml"),
            "--storage-path",
            str(tmp_path),
            "--name",
            "diverge",
            f"--data_dir={fashion_dir}",
            "--quiet",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_API_KEY": key, "WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "diverge" / "summary.json").read_text())
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
