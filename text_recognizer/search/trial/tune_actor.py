"""Runs in Tune's trial actors: the trainables that Tune calls, one call per trial, resuming from Tune's checkpoint.

- `train_in_actor` (the default): the trial trains right here, in the reused actor, on the dataset that Ray's
  object store hands over without a copy.
- `train_in_fork` (`--trial-process fork`): the trial trains in a fork of the node's fork server, which
  imported torch and Lightning once and holds the dataset once; this actor relays each epoch to Tune.

Imports Ray (with its pyarrow) and the standard library only, so that a fork-mode actor never loads torch.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import ray
from ray import tune

from text_recognizer.search.trial import forkserver, resume

# what the fork server runs, by name, and imports once before it forks (torch, Lightning, the package)
FORK_TARGET = "text_recognizer.search.trial.trial_process:run_in_fork"


@contextmanager
def restored_checkpoint() -> Iterator[tuple[str | None, Callable[[dict[str, Any], str | None], None]]]:
    """The model file this trial resumes from (None: a fresh trial, or none of its checkpoints is readable), and
    the function that hands its epochs to Tune."""
    with resume.resumable(tune.get_checkpoint()) as (checkpoint, warning, skipped):
        yield checkpoint, reporter(warning, skipped)


def trial_settings(checkpoint: str | None, started: float) -> dict[str, Any]:
    """What the training needs to know of this actor: its checkpoint, CPUs (as threads) and GPUs, and where it
    runs (its node and resources, which every report records)."""
    resources = tune.get_context().get_trial_resources().required_resources
    cpus = resources.get("CPU", 1)
    # Ray set CUDA_VISIBLE_DEVICES to these GPUs in this process's environment
    return {
        "checkpoint": checkpoint,
        "threads": max(1, int(cpus)),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "started": started,
        "where": {"node_id": ray.get_runtime_context().get_node_id(), "cpus": cpus, "gpus": resources.get("GPU", 0.0)},
    }


def reporter(warning: str | None, skipped: Sequence[str] = ()) -> Callable[[dict[str, Any], str | None], None]:
    """report(metrics, checkpoint folder or None): hand one epoch to Tune; blocks until Tune took it (when ASHA stops the
    trial, Tune ends this thread there). The epoch is Tune's training_iteration, also after a fall back to an older
    checkpoint than Tune's newest (Tune would count on from the newest); the first epoch carries the warning."""
    notes = {resume.WARNING_KEY: warning, resume.SKIPPED_KEY: list(skipped)} if warning else {}

    def report(metrics: dict[str, Any], directory: str | None) -> None:
        try:
            result = {**metrics, "training_iteration": metrics["epoch"], **notes}
            notes.clear()
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(directory) if directory else None)
        finally:
            if directory:
                shutil.rmtree(directory, ignore_errors=True)

    return report


def trainable_class(function: Callable[..., None], **parameters: Any) -> type:
    """Tune's trainable for `function` with its large `parameters` in the object store (tune.with_parameters),
    whose actor, reused for the next trial, says why it could not be: Tune's own failure names no cause ("Trainable
    runner reuse requires reset_config() to be implemented and return True"), and the next trial ends in error."""
    from ray.tune.trainable.function_trainable import wrap_function

    base = wrap_function(tune.with_parameters(function, **parameters))  # the class Tune would make of it

    class Trainable(base):
        def reset_config(self, new_config: dict[str, Any]) -> bool:
            if super().reset_config(new_config):
                return True
            from ray.train._internal.session import get_session

            waited = os.environ.get("TUNE_FUNCTION_THREAD_TIMEOUT_S", "2")  # how long Tune's reset waited
            print(
                f"warning: the last trial's thread in this actor had not ended {waited} s after Tune stopped it, so"
                f" trial {self.trial_id} can't reuse the actor; the thread is at:\n{thread_stack(get_session().training_thread)}",
                file=sys.stderr,
                flush=True,
            )
            return False

    Trainable.__name__ = Trainable.__qualname__ = function.__name__  # Tune names the trainable by its _name, kept
    return Trainable


def thread_stack(thread: threading.Thread) -> str:
    """Where a running thread is, as a traceback prints it."""
    frame = sys._current_frames().get(thread.ident or 0)
    return "".join(traceback.format_stack(frame)) if frame else "(the thread has ended)\n"


def train_in_actor(config: dict[str, Any], arrays: dict[str, Any] | None = None) -> None:
    """Tune function trainable: the trial trains in this actor."""
    started = time.time()
    # torch and Lightning: once per actor, which Tune reuses for the next trial
    from text_recognizer.search.trial import trial_process

    try:
        with restored_checkpoint() as (checkpoint, report):
            trial_process.train_trial(config, arrays, report, **trial_settings(checkpoint, started))
    finally:
        trial_process.release_memory()


def train_in_fork(config: dict[str, Any], arrays: dict[str, Any] | None = None, data_key: str = "") -> None:
    """Tune function trainable: the trial trains in a fork of this node's fork server; epochs come back here.

    The trial process waits for Tune to take an epoch before it trains the next (ASHA decides in between).
    """
    started = time.time()
    with restored_checkpoint() as (checkpoint, report):
        request = {
            "target": FORK_TARGET,
            "data_key": data_key,
            "env": dict(os.environ),  # CUDA_VISIBLE_DEVICES from Ray, W&B settings, ...
            "cwd": os.getcwd(),
            "actor_pid": os.getpid(),
            "config": config,
            "trial": trial_settings(checkpoint, started),
        }
        node_id = ray.get_runtime_context().get_node_id()
        # the raylet started this worker: the server lives as long as the node does
        with forkserver.start_trial(request, node_id, os.getppid(), arrays) as trial:
            for message in trial:
                report(message["metrics"], message["checkpoint"])  # leaving the `with` early kills the trial process
                trial.go_on()
    sys.stdout.flush()
