"""The Tune trial, as Tune's actor sees it: no torch here; the training runs in a fork of the node's server.

Tune imports this module in every trial actor, so it imports Ray and the standard library only.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import nullcontext
from typing import Any

from text_recognizer.search import forkserver

CHECKPOINT_NAME = "model.ckpt"


def config_to_argv(config: dict[str, Any]) -> list[str]:
    """A trial config (run flag -> value) as command-line flags."""
    argv = []
    for key, value in config.items():
        if isinstance(value, bool):
            argv += [f"--{key}"] if value else []
        elif value is not None:
            argv.append(f"--{key}={value}")
    return argv


def train_trial(config: dict[str, Any], arrays: dict[str, Any] | None = None, data_key: str = "") -> None:
    """Tune function trainable: one training run per trial; resumes from Tune's checkpoint when restarted.

    Each epoch's metrics and checkpoint come from the trial process and go to Tune here, one at a time:
    the trial process waits for Tune to take an epoch before it trains the next (ASHA decides in between).
    """
    import ray
    from ray import tune

    started = time.time()
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    checkpoint = tune.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else nullcontext(None) as directory:
        request = {
            "config": config,
            "data_key": data_key,
            "threads": max(1, int(cpus)),  # as many threads as CPUs given, so trials don't fight over cores
            # Ray set CUDA_VISIBLE_DEVICES to the trial's GPUs in this environment: the trial process gets it
            "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
            "env": dict(os.environ),
            "cwd": os.getcwd(),
            "checkpoint": os.path.join(directory, CHECKPOINT_NAME) if directory else None,
            "started": started,
            "actor_pid": os.getpid(),
        }
        node_id = ray.get_runtime_context().get_node_id()
        # the raylet started this worker: the server lives as long as the node does
        with forkserver.start_trial(request, node_id, os.getppid(), arrays) as trial:
            for message in trial:
                try:
                    # blocks until Tune took the result; Tune ends this thread here (SystemExit) when ASHA
                    # stops the trial, and leaving the `with` kills the trial process
                    tune.report(message["metrics"], checkpoint=tune.Checkpoint.from_directory(message["checkpoint"]))
                finally:
                    shutil.rmtree(message["checkpoint"], ignore_errors=True)
                trial.go_on()
    sys.stdout.flush()
