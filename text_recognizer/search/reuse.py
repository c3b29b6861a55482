"""Runs in the driver, around Tune's fit: a trial whose reused actor fails as it is handed over is retried, not failed.

With `reuse_actors`, Tune hands an ended trial's actor to the next trial by a `reset` task, while that trial is still
PENDING. Ray 2.60's TuneController retries a failed trial (FailureConfig.max_failures) only when it is RUNNING, so a
failure of that task ends the trial in `error`, for good, although it never started:
- the actor died as it was reset (seen in the chaos benchmark, 3 of 5 fork-mode runs: a worker SIGKILLed just as its
  trial ended; error.txt has the one death twice);
- the actor refused the trial (our trainable's reset returns False when the last trial's thread did not stop in
  time: "Trainable runner reuse requires reset_config() to be implemented and return True", seen at load 15-30).

Tune already handles the same failure of a new actor (`_actor_failed`): it marks the trial RUNNING, unstages it and
fails it as a running trial, which Tune retries on a fresh actor. `RetryingController` leaves a dead actor's trial
to it, and handles a refusal the same way.
Tune has no public hook for it: this subclass overrides two private methods, and `retrying_resets` makes tune.run
build it (tests/test_reuse.py checks both on real Tune, so a Ray release that moves them fails there, loudly).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray.tune.tune as tune_module
from ray.exceptions import RayActorError
from ray.tune.error import _AbortTrialExecution
from ray.tune.execution.tune_controller import TuneController
from ray.tune.experiment import Trial

REFUSED = "the reused actor refused the trial (reset_config returned False): it gets a new actor"


class RetryingController(TuneController):
    def _handed_over(self, trial: Trial) -> bool:
        """The trial is being handed a reused actor (its reset task is out); it is still PENDING."""
        return trial in self._resetting_trials and trial.status == Trial.PENDING

    def _trial_task_failure(self, trial: Trial, exception: Exception) -> None:
        if self._handed_over(trial) and isinstance(exception, RayActorError):
            # the actor died as it was reset: Tune's _actor_failed, which follows for the dead actor, retries the
            # PENDING trial; failing it here first ends it in error. Out of the resetting set, or it never restarts.
            self._resetting_trials.discard(trial)
            return
        super()._trial_task_failure(trial, exception)

    def _on_trial_reset(self, trial: Trial, success: bool) -> None:
        if not success and self._handed_over(trial):
            # the actor refused the trial and lives on: fail the trial as running, as _actor_failed would
            self._resetting_trials.discard(trial)
            self._set_trial_status(trial, Trial.RUNNING)
            self._unstage_trial_with_resources(trial)
            self._process_trial_failure(trial, exception=_AbortTrialExecution(REFUSED))
            return
        super()._on_trial_reset(trial, success)


@contextmanager
def retrying_resets() -> Iterator[None]:
    """tune.run (which Tuner.fit calls) builds a RetryingController while inside."""
    for name in ("_on_trial_reset", "_trial_task_failure", "_process_trial_failure", "_unstage_trial_with_resources"):
        if not hasattr(TuneController, name):
            raise RuntimeError(f"this Ray release's TuneController has no {name}: update text_recognizer/search/reuse.py")
    previous: Any = tune_module.TuneController
    tune_module.TuneController = RetryingController
    try:
        yield
    finally:
        tune_module.TuneController = previous
