"""grow.py on real Tune with a trivial trainable: a restored search grows as if it had been started larger, ASHA's
rungs come back, the per-part budget stops. These tests also catch a Ray release that moves what grow.py reaches."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import ray
from ray import tune

from text_recognizer.search.grow import (
    GrowingSearchGenerator,
    GrowingVariantGenerator,
    PartBudget,
    ResumableASHA,
    end_in_sampler,
    reconcile_samples,
    reconcile_searcher_samples,
    rung_values,
    this_part,
)
from text_recognizer.search.saved_state import repair


def report_epochs(config: dict) -> None:
    for epoch in range(1, config["epochs"] + 1):
        tune.report({"score": config["x"] + epoch})


def report_high_then_low(config: dict) -> None:
    """Scores 10 + epoch, or 0 + epoch once the file config["low"] exists (the trials of a later part)."""
    base = 0 if os.path.exists(config["low"]) else 10
    for epoch in range(1, config["epochs"] + 1):
        tune.report({"score": base + epoch, "base": base})


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers can't import this test module

SPACE = {"x": tune.uniform(0, 1), "epochs": 2}


def fit(tmp_path: Path, name: str, num_samples: int, search_alg, scheduler=None, space=SPACE) -> tune.ResultGrid:
    tune_config = tune.TuneConfig(metric="score", mode="max", num_samples=num_samples, search_alg=search_alg, scheduler=scheduler)
    run_config = tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0, stop=PartBudget())
    with this_part(num_samples, None):
        return tune.Tuner(report_epochs, param_space=space, tune_config=tune_config, run_config=run_config).fit()


def grown(tmp_path: Path, name: str, num_samples: int) -> tune.ResultGrid:
    tuner = tune.Tuner.restore(str(tmp_path / name), report_epochs, resume_unfinished=True)
    with this_part(num_samples, None):
        return tuner.fit()


def configs(grid: tune.ResultGrid) -> list[float]:
    """The trials' x, in the order the sampler drew them (the experiment tag starts with a counter)."""
    return [r.config["x"] for r in sorted(grid, key=lambda r: int(r.metrics["experiment_tag"].split("_")[0]))]


def test_a_grown_random_search_draws_what_a_larger_one_draws(local_ray: None, tmp_path: Path) -> None:
    first = fit(tmp_path, "small", 3, GrowingVariantGenerator(random_state=7))
    assert len(first) == 3
    larger = fit(tmp_path, "large", 5, GrowingVariantGenerator(random_state=7))
    again = grown(tmp_path, "small", 5)
    assert len(again) == 5 and configs(again) == configs(larger)
    assert configs(again)[:3] == configs(first)
    assert grown(tmp_path, "small", 5).num_errors == 0 and len(grown(tmp_path, "small", 5)) == 5  # nothing more


def test_a_grown_optuna_search_keeps_its_study(local_ray: None, tmp_path: Path) -> None:
    from ray.tune.search.optuna import OptunaSearch

    first = fit(tmp_path, "tpe", 3, GrowingSearchGenerator(OptunaSearch(seed=1)))
    again = grown(tmp_path, "tpe", 5)
    assert len(again) == 5 and configs(again)[:3] == configs(first)
    # the study Tune saved holds all five trials, the first three as they were, each with its intermediate values
    generator = GrowingSearchGenerator(OptunaSearch(seed=1))
    generator.restore_from_dir(str(tmp_path / "tpe"))
    study = generator.searcher._ot_study
    assert len(study.trials) == 5 and all(trial.state.name == "COMPLETE" for trial in study.trials)
    assert [trial.params["x"] for trial in study.trials[:3]] == configs(first)
    assert all(sorted(trial.intermediate_values) == [1, 2] for trial in study.trials)


