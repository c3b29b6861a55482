"""Runs in the driver: a search as a W&B sweep, so W&B's Sweeps page (parallel coordinates, parameter importance,
scatter plots) shows it.

Online, the search creates the sweep before its trials start, every trial run is started with the sweep's id
in its settings (never WANDB_SWEEP_ID in the environment: with it wandb.init drops the project, entity and run id
it was given), and the sweep is stopped at the end (no agent ever polls it). Offline runs carry no sweep id
(syncing a run that names a sweep the server doesn't know fails); `sync FOLDER` uploads them and then creates the
sweep from them (`prior_runs`).

The calls that need a W&B server are create_sweep and stop_sweep, one small function each. They were checked
against the installed wandb 0.31 SDK's source (wandb.sweep(sweep, entity, project, prior_runs) and the CLI's
`wandb sweep --stop`), not against a server: none can be reached from where this was built. The sweep configs
themselves are checked by W&B's own sweep engine, the `sweeps` package (its config schema knows wandb 0.31's keys:
log_uniform_values, int_uniform, bayes), in tests/test_sweep.py.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from text_recognizer.search.config import SearchConfig
from text_recognizer.search.tracking.wandb_files import offline_runs
from text_recognizer.util import UserError

# W&B's name for each search_alg: Optuna's TPE is a Bayesian optimisation, which W&B calls "bayes"
METHODS = {"random": "random", "optuna": "bayes"}


def parameter(kind: str, value: Any) -> dict[str, Any]:
    """One search-space entry (our YAML sampler) as a W&B sweep parameter."""
    if kind in ("choice", "grid"):
        return {"values": list(value)}
    low, high = value
    if kind == "randint":
        return {"distribution": "int_uniform", "min": int(low), "max": int(high) - 1}  # ours excludes high, W&B's not
    if kind == "loguniform":
        return {"distribution": "log_uniform_values", "min": low, "max": high}
    return {"distribution": "uniform", "min": low, "max": high}


def sweep_config(name: str, config: SearchConfig) -> dict[str, Any]:
    """The sweep of a search: its name, method, metric and goal, and parameters named as the trial runs' config keys
    (run flags: the searched ones with their distributions, the fixed ones and max_epochs as constants)."""
    grid_only = all(kind == "grid" for spec in config.space.values() for kind in spec)
    parameters = {key: parameter(*next(iter(spec.items()))) for key, spec in config.space.items()}
    constants = {**config.fixed, "max_epochs": config.max_t}
    parameters.update({key: {"value": value} for key, value in constants.items() if key not in parameters})
    return {
        "name": name,
        "method": "grid" if grid_only else METHODS[config.search_alg],
        "metric": {"name": config.metric, "goal": "maximize" if config.mode == "max" else "minimize"},
        "parameters": parameters,
        "description": config.description or f"Ray Tune search {name} (ASHA), logged by text_recognizer",
    }


def create_sweep(config: dict[str, Any], project: str, prior_runs: list[str] | None = None) -> str:
    """Needs the W&B server: create the sweep (with runs that already exist), return its id. wandb prints its URL."""
    import wandb

    return wandb.sweep(config, project=project, prior_runs=prior_runs)


def stop_sweep(sweep_id: str, project: str) -> None:
    """Needs the W&B server: mark the sweep finished, as `wandb sweep --stop` does (no agent will ask it for runs).
    A failure is a one-line warning: the search's results are written by then, and the sweep only shows `running`."""
    command = ["wandb", "sweep", "--stop", "--project", project, sweep_id]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:
        done = subprocess.CompletedProcess(command, 1, "", str(error))
    if done.returncode != 0:
        why = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}").splitlines()[-1]
        print(f"warning: W&B sweep {sweep_id} was not stopped ({why}): stop it with {shlex.join(command)}", file=sys.stderr)


def run_folders(folder: Path) -> list[Path]:
    """A search's offline run folders: one per run (a killed driver's older ones wait in wandb/superseded/)."""
    return sorted((folder / "wandb").glob("offline-run-*"))


def prior_run_ids(folder: Path) -> list[str]:
    """The W&B run ids of a search's trial runs, as their .wandb files record them (the summary run is no trial)."""
    return sorted(run.id for run in offline_runs(folder) if run.job_type == "trial")


def wandb_sync_argv(folder: Path) -> list[str]:
    """The `wandb sync` command line that uploads a search's offline runs (trials and summary run)."""
    return ["wandb", "sync", *[str(path) for path in run_folders(folder)]]


def sync(folder: Path, name: str, config: SearchConfig, project: str) -> str:
    """Upload a search's offline runs, then create its sweep from them; returns the sweep id. UserError, in one line,
    when the upload fails (wandb sync has printed why just above)."""
    command = wandb_sync_argv(folder)
    print("$", shlex.join(command), flush=True)
    try:
        status = subprocess.run(command).returncode
    except OSError as error:
        raise UserError(f"cannot run wandb sync ({error}): is the wandb CLI installed?") from None
    if status != 0:
        raise UserError(f"wandb sync failed (exit status {status}): no sweep was created; fix the above and run sync again")
    return create_sweep(sweep_config(name, config), project, prior_runs=prior_run_ids(folder))
