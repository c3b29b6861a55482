"""Runs in the driver: what a person watching a search sees, a Tune callback in place of Tune's own tables.

One line per finished trial, and a status line at most every EVERY seconds: trials done / running /
pending, epochs trained, the best metric so far and the trial that holds it, the time elapsed.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

from ray import tune

from text_recognizer.facts import trial_status
from text_recognizer.search.outputs.results import short

EVERY = 10.0  # seconds between status lines: often enough to see it move, rarely enough to read


class Progress(tune.Callback):
    """Our console output: a line per trial that ends (its status, epochs, metric and config) and, every EVERY
    seconds, one status line (trials done/running/pending, the best so far).

    Why not Tune's CLIReporter: it reprints a table of every trial at each update, a screen per update of a
    50-trial search, and names no trial's outcome as summary.json does (stopped_early, diverged, ...)."""

    def __init__(
        self, metric: str, mode: str, max_t: int, params: list[str], file: TextIO = sys.stdout, every: float = EVERY
    ) -> None:
        self.metric, self.sign, self.max_t, self.params, self.file = metric, (1 if mode == "max" else -1), max_t, params, file
        self.every = every
        self.started = time.time()
        self.last_line = 0.0
        self.epochs: dict[str, int] = {}
        self.best: tuple[float, str] | None = None

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.epochs[trial.trial_id] = result.get("training_iteration", 0)
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value) and not result.get("diverged"):
            if self.best is None or self.sign * value > self.sign * self.best[0]:
                self.best = (value, trial.trial_id)

    def _finished(self, trial: Any, error: bool) -> None:
        last = {**(trial.last_result or {}), "done": True}
        status = trial_status(last, self.max_t, error=error)
        value = last.get(self.metric)
        shown = f"{self.metric} {value:.4f}" if isinstance(value, (int, float)) else f"{self.metric} -"
        config = " ".join(f"{key}={short(trial.config.get(key))}" for key in self.params)
        epochs = last.get("training_iteration", 0)
        line = f"trial {trial.trial_id} {status:<13} {epochs:>3} epochs  {shown}  {config}"
        print(f"{self._clock()} {line}", file=self.file, flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finished(trial, error=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finished(trial, error=True)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.time()
        if now - self.last_line < self.every:
            return
        self.last_line = now
        counts = {"done": 0, "running": 0, "pending": 0}
        for trial in trials:
            kind = {"TERMINATED": "done", "ERROR": "done", "RUNNING": "running"}.get(trial.status, "pending")
            counts[kind] += 1
        best = f"best {self.metric} {self.best[0]:.4f} ({self.best[1]})" if self.best else f"best {self.metric} -"
        line = f"{counts['done']} done, {counts['running']} running, {counts['pending']} pending | "
        print(f"{self._clock()} {line}{sum(self.epochs.values())} epochs | {best}", file=self.file, flush=True)

    def _clock(self) -> str:
        return f"[{time.time() - self.started:6.0f} s]"
