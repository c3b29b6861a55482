"""A search that can't train says so: its first trials failing before any epoch stop it, a search whose every trial
failed is no result; either way one line with the first trial's cause, and exit status 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SCRIPT
from ray.train._internal.storage import StorageContext
from ray.tune.experiment import Trial

from text_recognizer.search.config import SMOKE_CONFIG
from text_recognizer.search.failfast import EXIT_STATUS, FIRST, FailFast, SearchCannotTrain, cause, check_some_trained

RAY_TASK_ERROR = """Failure # 1 (occurred at 2026-12-01_23-34-22)
\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=25206, ip=192.0.2.2, actor_id=4ee8, repr=train_in_actor)
  File "/work/text_recognizer/search/trial/trial_process.py", line 133, in train_trial
    train(
  File "/site-packages/lightning_fabric/connector.py", line 565, in _convert_precision_to_unified_args
    raise ValueError(f"Precision {repr(precision)} is invalid.")
ValueError: Precision 'bogus' is invalid. Allowed precision values: ('16-mixed', '32-true')
"""
ACTOR_DIED = """Failure # 1 (occurred at 2026-12-01_20-00-00)
The actor died unexpectedly before finishing this task.
\tclass_name: ImplicitFunc
\tactor_id: 4ee8
"""


def test_the_cause_is_the_innermost_error_line_else_the_first_line() -> None:
    assert cause(RAY_TASK_ERROR) == "ValueError: Precision 'bogus' is invalid. Allowed precision values: ('16-mixed', '32-true')"
    assert cause(ACTOR_DIED) == "The actor died unexpectedly before finishing this task."
    assert cause("") == "no error recorded" and len(cause("x" * 1000)) == 300


def test_a_search_whose_every_trial_failed_is_no_result(tmp_path: Path) -> None:
    error = tmp_path / "error.txt"
    error.write_text(RAY_TASK_ERROR)
    failed = {"interrupted": False, "trials": [{"trial_id": "a", "status": "error", "error": str(error)}] * 2}
    with pytest.raises(SearchCannotTrain, match=r"^every trial failed \(2\); trial a: ValueError: Precision 'bogus'"):
        check_some_trained(failed)
    one_trained = {**failed, "trials": [*failed["trials"], {"trial_id": "b", "status": "completed"}]}
    check_some_trained(one_trained)
    check_some_trained({**failed, "interrupted": True})  # --resume may still train them: 130, not 1
    check_some_trained({"interrupted": False, "trials": []})


def stub_trial(tmp_path: Path, trial_id: str, epochs: int) -> Trial:
    """A Tune trial of a search in `tmp_path` that has trained `epochs` epochs (its last result)."""
    storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="s", trial_dir_name=f"trial_{trial_id}")
    trial = Trial("__fake", stub=True, trial_id=trial_id, storage=storage)
    trial.run_metadata.last_result = {"training_iteration": epochs} if epochs else {}
    return trial


@pytest.mark.parametrize("trained_before", [False, True])
def test_the_first_trials_failing_stop_a_search_but_not_one_resumed_after_epochs(
    local_ray: None, tmp_path: Path, trained_before: bool
) -> None:
    """Two trials failing before any epoch stop a new search; in a resumed search whose trials trained before (a
    driver resumed into a storage outage, seen in the chaos benchmark) they are just two failed trials."""
    trials = [stub_trial(tmp_path, "t0", 3 if trained_before else 0)]  # a trial's folder needs Ray (local_ray)
    trials += [stub_trial(tmp_path, f"t{i}", 0) for i in (1, 2)]
    callback = FailFast(FIRST)
    callback.on_step_begin(0, trials)
    for trial in trials[1:]:
        callback.on_trial_error(1, trials, trial)
    if trained_before:
        callback.check()
    else:
        with pytest.raises(SearchCannotTrain, match=r"^the search stopped: its first 2 trials failed before any epoch"):
            callback.check()


@pytest.mark.slow
def test_a_search_whose_trials_crash_before_epoch_1_stops_with_one_line(tmp_path: Path, fashion_dir: Path) -> None:
    """A real local search whose run flags pass the driver's checks and make every trial fail as it builds its
    model (a first layer of 10^9 units: 3 TB of weights, refused by the allocator at once): it stops after its first
    2 trials, exit 1, no traceback printed."""
    config = SMOKE_CONFIG.read_text().replace("  fc1: {choice: [16, 32]}\n", "")
    config = config.replace("fixed:\n", "fixed:\n  fc1: 1000000000\n")
    assert "fc1: 1000000000" in config and "fc1: {choice" not in config
    (tmp_path / "crash.yaml").write_text(config)
    command = [sys.executable, str(SCRIPT), "--config", str(tmp_path / "crash.yaml"), "--storage-path", str(tmp_path)]
    command += ["--name", "crash", f"--data_dir={fashion_dir}", "--wandb-mode", "offline", "--num-samples", "8"]
    command += ["--max-concurrent", "2", "--max-failures", "0"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert result.returncode == EXIT_STATUS, output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tune_mlp.py: error: the search stopped: its first 2 trials failed before any epoch; trial ")
    assert "Error: " in last.split("; trial ", 1)[1], last  # the first trial's cause: its innermost error line
    assert "Traceback" not in result.stderr, output  # Tune's and Ray's tracebacks stay in each trial's error.txt
    failed = [line for line in result.stderr.splitlines() if line.startswith("trial ") and " failed: " in line]
    assert len(failed) == 2, output  # one line per failed trial, naming its error.txt
    started = list((tmp_path / "crash").glob("trial_*"))
    assert 2 <= len(started) < 8, started  # stopped early: not every sampled trial ran
