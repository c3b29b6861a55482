"""Runs in the driver: --warm-start FOLDER, a new Optuna search whose study begins with an earlier search's trials.

The earlier search's finished trials (completed, or stopped early by ASHA: Tune tells Optuna both as complete, with
their last value) become trials of the new study, each with its value and its intermediate values (one per epoch,
at the epoch as step, as OptunaSearch reports them), made with optuna.trial.create_trial. A trial whose params fall
outside the new space (a value no longer offered, a range narrowed, a parameter added) is left out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from text_recognizer.facts import SUMMARY_FILE, TRIAL_PREFIX, TrialStatus
from text_recognizer.search.outputs.results import finite

# what Tune told Optuna was complete (ASHA's stops included): its trials with their values
FINISHED = frozenset({TrialStatus.COMPLETED, TrialStatus.STOPPED_EARLY})


def earlier_trials(folder: Path, metric: str) -> list[dict[str, Any]]:
    """The finished trials of the search in `folder`: config, last value of `metric`, and its value at each epoch."""
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    trials = []
    for row in summary["trials"]:
        if row["status"] not in FINISHED or finite(row.get(metric)) is None:
            continue
        path = folder / f"{TRIAL_PREFIX}{row['trial_id']}" / "result.json"
        steps: dict[int, float] = {}
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                result = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed driver
                continue
            if finite(result.get(metric)) is not None:
                steps[int(result["training_iteration"])] = float(result[metric])
        trials.append({"config": row["config"], "value": float(row[metric]), "intermediate": steps})
    return trials


def inside(config: dict[str, Any], space: dict[str, Any]) -> dict[str, Any] | None:
    """The config's values of the space's parameters when every one is there and inside its distribution, else None."""
    params = {}
    for key, distribution in space.items():
        if key not in config:
            return None
        try:
            if not distribution._contains(distribution.to_internal_repr(config[key])):
                return None
        except (ValueError, TypeError):  # a categorical value the new space does not offer
            return None
        params[key] = config[key]
    return params


class WarmOptunaSearch(OptunaSearch):
    """OptunaSearch whose study starts with an earlier search's finished trials, added once the space is known."""

    def __init__(self, *args: Any, warm: list[dict[str, Any]] = (), source: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._warm, self._warm_source = list(warm), source

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        if not super().set_search_properties(metric, mode, config, **spec):
            return False
        import optuna

        added = 0
        for trial in self._warm:
            params = inside(trial["config"], self._space)
            if params is None:
                continue
            self._ot_study.add_trial(
                optuna.trial.create_trial(
                    params=params, distributions=self._space, value=trial["value"], intermediate_values=trial["intermediate"]
                )
            )
            added += 1
        left_out = len(self._warm) - added
        print(
            f"--warm-start: {added} trials of {self._warm_source} seed the study; {left_out} left out (outside this "
            "search's space)",
            flush=True,
        )
        self._warm = []  # once: a restored search has them in its study already
        return True