def test_restored_asha_judges_new_trials_against_the_earlier_rungs(local_ray: None, tmp_path: Path) -> None:
    """Earlier trials score 10 + epoch, later ones 0 + epoch: against refilled rungs ASHA stops each later one at
    the first rung, where against empty rungs (Tune's own restore) the first later one would go on."""
    space = {"x": tune.grid_search([0, 1]), "epochs": 4, "low": str(tmp_path / "low")}
    scheduler = ResumableASHA(time_attr="training_iteration", max_t=4, grace_period=1, reduction_factor=2)
    tune_config = tune.TuneConfig(
        metric="score", mode="max", num_samples=1, search_alg=GrowingVariantGenerator(random_state=0), scheduler=scheduler
    )
    run_config = tune.RunConfig(name="asha", storage_path=str(tmp_path), verbose=0, stop=PartBudget())
    with this_part(1, None):
        tune.Tuner(report_high_then_low, param_space=space, tune_config=tune_config, run_config=run_config).fit()
    assert [len(values) for values in rung_values(scheduler)] == [2, 2, 2]  # rungs at epochs 1, 2 and 4: both trials

    (tmp_path / "low").write_text("")
    tuner = tune.Tuner.restore(str(tmp_path / "asha"), report_high_then_low)
    with this_part(2, None):
        grid = tuner.fit()
    epochs = sorted((r.metrics["base"], r.metrics["training_iteration"]) for r in grid)
    assert epochs == [(0, 1), (0, 1), (10, 4), (10, 4)], epochs


def test_the_part_budget_stops_at_its_deadline(local_ray: None, tmp_path: Path) -> None:
    space = {"x": tune.uniform(0, 1), "epochs": 1}
    tune_config = tune.TuneConfig(metric="score", mode="max", num_samples=500, search_alg=GrowingVariantGenerator())
    run_config = tune.RunConfig(name="budget", storage_path=str(tmp_path), verbose=0, stop=PartBudget())
    began = time.time()
    with this_part(500, began + 20):
        grid = tune.Tuner(report_epochs, param_space=space, tune_config=tune_config, run_config=run_config).fit()
    ran = sum(r.metrics.get("training_iteration", 0) for r in grid if r.metrics)
    assert 0 < ran < 500 and 20 <= time.time() - began < 60, ran


@pytest.mark.parametrize("sampler", ["random", "optuna"])
def test_a_search_its_budget_ended_grows_by_time_alone(local_ray: None, tmp_path: Path, sampler: str) -> None:
    """`--resume --time-budget 5m` on a search whose budget ran out with samples left: Tune marked its sampler
    finished when the budget's stopper ended the experiment; the new part's time reopens it, and draws more of the
    same sample count. A part whose own budget is spent does not (seen: a grown part ran 1 s and exited 130)."""
    from ray.tune.search.optuna import OptunaSearch

    space = {"x": tune.uniform(0, 1), "epochs": 1}
    algorithm = GrowingVariantGenerator(random_state=3) if sampler == "random" else GrowingSearchGenerator(OptunaSearch(seed=3))
    tune_config = tune.TuneConfig(metric="score", mode="max", num_samples=500, search_alg=algorithm)
    run_config = tune.RunConfig(name="spent", storage_path=str(tmp_path), verbose=0, stop=PartBudget())
    with this_part(500, time.time() + 8):
        first = len(tune.Tuner(report_epochs, param_space=space, tune_config=tune_config, run_config=run_config).fit())
    assert 0 < first < 500

    def resumed(seconds: float) -> int:
        tuner = tune.Tuner.restore(str(tmp_path / "spent"), report_epochs, resume_unfinished=True)
        with this_part(500, time.time() + seconds):
            return len(tuner.fit())

    assert resumed(-1) == first  # its own budget spent: nothing more
    grown = resumed(8)
    assert first < grown < 500, (first, grown)


def drop_newest_trials(experiment: Path, count: int) -> set[str]:
    """Tune's saved state as a driver killed mid-copy leaves it: the experiment_state of an earlier save (without
    the newest `count` trials) beside the search algorithm's newer state; returns the ids dropped."""
    (path,) = experiment.glob("experiment_state-*.json")
    state = json.loads(path.read_text())
    tag = lambda entry: int(json.loads(entry[0])["experiment_tag"].split("_")[0])  # noqa: E731 the sampler's counter
    ordered = sorted(state["trial_data"], key=tag)
    state["trial_data"] = ordered[:-count]
    path.write_text(json.dumps(state))
    return {json.loads(entry[0])["trial_id"] for entry in ordered[-count:]}


