"""Growing a real search (search/tune_mlp.py --resume --num-samples N): real Ray, real Lightning on Fashion-MNIST,
real offline W&B files read back."""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path

import pytest
from conftest import finish, results, summary_of, wait_for

from text_recognizer.search.tracking.wandb_files import offline_runs

# tiny trials: 3 batches an epoch, 2 epochs; ASHA may stop some after the first
GROW = """
metric: val_acc
mode: max
scheduler: {max_t: 2, grace_period: 1, reduction_factor: 2}
fixed: {data_class: FashionMNIST, limit_train_batches: 3, limit_val_batches: 2}
space:
  fc1: {choice: [16, 32]}
  lr: {loguniform: [1.0e-3, 1.0e-2]}
"""


def drawn(summary: dict) -> list[dict]:
    """The trials' searched values, in the order the sampler drew them (a random trial id ends in a counter)."""
    rows = sorted(summary["trials"], key=lambda row: row["trial_id"].rsplit("_", 1)[-1])
    return [{key: row["config"][key] for key in ("fc1", "lr")} for row in rows]


def trial_runs(search_dir: Path) -> list:
    return [run for run in offline_runs(search_dir) if run.job_type == "trial"]


def check_runs_once(search_dir: Path, summary: dict) -> None:
    """Every trial has exactly one W&B run (superseded ones aside), with its epochs 1..n each logged once, and the
    search has one summary run, which covers every trial."""
    runs = trial_runs(search_dir)
    assert sorted(run.id for run in runs) == sorted(f"{search_dir.name}-{row['trial_id']}" for row in summary["trials"])
    epochs = {f"{search_dir.name}-{row['trial_id']}": row["epochs"] for row in summary["trials"]}
    for run in runs:
        assert [row["epoch"] for row in run.history] == list(range(1, epochs[run.id] + 1)), run.id
        assert run.group == search_dir.name and run.exit_code == 0
    (summary_run,) = [run for run in offline_runs(search_dir) if run.job_type == "summary"]
    assert summary_run.summary["num_trials"] == summary["num_trials"]
    assert summary_run.summary["num_parts"] == len(summary["parts"])


def digests(search_dir: Path) -> dict[str, str]:
    """The bytes of each trial run's .wandb file, by run id: what 'untouched' compares."""
    return {run.id: hashlib.md5(run.path.read_bytes()).hexdigest() for run in trial_runs(search_dir)}


@pytest.mark.slow
def test_a_random_search_grown_from_6_to_10_samples_draws_the_10_sample_configs(tmp_path: Path, launch_search) -> None:
    finish(launch_search(tmp_path, "six", GROW, "--num-samples", "6"), timeout=600)
    before = summary_of(tmp_path / "six")
    finish(launch_search(tmp_path, "six", None, "--resume", "--num-samples", "10"), timeout=600)
    grown = summary_of(tmp_path / "six")
    finish(launch_search(tmp_path, "ten", GROW, "--num-samples", "10"), timeout=600)
    ten = summary_of(tmp_path / "ten")
    assert len(drawn(grown)) == 10 and drawn(grown) == drawn(ten)
    assert drawn(grown)[:6] == drawn(before)
    old = {row["trial_id"]: row for row in before["trials"]}
    for row in grown["trials"]:  # the first six trials as they were
        if row["trial_id"] in old:
            assert {k: row[k] for k in ("status", "epochs", "val_acc")} == {
                k: old[row["trial_id"]][k] for k in ("status", "epochs", "val_acc")
            }
    assert [part["num_samples"] for part in grown["parts"]] == [6, 10] and not grown["interrupted"]


@pytest.mark.slow
def test_an_optuna_search_grown_twice_keeps_every_trial_and_run_once(tmp_path: Path, launch_search) -> None:
    from ray.tune.search.optuna import OptunaSearch

    from text_recognizer.search.grow import GrowingSearchGenerator

    search_dir = tmp_path / "tpe"
    finish(launch_search(tmp_path, "tpe", GROW, "--search-alg", "optuna", "--num-samples", "2"), timeout=600)
    first = digests(search_dir)
    finish(launch_search(tmp_path, "tpe", None, "--resume", "--num-samples", "3"), timeout=600)
    second = digests(search_dir)
    finish(launch_search(tmp_path, "tpe", None, "--resume", "--num-samples", "4", "--time-budget", "10m"), timeout=600)
    summary = summary_of(search_dir)
    assert summary["num_trials"] == 4 and not summary["interrupted"]
    assert [(part["num_samples"], part["time_budget"]) for part in summary["parts"]] == [(2, None), (3, None), (4, 600)]
    assert all(part["wall_seconds"] > 0 and part["started"] for part in summary["parts"])
    check_runs_once(search_dir, summary)
    after = digests(search_dir)
    assert {run: after[run] for run in first} == first and {run: after[run] for run in second} == second  # untouched
    # the study Tune saved: every trial, in the order asked, each with its value and intermediate values
    generator = GrowingSearchGenerator(OptunaSearch())
    generator.restore_from_dir(str(search_dir))
    trials = generator.searcher._ot_study.trials
    assert len(trials) == 4 and all(trial.state.name == "COMPLETE" for trial in trials)
    by_lr = {round(row["config"]["lr"], 12): row for row in summary["trials"]}
    for trial in trials:
        row = by_lr[round(trial.params["lr"], 12)]
        # every epoch's value but (when ASHA ended the trial with it) the last, which Tune hands to on_trial_complete
        assert set(range(1, row["epochs"])) <= set(trial.intermediate_values) <= set(range(1, row["epochs"] + 1))
        assert trial.value == pytest.approx(row["val_acc"])


@pytest.mark.slow
def test_a_grown_search_killed_and_resumed_loses_nothing(tmp_path: Path, launch_search) -> None:
    search_dir = tmp_path / "grown"
    config = GROW.replace("max_t: 2, grace_period: 1", "max_t: 4, grace_period: 4")  # every trial runs 4 epochs
    finish(launch_search(tmp_path, "grown", config, "--num-samples", "2"), timeout=600)
    first, earlier = summary_of(search_dir), digests(search_dir)
    old = set(results(search_dir))
    search = launch_search(tmp_path, "grown", None, "--resume", "--num-samples", "5")
    wait_for(lambda: any(len(rows) >= 2 for t, rows in results(search_dir).items() if t not in old), timeout=400, poll=0.05)
    search.send_signal(signal.SIGKILL)
    search.wait()
    finish(launch_search(tmp_path, "grown", None, "--resume"), timeout=600)
    summary = summary_of(search_dir)
    assert summary["num_trials"] == 5 and summary["statuses"] == {"completed": 5} and not summary["interrupted"]
    assert [part["num_samples"] for part in summary["parts"]] == [2, 5]  # the resume went on with the grown part
    check_runs_once(search_dir, summary)
    assert {run: digests(search_dir)[run] for run in earlier} == earlier
    for trial_id, rows in results(search_dir).items():  # each epoch once: nothing lost, nothing run twice
        assert sorted({row["training_iteration"] for row in rows}) == [1, 2, 3, 4], trial_id
    assert first["best"]["value"] <= summary["best"]["value"]
