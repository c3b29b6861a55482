"""The search algorithms: Optuna's TPE seeded by the config and carried over a killed driver; the time budget."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from conftest import finish, results, summary_of, wait_for

from text_recognizer.search.driver import search_alg
from text_recognizer.search.spec import describe
from text_recognizer.search.tracking.wandb_files import offline_runs
from text_recognizer.util import UserError

CONFIG = """
metric: val_acc
mode: max
search_alg: optuna
scheduler: {max_t: 4, grace_period: 4, reduction_factor: 2}
fixed: {data_class: FashionMNIST, limit_train_batches: 60}
space:
  fc1: {choice: [16, 64]}
  lr: {loguniform: [1.0e-3, 1.0e-2]}
"""


def suggestions(tmp_path: Path, seed: int, count: int = 4) -> list[dict]:
    """The first configs the search's own sampler suggests, for a config seeded with `seed` (no Ray needed)."""
    config = tmp_path / f"seed{seed}.yaml"
    config.write_text(CONFIG + f"seed: {seed}\n")
    spec = describe(["--config", str(config), "--storage-path", str(tmp_path / "storage"), "--wandb-mode", "disabled"])
    searcher = search_alg(spec).searcher  # the OptunaSearch inside the GrowingSearchGenerator
    searcher.set_search_properties(spec.config.metric, spec.config.mode, spec.config.param_space())
    return [{key: searcher.suggest(f"t{i}")[key] for key in spec.config.space} for i in range(count)]


def test_the_config_seed_seeds_optuna(tmp_path: Path) -> None:
    first, again, other = suggestions(tmp_path, 3), suggestions(tmp_path, 3), suggestions(tmp_path, 4)
    assert first == again
    assert first != other
    assert len({round(s["lr"], 12) for s in first}) == len(first)  # sampled, not one value repeated


@pytest.mark.parametrize("told", ["complete", "pruned"])
def test_what_optuna_is_told_of_a_trial_asha_stopped(tmp_path: Path, told: str) -> None:
    """`asha_stops_as`: a trial stopped at epoch 1 of 4 ends COMPLETE with its epoch-1 value (Ray's OptunaSearch),
    or PRUNED at epoch 1 with that value as its intermediate one; a trial that ran max_t is COMPLETE either way."""
    import optuna

    config = tmp_path / "s.yaml"
    config.write_text(CONFIG + f"asha_stops_as: {told}\n")
    spec = describe(["--config", str(config), "--storage-path", str(tmp_path / "storage"), "--wandb-mode", "disabled"])
    searcher = search_alg(spec).searcher
    searcher.set_search_properties(spec.config.metric, spec.config.mode, spec.config.param_space())
    for trial_id in ("stopped", "ran"):
        searcher.suggest(trial_id)
    searcher.on_trial_complete("stopped", {"val_acc": 0.5, "training_iteration": 1})  # ASHA's stop: no result before
    for epoch in range(1, 5):
        result = {"val_acc": 0.6 + epoch / 100, "training_iteration": epoch}
        (searcher.on_trial_complete if epoch == 4 else searcher.on_trial_result)("ran", result)
    stopped, ran = searcher._ot_study.trials
    assert ran.state == optuna.trial.TrialState.COMPLETE and ran.value == pytest.approx(0.64)
    if told == "pruned":
        assert stopped.state == optuna.trial.TrialState.PRUNED and stopped.intermediate_values == {1: 0.5}
    else:
        assert stopped.state == optuna.trial.TrialState.COMPLETE and stopped.value == 0.5


def test_asha_stops_as_pruned_is_for_optuna_only(tmp_path: Path) -> None:
    config = tmp_path / "s.yaml"
    config.write_text(CONFIG.replace("search_alg: optuna", "search_alg: random") + "asha_stops_as: pruned\n")
    with pytest.raises(UserError, match=r"asha_stops_as: pruned needs search_alg optuna \(random has no model to tell\)"):
        describe(["--config", str(config), "--storage-path", str(tmp_path / "storage"), "--wandb-mode", "disabled"])


