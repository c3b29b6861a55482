"""What a search leaves behind: summary.json, trials.csv, the W&B summary run, and the final report."""

from __future__ import annotations

import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import pandas as pd
import torch
from ray.tune import Callback

from text_recognizer.search.config import SearchConfig
from text_recognizer.search.trial import CHECKPOINT_NAME

FINAL_METRICS = ("val_acc", "val_loss", "train_acc", "train_loss")
FINAL_STATUSES = ("completed", "stopped_early", "diverged", "error")


class TrialClock(Callback):
    """When each trial could have started: it was queued and a slot was free (search start or a trial ending).

    Tune's on_trial_start fires only once the trial's worker is up and has imported everything, so it
    would hide the start-up cost; a trial's start-up is measured from here to its first training step.
    """

    def __init__(self) -> None:
        self.added: dict[str, float] = {}
        self.slot_freed: list[float] = []
        self.ready: dict[str, float] = {}

    def on_trial_add(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.added.setdefault(trial.trial_id, time.time())

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        now, added = time.time(), self.added.get(trial.trial_id, time.time())
        # the slot this trial took was freed by the latest trial ending before it started, if after it was queued
        freed = [t for t in self.slot_freed if added <= t <= now]
        self.ready.setdefault(trial.trial_id, max([added, *freed[-1:]]))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.slot_freed.append(time.time())

    on_trial_error = on_trial_complete


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def trial_status(status: str, last: dict[str, Any], max_t: int) -> str:
    """A trial's outcome from Tune's status and its last result: completed (ran max_t epochs),
    stopped_early (by ASHA), diverged, error, or Tune's status lower-cased if unfinished."""
    if status == "ERROR":
        return "error"
    if last.get("diverged"):
        return "diverged"
    if status != "TERMINATED":
        return status.lower()
    return "completed" if last.get("training_iteration", 0) >= max_t else "stopped_early"


def collect(search_dir: Path, config: SearchConfig, trial_starts: dict[str, float]) -> tuple[list[dict], dict | None]:
    """One row per trial from Tune's experiment state, and the best trial (best metric at any epoch)."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(search_dir), default_metric=config.metric, default_mode=config.mode)
    frames = analysis.trial_dataframes
    rows, best = [], None
    better = max if config.mode == "max" else min
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        frame = frames.get(trial.trial_id, pd.DataFrame())
        history = [v for v in frame.get(config.metric, []) if _finite(v) is not None]
        last = trial.last_result or {}
        row = {
            "trial_id": trial.trial_id,
            "status": trial_status(trial.status, last, config.max_t),
            "epochs": int(last.get("training_iteration", 0)),
            "config": {k: v for k, v in trial.config.items()},
            **{key: _finite(last.get(key)) for key in FINAL_METRICS},
            f"best_{config.metric}": better(history) if history else None,
            "startup_seconds": None,
            "gpu_ids": last.get("gpu_ids"),
            "cuda_visible_devices": last.get("cuda_visible_devices"),
            "failures": trial.num_failures,
            "error": str(Path(trial.path) / trial.run_metadata.error_filename) if trial.run_metadata.error_filename else None,
        }
        if trial.trial_id in trial_starts and len(frame) and "first_step_at" in frame:
            row["startup_seconds"] = float(frame["first_step_at"].iloc[0]) - trial_starts[trial.trial_id]
        rows.append(row)
        value = row[f"best_{config.metric}"]
        if value is None or row["status"] in ("error", "diverged"):
            continue
        if best is None or better(value, best["value"]) == value and value != best["value"]:
            checkpoint = analysis.get_best_checkpoint(trial, config.metric, config.mode)
            if checkpoint is None:
                continue
            path = str(Path(checkpoint.path) / CHECKPOINT_NAME)
            epoch = torch.load(path, map_location="cpu", weights_only=True)["epoch"] + 1
            at_epoch = frame[frame["training_iteration"] == epoch].iloc[-1]
            best = {
                "trial_id": trial.trial_id,
                "metric": config.metric,
                "value": value,
                "epoch": epoch,
                "config": row["config"],
                "checkpoint": path,
                "metrics": {key: _finite(at_epoch.get(key)) for key in FINAL_METRICS},
            }
    return rows, best


def write_results(
    search_dir: Path,
    name: str,
    config: SearchConfig,
    wall_seconds: float,
    wandb_mode: str,
    wandb_project: str,
    trial_starts: dict[str, float],
) -> dict[str, Any]:
    """Write summary.json and trials.csv into the search folder, log the W&B summary run; return the summary."""
    from text_recognizer.search.driver import replay_command
    from text_recognizer.search.wandb_logging import log_summary_run

    rows, best = collect(search_dir, config, trial_starts)
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    total_epochs = sum(row["epochs"] for row in rows)
    startups = [row["startup_seconds"] for row in rows if row["startup_seconds"] is not None]
    if best:
        best["replay"] = replay_command(best["config"], best["epoch"])
    summary = {
        "name": name,
        "interrupted": any(row["status"] not in FINAL_STATUSES for row in rows),
        "search_dir": str(search_dir),
        "settings": config.settings(),
        "space": config.space,
        "fixed": config.fixed,
        "num_trials": len(rows),
        "statuses": statuses,
        "total_epochs": total_epochs,
        "epoch_fraction": total_epochs / max(1, len(rows) * config.max_t),
        "wall_seconds": wall_seconds,
        "startup_seconds_median": statistics.median(startups) if startups else None,
        "best": best,
        "trials": rows,
        "wandb": {"mode": wandb_mode, "project": wandb_project},
    }
    if wandb_mode != "disabled" and not summary["interrupted"]:  # a resumed search logs it once, at its end
        log_summary_run(search_dir, name, wandb_project, wandb_mode, summary)
        if wandb_mode == "offline":
            summary["wandb"]["sync_command"] = f"wandb sync {shlex.quote(str(search_dir / 'wandb'))}/offline-run-*"
    if summary["interrupted"]:
        command = ["python", "search/tune_mlp.py", "--resume", "--name", name, "--storage-path", str(search_dir.parent)]
        summary["resume_command"] = shlex.join(command)
    (search_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    flat = [{**{k: v for k, v in row.items() if k != "config"}, **row["config"]} for row in rows]
    pd.DataFrame(flat).to_csv(search_dir / "trials.csv", index=False)
    return summary


def print_report(summary: dict[str, Any], top: int = 5, file: TextIO = sys.stdout) -> None:
    """The ranked table of the best trials, the replay command and the W&B sync command."""
    settings = summary["settings"]
    key = f"best_{settings['metric']}"
    ranked = sorted(
        (row for row in summary["trials"] if row[key] is not None and row["status"] != "diverged"),
        key=lambda row: row[key],
        reverse=settings["mode"] == "max",
    )
    searched = list(summary["space"])
    print(
        f"\nSearch {summary['name']}: {summary['num_trials']} trials {summary['statuses']}, "
        f"{summary['total_epochs']} epochs, {summary['wall_seconds']:.0f} s  ->  {summary['search_dir']}",
        file=file,
    )
    header = f"{'rank':>4}  {'trial':<14}{key:>14}{'epochs':>8}  {'status':<14}" + "".join(f"{k:>12}" for k in searched)
    print(header, file=file)
    for rank, row in enumerate(ranked[:top], 1):
        values = "".join(f"{_short(row['config'].get(k)):>12}" for k in searched)
        print(f"{rank:>4}  {row['trial_id']:<14}{row[key]:>14.4f}{row['epochs']:>8}  {row['status']:<14}{values}", file=file)
    best = summary["best"]
    if best:
        print(
            f"\nBest trial {best['trial_id']}: {best['metric']}={best['value']:.4f} at epoch {best['epoch']}, "
            f"checkpoint {best['checkpoint']}",
            file=file,
        )
        print(f"Replay it:\n  {best['replay']}", file=file)
    else:
        print("\nNo trial produced a finite metric.", file=file)
    if summary["wandb"].get("sync_command"):
        print(f"W&B runs are offline; upload them with:\n  {summary['wandb']['sync_command']}", file=file)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
