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
A warm actor no longer takes the trial of an actor that is still starting. Tune hands a cached actor (one whose trial
just ended) to the trial it runs next, and when that trial's own new actor is still starting, Tune removes it
(`_maybe_reuse_cached_actor`). With trials shorter than an actor's start, the new actor never starts: the next trial
gets another new actor, which the warm one's next end removes in turn. Seen in the long chaos run after a node was
replaced: one trial at a time on two slots, and a worker process spawned and killed every second or two (load 8 on 2
cores). Here the cached actor goes to a pending trial that has no actor yet, and the starting one is left to start.

Tune has no public hook for either: this subclass overrides three private methods, and `retrying_resets` makes
tune.run build it (tests/test_reuse.py checks each on real Tune, so a Ray release that moves them fails there, loudly).
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

    def _maybe_reuse_cached_actor(self, trial: Trial) -> bool:
        if self._initializing(trial) and self._actor_cache.has_cached_object(trial.placement_group_factory):
            waiting = self._waiting_for_resources(trial.placement_group_factory)
            if waiting is not None:  # it takes the cached actor; this trial keeps its own, almost started
                super()._maybe_reuse_cached_actor(waiting)  # which drops the request for resources it had
                if waiting not in self._staged_trials:  # as Tune stages a trial it hands a cached actor
                    self._staged_trials.add(waiting)
                    self._actor_cache.increase_max(waiting.placement_group_factory)
                return False
        return super()._maybe_reuse_cached_actor(trial)

    def _has_resources(self, trial: Trial) -> bool:
        """The trial's own new actor has its resources: Ray is creating it, or it runs (Tune calls both started)."""
        own = self._trial_to_actor.get(trial)
        return own is not None and self._actor_manager.is_actor_started(own)

    def _initializing(self, trial: Trial) -> bool:
        """The trial's own new actor has its resources and is still in its __init__: Tune has not marked it RUNNING."""
        return trial.status == Trial.PENDING and trial not in self._resetting_trials and self._has_resources(trial)

    def _waiting_for_resources(self, resources: Any) -> Trial | None:
        """The first pending trial that asks for `resources` and whose actor has none yet (or that has no actor)."""
        for trial in self._trials:  # every trial, in the order made (Tune's pending set has none)
            if (
                trial in self._pending_trials
                and trial not in self._resetting_trials
                and trial.placement_group_factory == resources
                and not self._has_resources(trial)
            ):
                return trial
        return None

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
    for name in (
        "_on_trial_reset",
        "_trial_task_failure",
        "_process_trial_failure",
        "_unstage_trial_with_resources",
        "_maybe_reuse_cached_actor",
    ):
        if not hasattr(TuneController, name):
            raise RuntimeError(f"this Ray release's TuneController has no {name}: update text_recognizer/search/reuse.py")
    previous: Any = tune_module.TuneController
    tune_module.TuneController = RetryingController
    try:
        yield
    finally:
        tune_module.TuneController = previous
