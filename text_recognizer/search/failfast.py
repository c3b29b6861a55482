"""Runs in the driver: a search that can't train says so, in one line, and exits 1.

- `FailFast` (a Tune callback): when the first trials of a search (FIRST, or all of a smaller search) end in error
  before any trial delivered an epoch, every trial would fail the same way (a run flag the model can't build, a
  cluster whose processes can't reach the driver): the search stops there instead of running them all.
- `check_some_trained`: a search in which every trial ended in error is no result, even if each trained a while.

Either way the search ends with `SearchCannotTrain`: the first trial's cause, one line (the last `...Error: ...`
line of Tune's error.txt, not its traceback, which stays in that file), and exit status 1. Tune's own tracebacks
of failed trials are not printed (TUNE_PRINT_ALL_TRIAL_ERRORS=0, set by the driver unless --verbose): each failed
trial gets one line here instead, naming its error.txt.
"""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path
from typing import Any

from ray import tune

FIRST = 2  # trials that failed before any epoch anywhere: the search stops
EXIT_STATUS = 1  # distinct from bad input (2), Ctrl-C (130) and SIGTERM (143)
ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt))\b:?")


class SearchCannotTrain(Exception):
    """The search stopped (or ended) with no trial that trained: printed as one line, exit status 1."""


def cause(error_text: str) -> str:
    """One line of a trial's error.txt: its last `SomeError: message` line (the innermost cause Ray's traceback
    ends with), else its first line; at most 300 characters."""
    lines = [line.strip() for line in error_text.splitlines() if line.strip() and not line.startswith("Failure # ")]
    if not lines:
        return "no error recorded"
    errors = [line for line in lines if ERROR_LINE.match(line)]
    return (errors[-1] if errors else lines[0])[:300]


def error_text(path: Path | str | None) -> str:
    try:
        return Path(path).read_text() if path else ""
    except OSError:
        return ""


def trial_cause(trial: Any) -> str:
    return cause(error_text(getattr(trial, "error_file", None)))


class FailFast(tune.Callback):
    """One line per failed trial; stops the search when its first `first` trials failed before any epoch.

    It asks Tune to stop as Ctrl-C does (SIGUSR1, tune.run's own graceful stop, at the end of the step: Tune saves
    the state and fit returns), and `check` raises SearchCannotTrain after the fit. Not by raising here: Tune wraps
    an exception from a callback in a TuneError holding the whole traceback, which reached the user as one."""

    def __init__(self, first: int) -> None:
        self.first = max(1, first)
        self.trained = False
        self.failed: list[tuple[str, str]] = []  # (trial id, cause) of trials ended in error, in order
        self.reason: str | None = None  # why the search stops, once it must
        self.asked = False

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        """A resumed search whose trials trained before is past its first trials: later errors don't stop it (seen
        in the chaos benchmark: a driver resumed into storage made read-only stopped the search with exit 1)."""
        if not self.trained:
            self.trained = any(trial.run_metadata.last_result.get("training_iteration") for trial in trials)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.trained = True

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        why = trial_cause(trial)
        self.failed.append((trial.trial_id, why))
        print(f"trial {trial.trial_id} failed: {why} (traceback: {trial.error_file})", file=sys.stderr, flush=True)
        if not self.trained and len(self.failed) >= self.first and self.reason is None:
            trial_id, first_cause = self.failed[0]
            self.reason = (
                f"the search stopped: its first {len(self.failed)} trials failed before any epoch; "
                f"trial {trial_id}: {first_cause}"
            )

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.reason and not self.asked and callable(signal.getsignal(signal.SIGUSR1)):
            self.asked = True
            signal.raise_signal(signal.SIGUSR1)  # tune.run's handler: save the state and stop, as on Ctrl-C

    def check(self) -> None:
        """After the fit: SearchCannotTrain if this callback stopped the search."""
        if self.reason:
            raise SearchCannotTrain(self.reason)


def check_some_trained(summary: dict[str, Any]) -> None:
    """SearchCannotTrain when every trial of a finished (not interrupted) search ended in error."""
    rows = summary.get("trials") or []
    if summary.get("interrupted") or not rows or any(row["status"] != "error" for row in rows):
        return
    first = rows[0]
    why = cause(error_text(first.get("error")))
    raise SearchCannotTrain(f"every trial failed ({len(rows)}); trial {first['trial_id']}: {why}")
