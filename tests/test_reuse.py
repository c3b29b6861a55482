"""A trial handed a reused actor that dies or refuses it is retried on a new actor, not failed for good: real Tune on
a local Ray of 1 CPU, so each trial after the first is given the last one's actor (reuse_actors)."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import pytest
from ray import tune

from text_recognizer.search.reuse import retrying_resets


def trainable(marker: Path, how: str) -> type:
    """Made here, so that Ray pickles it by value. Its first reset (the second trial's) finds `marker`, removes it,
    and then the actor dies (`how` == "dies") or refuses the trial, as ours does when the last trial's thread hangs."""

    class TwoSteps(tune.Trainable):
        def setup(self, config: dict) -> None:
            self.steps = 0

        def step(self) -> dict:
            self.steps += 1
            return {"score": self.config["x"], "done": self.steps >= 2}

        def reset_config(self, new_config: dict) -> bool:
            if marker.exists():
                marker.unlink()
                if how == "dies":
                    os._exit(1)
                return False
            self.steps = 0
            return True

        def save_checkpoint(self, checkpoint_dir: str) -> None:
            return None

        def load_checkpoint(self, checkpoint: object) -> None:
            pass

    return TwoSteps


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
