"""A trial handed a reused actor that dies or refuses it is retried on a new actor, not failed for good: real Tune on
a local Ray of 1 CPU, so each trial after the first is given the last one's actor (reuse_actors)."""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
from ray import tune

from text_recognizer.search.reuse import retrying_resets


def two_steps() -> type:
    """Made here, so that Ray pickles it by value: a trainable of two steps that keeps no checkpoint."""

    class TwoSteps(tune.Trainable):
        def setup(self, config: dict) -> None:
            self.steps = 0

        def step(self) -> dict:
            self.steps += 1
            return {"score": self.config["x"], "pid": os.getpid(), "done": self.steps >= 2}

        def reset_config(self, new_config: dict) -> bool:
            self.steps = 0
            return True

        def save_checkpoint(self, checkpoint_dir: str) -> None:
            return None

        def load_checkpoint(self, checkpoint: object) -> None:
            pass

    return TwoSteps


def trainable(marker: Path, how: str) -> type:
    """Its first reset (the second trial's) finds `marker`, removes it, and then the actor dies (`how` == "dies") or
    refuses the trial, as ours does when the last trial's thread hangs."""

    class FailsItsReset(two_steps()):
        def reset_config(self, new_config: dict) -> bool:
            if marker.exists():
                marker.unlink()
                if how == "dies":
                    os._exit(1)
                return False
            return super().reset_config(new_config)

    return FailsItsReset


def errored_after(tmp_path: Path, how: str, retrying: bool) -> list:
    marker = tmp_path / "marker"
    marker.touch()
    tuner = tune.Tuner(
        trainable(marker, how),
        param_space={"x": tune.grid_search([1, 2, 3])},
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(
            storage_path=str(tmp_path), name="reuse", verbose=0, failure_config=tune.FailureConfig(max_failures=2)
        ),
    )
    with retrying_resets() if retrying else nullcontext():
        results = tuner.fit()
    assert not marker.exists()  # the second trial's reset did meet it
    assert sorted(result.metrics.get("score") for result in results if result.error is None) == (
        [1, 2, 3] if retrying else [1, 3]
    )
    return [result for result in results if result.error is not None]


@pytest.mark.parametrize("how", ["dies", "refuses"])
def test_a_trial_whose_reused_actor_fails_it_is_retried_on_a_new_one(local_ray: None, tmp_path: Path, how: str) -> None:
    assert errored_after(tmp_path, how, retrying=True) == []


@pytest.mark.parametrize("how", ["dies", "refuses"])
def test_tune_alone_fails_that_trial_for_good(local_ray: None, tmp_path: Path, how: str) -> None:
    """What reuse.py is for: when this fails, a Ray release retries such trials itself, and reuse.py can go."""
    (errored,) = errored_after(tmp_path, how, retrying=False)
    assert errored.metrics.get("score") is None  # it never ran a step, and max_failures=2 did not retry it


def slow_to_start(starts: Path) -> type:
    """Every actor but the first takes 3 s to start; a step takes 0.1 s. Each start (setup) appends the actor's pid
    to `starts`."""

    class SlowToStart(two_steps()):
        def setup(self, config: dict) -> None:
            first = not starts.exists()
            with starts.open("a") as file:
                file.write(f"{os.getpid()}\n")
            if not first:
                time.sleep(3.0)
            super().setup(config)

        def step(self) -> dict:
            time.sleep(0.1)
            return super().step()

    return SlowToStart


def actors_of(tmp_path: Path, retrying: bool) -> tuple[int, set[int]]:
    """A search of 30 short trials on two slots (0.5 CPU each); the actors started, and the pids that trained."""
    starts = tmp_path / "starts"
    tuner = tune.Tuner(
        tune.with_resources(slow_to_start(starts), {"cpu": 0.5}),
        param_space={"x": tune.grid_search(list(range(30)))},
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="slow", verbose=0),
    )
    with retrying_resets() if retrying else nullcontext():
        results = tuner.fit()
    assert not results.errors
    return len(starts.read_text().split()), {result.metrics["pid"] for result in results}


def test_a_starting_actor_is_not_removed_for_a_warm_one(local_ray: None, tmp_path: Path) -> None:
    """The second slot's actor starts once and trains trials beside the first, though each trial ends long before it
    has started: the warm actor takes the next trial without one, not the starting actor's."""
    started, trained_in = actors_of(tmp_path, retrying=True)
    assert len(trained_in) == 2 and started <= 3, (started, trained_in)


def test_tune_alone_removes_it_again_and_again(local_ray: None, tmp_path: Path) -> None:
    """What the fix is for: when this fails, a Ray release keeps starting actors itself, and that part can go."""
    started, trained_in = actors_of(tmp_path, retrying=False)
    assert len(trained_in) == 1, (started, trained_in)  # the second slot's actors removed as they start, every one
