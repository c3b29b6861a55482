"""Runs in the driver: SIGTERM, with which Kubernetes and Slurm stop a job (and kill it a grace period later), ends
a search the way Ctrl-C does.

ray.init replaces Python's SIGTERM handling in the driver with Ray's own handler, which kills the local Ray
processes and exits at once: no state saved, no W&B run finished, no resume command. While Ray is up for a search,
`Preemption.catching()` takes SIGTERM instead and hands it to Tune's own graceful stop, the SIGUSR1 that tune.run
listens to just as it does to Ctrl-C: Tune saves the experiment state and stops the trials; the driver then
finishes the open W&B runs as `interrupted`, writes the summary with the resume command, and the process exits
with status 143 (128 + SIGTERM). A second SIGTERM gets Ray's handler: stop now.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ray import tune

# what a shell reports for a process that SIGTERM (a preemption) or Ctrl-C (SIGINT) ended: an interrupted search's status
EXIT_STATUS = 128 + signal.SIGTERM
CTRL_C_STATUS = 128 + signal.SIGINT


class Preemption(tune.Callback):
    """Records a SIGTERM and, at the end of Tune's next step, asks Tune to stop.

    Tune is asked from a step's end, not from the signal handler: a SIGTERM that came before the fit began (or
    before its first step) still stops it, once at least one trial exists for `--resume` to find."""

    def __init__(self) -> None:
        self.received = False
        self.asked = False

    @contextmanager
    def catching(self) -> Iterator[Preemption]:
        """SIGTERM is this object's while inside (enter after ray.init, which installs Ray's handler); then Ray's again."""
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: Any) -> None:
            self.received = True
            signal.signal(signal.SIGTERM, previous)  # a second SIGTERM: Ray's handler, which stops everything now

        signal.signal(signal.SIGTERM, on_sigterm)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)

    def setup(self, **info: Any) -> None:
        self.asked = False  # a new fit (this object may serve more than one)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.received and not self.asked and trials and callable(signal.getsignal(signal.SIGUSR1)):
            self.asked = True
            signal.raise_signal(signal.SIGUSR1)  # tune.run's handler: save the state and stop, as on Ctrl-C
