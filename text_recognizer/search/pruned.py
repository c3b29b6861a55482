"""Runs in the driver: `asha_stops_as: pruned`, Optuna told the truth about the trials ASHA stopped.

Ray's OptunaSearch tells the study that a trial ASHA stopped at epoch 1 is COMPLETE, its epoch-1 value as if it
were final (`on_trial_complete` in ray/tune/search/optuna/optuna_search.py): TPE then ranks it with the trials that
ran max_t epochs. Optuna has its own handling of stopped trials: PRUNED, ranked by the step they reached, then by
their value there. Here such a trial gets its last value as the intermediate value of its last epoch (Tune hands
that result to on_trial_complete only, never to on_trial_result) and ends PRUNED. Whether it finds better models
is for `benchmarks/quality.py --compare pruned` to say (docs/benchmarks.md); the default stays complete.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from text_recognizer.search.warm import WarmOptunaSearch


class PrunedStops:
    """The on_trial_complete of an OptunaSearch that tells a trial stopped before `max_t` epochs as PRUNED."""

    _max_t: int

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        import optuna

        value = (result or {}).get(self.metric)
        epoch = int((result or {}).get("training_iteration", self._max_t))
        stopped = not error and epoch < self._max_t and isinstance(value, (int, float)) and math.isfinite(value)
        if not stopped or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        trial = self._ot_trials[trial_id]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a step reported already: Optuna keeps the first, the same
            trial.report(float(value), epoch)
        self._ot_study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        self._completed_trials.add(trial_id)


class PrunedOptunaSearch(PrunedStops, OptunaSearch):
    def __init__(self, *args: Any, max_t: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_t = max_t


class PrunedWarmOptunaSearch(PrunedStops, WarmOptunaSearch):
    def __init__(self, *args: Any, max_t: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_t = max_t
