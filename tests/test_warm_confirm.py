"""--warm-start and --confirm on real searches: real Ray, real Lightning on Fashion-MNIST, real offline W&B files."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
from conftest import finish, summary_of

from text_recognizer.search.tracking.wandb_files import offline_runs

# one epoch of 3 batches: the learning rate decides almost everything (higher learns more in so few steps)
EARLIER = """
metric: val_acc
mode: max
scheduler: {max_t: 1, grace_period: 1, reduction_factor: 2}
fixed: {data_class: FashionMNIST, limit_train_batches: 3, limit_val_batches: 2, fc1: 16, fc2: 16}
space:
  lr: {loguniform: [1.0e-5, 1.0e-1]}
"""
NARROWER = EARLIER.replace("1.0e-5", "1.0e-3").replace("max: 1,", "max: 1,") + "search_alg: optuna\n"


@pytest.mark.slow
def test_a_warm_start_seeds_the_study_with_the_earlier_trials(tmp_path: Path, launch_search) -> None:
    from ray.tune.search.optuna import OptunaSearch

    from text_recognizer.search.grow import GrowingSearchGenerator

    finish(launch_search(tmp_path, "earlier", EARLIER, "--num-samples", "12"), timeout=900)
    earlier = summary_of(tmp_path / "earlier")["trials"]
    inside = [row for row in earlier if row["config"]["lr"] >= 1.0e-3]
    out = finish(
        launch_search(tmp_path, "warm", NARROWER, "--num-samples", "2", "--warm-start", str(tmp_path / "earlier")), timeout=900
    )
    assert f"{len(inside)} trials of {tmp_path / 'earlier'} seed the study; {12 - len(inside)} left out" in out
    generator = GrowingSearchGenerator(OptunaSearch())
    generator.restore_from_dir(str(tmp_path / "warm"))
    study = generator.searcher._ot_study.trials
    assert len(study) == len(inside) + 2
    seeded = {round(trial.params["lr"], 12): trial for trial in study[: len(inside)]}
    assert seeded.keys() == {round(row["config"]["lr"], 12) for row in inside}
    for row in inside:  # each with its value and its intermediate value at epoch 1
        trial = seeded[round(row["config"]["lr"], 12)]
        assert trial.value == pytest.approx(row["val_acc"]) and trial.intermediate_values == {1: pytest.approx(row["val_acc"])}
    # the new trials sit where the earlier search was good: above the median lr of the seeded trials, whose best
    # are the highest
    new = [row["config"]["lr"] for row in summary_of(tmp_path / "warm")["trials"]]
    best_half = sorted(inside, key=lambda row: row["val_acc"])[len(inside) // 2 :]
    low = min(math.log(row["config"]["lr"]) for row in best_half)
    assert all(math.log(lr) >= low for lr in new), (new, [row["config"]["lr"] for row in best_half])


@pytest.mark.slow
def test_confirm_2x2_trains_4_confirm_trials_and_picks_the_best_mean(tmp_path: Path, launch_search) -> None:
    config = EARLIER.replace("max_t: 1", "max_t: 2")
    finish(launch_search(tmp_path, "confirmed", config, "--num-samples", "3", "--confirm", "2x2"), timeout=900)
    search_dir = tmp_path / "confirmed"
    summary = summary_of(search_dir)
    confirm = summary["confirm"]
    assert (confirm["top_k"], confirm["seeds"]) == (2, 2) and not confirm["interrupted"]
    top = sorted(summary["trials"], key=lambda row: -row["best_val_acc"])[:2]
    assert [entry["trial_id"] for entry in sorted(confirm["configs"], key=lambda e: -e["search_value"])] == [
        r["trial_id"] for r in top
    ]
    runs = [run for entry in confirm["configs"] for run in entry["runs"]]
    assert len(runs) == 4 and len(list((search_dir / "confirm-1").glob("trial_*/result.json"))) == 4
    for entry in confirm["configs"]:
        values = [run["value"] for run in entry["runs"]]
        assert [run["seed"] for run in entry["runs"]] == [43, 44]  # new seeds: the trials trained with 42
        assert all(run["epoch"] >= 1 and run["config"]["max_epochs"] == 2 for run in entry["runs"])
        assert entry["val_mean"] == pytest.approx(statistics.fmean(values))
        assert entry["val_std"] == pytest.approx(statistics.stdev(values))
        assert entry["test_acc_mean"] == pytest.approx(statistics.fmean(run["test_acc"] for run in entry["runs"]))
    means = {entry["trial_id"]: entry["val_mean"] for entry in confirm["configs"]}
    assert confirm["winner"] == max(means, key=means.get) and summary["best"]["confirm_of"] == confirm["winner"]
    best = summary["best"]
    assert best["test_acc"] is not None and f"--seed={best['config']['seed']}" in best["replay"]
    # W&B: 4 confirm runs in the search's group, 2 per config, each config's search trial named
    confirm_runs = [run for run in offline_runs(search_dir) if run.job_type == "confirm"]
    assert len(confirm_runs) == 4 and {run.group for run in confirm_runs} == {"confirmed"}
    assert sorted(run.config["confirm_of"] for run in confirm_runs) == sorted(2 * list(means))
    assert all(run.exit_code == 0 and len(run.history) == 2 for run in confirm_runs)
    assert "Confirmed: top 2 configs" in (search_dir / "report" / "report.html").read_text()
    assert (search_dir / "report" / "confirm.png").is_file()