@pytest.mark.slow
def test_optuna_search_killed_then_resumed(tmp_path: Path, launch_search) -> None:
    """A killed driver's Optuna study comes back with --resume: every sample runs once, none is lost or repeated,
    and the study that Tune saved at the end holds every trial with its result."""
    from ray.tune.search.optuna import OptunaSearch

    search = launch_search(tmp_path, "optuna", CONFIG, "--num-samples", "6", "--max-concurrent", "2")
    search_dir = tmp_path / "optuna"
    # kill once two trials have ended (the sampler has learnt from them) and another is half-way
    wait_for(lambda: sum(len(rows) >= 4 for rows in results(search_dir).values()) >= 2, poll=0.05)
    search.send_signal(signal.SIGKILL)
    search.wait()
    before = results(search_dir)
    assert len(before) < 6, "the search finished before it was killed"

    stdout = finish(launch_search(tmp_path, "optuna", None, "--resume"))
    summary = summary_of(search_dir)
    assert summary["num_trials"] == 6 and summary["statuses"] == {"completed": 6}, summary["statuses"]
    after = results(search_dir)
    assert set(before) <= set(after) and len(after) == 6
    # what the first driver ran is kept, not sampled again (a trial started just before the kill has no row yet)
    assert sum(bool(rows) for rows in before.values()) >= 2
    for trial_id, rows in before.items():
        assert not rows or after[trial_id][0]["config"] == rows[0]["config"]
    configs = [(rows[0]["config"]["fc1"], rows[0]["config"]["lr"]) for rows in after.values()]
    assert len(set(configs)) == 6
    states = sorted(search_dir.glob("searcher-state-*.pkl"))
    assert states, sorted(p.name for p in search_dir.iterdir())
    restored = OptunaSearch()
    restored.restore(str(states[-1]))
    finished = [trial for trial in restored._ot_study.trials if trial.value is not None]
    assert len(finished) == 6
    assert sorted(round(t.value, 6) for t in finished) == sorted(round(rows[-1]["val_acc"], 6) for rows in after.values())
    assert "test_acc" in stdout


@pytest.mark.slow
def test_time_budget_ends_the_search_as_finished(tmp_path: Path, launch_search) -> None:
    """When the budget is spent no trial starts and running ones stop; the search is written up as a finished one:
    the winner's test accuracy, the W&B summary run, runs ended as stopped_by_budget, and the report says so."""
    config = CONFIG.replace("search_alg: optuna", "search_alg: random")
    config = config.replace("max_t: 4, grace_period: 4", "max_t: 30, grace_period: 30")  # trials outlast the budget
    flags = ("--num-samples", "20", "--time-budget", "45s", "--keep-checkpoints", "1")
    stdout = finish(launch_search(tmp_path, "budget", config, *flags))
    summary = summary_of(tmp_path / "budget")
    assert summary["budget_ended"] and not summary["interrupted"] and "resume_command" not in summary
    assert 45 <= summary["wall_seconds"] < 45 + 60, summary["wall_seconds"]
    assert summary["statuses"].get("stopped_by_budget", 0) >= 1, summary["statuses"]
    assert summary["num_trials"] < 20 or summary["statuses"].get("not_started", 0) >= 1
    assert summary["best"]["test_acc"] > 0.1
    # only the winner keeps a checkpoint: the trials stopped by the budget ended too
    assert summary["checkpoints_kept"] == [summary["best"]["trial_id"]]
    with_checkpoints = {p.parent.name for p in (tmp_path / "budget").glob("trial_*/checkpoint_*")}
    assert with_checkpoints == {f"trial_{summary['best']['trial_id']}"}
    assert "time budget (45 s) ended the search" in stdout
    runs = offline_runs(tmp_path / "budget")
    stopped = [run for run in runs if run.job_type == "trial" and run.summary.get("status") == "stopped_by_budget"]
    assert len(stopped) == summary["statuses"]["stopped_by_budget"]
    assert [run.job_type for run in runs].count("summary") == 1