@pytest.mark.parametrize("sampler", ["random", "optuna"])
def test_a_sampler_ahead_of_the_saved_trials_draws_the_lost_ones_again(local_ray: None, tmp_path: Path, sampler: str) -> None:
    """Seen in the long chaos run: the saved state had 998 trials and the sampler's 1,000, so the search could never
    end (it sampled all, yet fewer trials than its count). A resume now draws the lost ones again."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    algorithm = (
        GrowingVariantGenerator(random_state=5)
        if sampler == "random"
        else GrowingSearchGenerator(ConcurrencyLimiter(OptunaSearch(seed=5), max_concurrent=2))
    )
    first = fit(tmp_path, "ahead", 4, algorithm)
    assert len(first) == 4
    lost = drop_newest_trials(tmp_path / "ahead", 2)
    restored = repair(str(tmp_path / "ahead"), max_t=2, stopped=set()).trial_ids
    assert len(restored) == 2 and not restored & lost
    tuner = tune.Tuner.restore(str(tmp_path / "ahead"), report_epochs, resume_unfinished=True)
    with this_part(4, None, restored):
        again = tuner.fit()
    assert len(again) == 4 and again.num_errors == 0
    assert all(result.metrics["training_iteration"] == 2 for result in again)
    ids = {result.metrics["trial_id"] for result in again}
    assert restored < ids and len(ids - restored) == 2 and not ids & lost  # drawn again under new ids


def test_the_same_lost_trials_are_drawn_again_once_under_ids_no_folder_has(local_ray: None) -> None:
    """The long chaos run: 5 resumes in a row restored one saved state, 3 trials short of its sampler; each drew the
    3 again, and the search sampled 2,233 trials for its 2,200. Reconciling sets the samples left, so a second
    resume of the same state draws none more; and no new trial takes the id of one with a folder on storage (a lost
    trial's, with its checkpoints) or of one made before."""
    generator = GrowingVariantGenerator(random_state=0)
    tune.register_trainable("report_epochs", report_epochs)
    generator.add_configurations({"run": {"run": "report_epochs", "config": SPACE, "num_samples": 6}})
    made = [generator.next_trial() for _ in range(4)]  # 2 samples left
    restored, taken = {made[0].trial_id, made[1].trial_id}, {made[2].trial_id, "other_00009"}
    assert reconcile_samples(generator, restored, taken) == 2  # 4 left: 6 samples, 2 trials in the state
    assert reconcile_samples(generator, restored, taken) == 0  # the next resume of the same state
    drawn = [generator.next_trial() for _ in range(5)]
    assert drawn[-1] is None and all(drawn[:4])
    assert not {trial.trial_id for trial in drawn[:4]} & {trial.trial_id for trial in made}


def test_a_lost_trial_the_concurrency_limit_counts_as_running_ends_there(local_ray: None) -> None:
    """Two trials made and lost before Tune saved them: the limit (2) would wait for them forever; they end as
    failed in the study, and the searcher makes trials again."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    generator = GrowingSearchGenerator(ConcurrencyLimiter(OptunaSearch(seed=0), max_concurrent=2))
    generator.set_search_properties("score", "max", SPACE)
    tune.register_trainable("report_epochs", report_epochs)
    generator.add_configurations({"run": {"run": "report_epochs", "config": SPACE, "num_samples": 3}})
    made = [generator.next_trial() for _ in range(3)]
    assert made[0] and made[1] and made[2] is None  # the limit
    assert reconcile_searcher_samples(generator, restored=set()) == 2
    study = generator.searcher.searcher._ot_study
    assert [trial.state.name for trial in study.trials] == ["FAIL", "FAIL"]
    assert generator.next_trial() is not None and generator.get_state()["counter"] == 1


@pytest.mark.parametrize("sampler", ["random", "optuna"])
def test_a_trial_the_resume_ended_again_ends_in_the_sampler(local_ray: None, sampler: str) -> None:
    """A sampler restored from a state older than a trial's end (saved_state.repair ended it again) still waits for
    it: the limit (1) would make no trial again. Told, it frees the slot; Optuna's study has the trial's value."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    if sampler == "random":
        generator = GrowingVariantGenerator(random_state=0, max_concurrent=1)
    else:
        generator = GrowingSearchGenerator(ConcurrencyLimiter(OptunaSearch(seed=0), max_concurrent=1))
        generator.set_search_properties("score", "max", SPACE)
    tune.register_trainable("report_epochs", report_epochs)
    generator.add_configurations({"run": {"run": "report_epochs", "config": SPACE, "num_samples": 3}})
    first = generator.next_trial()
    assert first is not None and generator.next_trial() is None  # the limit waits for the first
    assert end_in_sampler(generator, {first.trial_id: {"score": 7.5, "training_iteration": 2, "done": True}})
    assert generator.next_trial() is not None
    if sampler == "optuna":
        (told, _) = generator.searcher.searcher._ot_study.trials
        assert (told.state.name, told.value) == ("COMPLETE", 7.5)
    assert end_in_sampler(generator, {"never_made": {"score": 1.0}}) == ([] if sampler == "optuna" else ["never_made"])


def test_a_restored_trial_its_study_lacks_joins_it_with_its_config(local_ray: None) -> None:
    """The study and the limit restored from an older save than the trials': Tune tells a result of a trial neither
    knows (which raised a KeyError in OptunaSearch). It joins the study with its config and its value at each epoch,
    the limit counts it running until it ends, and the study's next trials are the sampler's own."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    generator = GrowingSearchGenerator(ConcurrencyLimiter(OptunaSearch(seed=0), max_concurrent=2))
    generator.set_search_properties("score", "max", SPACE)
    tune.register_trainable("report_epochs", report_epochs)
    generator.add_configurations({"run": {"run": "report_epochs", "config": SPACE, "num_samples": 4}})
    limit, study = generator.searcher, generator.searcher.searcher._ot_study
    for epoch in (1, 2):
        generator.on_trial_result(
            "restored", {"config/x": 0.25, "config/epochs": 2, "score": 0.25 + epoch, "training_iteration": epoch}
        )
    assert limit.live_trials == {"restored"}
    assert generator.next_trial() is not None and generator.next_trial() is None  # the restored one holds a slot
    generator.on_trial_complete("restored", {"config/x": 0.25, "score": 2.25, "training_iteration": 2})
    adopted = study.trials[0]
    assert (adopted.state.name, adopted.params, adopted.value) == ("COMPLETE", {"x": 0.25}, 2.25)
    assert adopted.intermediate_values == {1: 1.25, 2: 2.25}
    assert len(limit.live_trials) == 1 and "restored" not in limit.live_trials  # the sampler's own, still running
    assert generator.next_trial() is not None  # its slot is free
    # one that failed before any result, known to the limit only: it frees its slot, the study never hears of it
    limit.live_trials.add("failed_early")
    limit.num_unfinished_live_trials += 1
    generator.on_trial_complete("failed_early", {}, error=True)
    assert "failed_early" not in limit.live_trials and len(study.trials) == 3


def test_a_lost_trial_the_limit_counts_and_the_study_lacks_frees_its_slot(local_ray: None) -> None:
    """The limit's state a save newer than the study's: a lost trial it counts as running that the study never had
    frees its slot at the resume (Optuna would raise a KeyError), and the study is left as it was."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    generator = GrowingSearchGenerator(ConcurrencyLimiter(OptunaSearch(seed=0), max_concurrent=1))
    generator.set_search_properties("score", "max", SPACE)
    tune.register_trainable("report_epochs", report_epochs)
    generator.add_configurations({"run": {"run": "report_epochs", "config": SPACE, "num_samples": 3}})
    generator.searcher.live_trials.add("lost")
    generator.searcher.num_unfinished_live_trials += 1
    assert generator.next_trial() is None  # the limit waits for it
    reconcile_searcher_samples(generator, restored=set())
    assert generator.searcher.live_trials == set() and generator.searcher.searcher._ot_study.trials == []
    assert generator.next_trial() is not None
