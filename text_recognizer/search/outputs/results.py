"""Runs in the driver: the trials from the ResultGrid that `tuner.fit()` returns, summary.json, trials.csv, the report.

Writes files and prints; it logs nothing to W&B (wandb_logging.py does, from the same summary).
"""

from __future__ import annotations

import bisect
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Collection, Iterable
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

import pandas as pd
from ray.tune import Callback, Result

from text_recognizer.facts import (
    CHECKPOINT_NAME,
    REPORT_PAGE,
    SUMMARY_FILE,
    TRIAL_PREFIX,
    TrialStatus,
    its_end,
    replay_command,
    resume_command,
    search_ended,
    search_sync_command,
    trial_status,
    with_precision,
    write_whole,
)
from text_recognizer.search.spec import TOP_TRIALS, SearchSpec

FINAL_METRICS = ("val_acc", "val_loss", "train_acc", "train_loss")
ERROR_FILE = "error.txt"  # Tune appends "Failure # N" to it in the trial's folder at every failure


class TrialClock(Callback):
    """When each trial could have started: it was queued and a slot was free (search start or a trial ending).

    Tune's on_trial_start fires only once the trial's worker is up and has imported everything, so it
    would hide the start-up cost; a trial's start-up is measured from here to its first training step.
    """

    def __init__(self) -> None:
        self.added: dict[str, float] = {}
        self.slot_freed: list[float] = []
        self.ready: dict[str, float] = {}
        # the trials not ended (neither TERMINATED nor ERROR) in the newest state Tune saved, which --resume restores:
        # when a search is stopped, those it goes on with, even one whose last result says done. Tune logs the result
        # that ends a trial at once, then holds its STOP until the checkpoint's save task returns
        # (tune_controller.py, _cached_trial_decisions): a Ctrl-C in between leaves the trial running in that state.
        # Read as Tune saves (get_state), so not the statuses its cleanup sets after the final save.
        self.live: set[str] = set()
        self.trials: list[Any] = []

    def on_trial_add(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.added.setdefault(trial.trial_id, time.time())

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        now, added = time.time(), self.added.get(trial.trial_id, time.time())
        # the slot this trial took was freed by the latest trial ending before it started, if after it was queued
        # (slot_freed is in time order: a bisection, not a scan of every trial that ended)
        freed = self.slot_freed[bisect.bisect_right(self.slot_freed, now) - 1 :][:1] if self.slot_freed else []
        self.ready.setdefault(trial.trial_id, max([added, *(t for t in freed if added <= t <= now)]))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.slot_freed.append(time.time())

    on_trial_error = on_trial_complete

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        self.trials = trials  # Tune's own list: the trials as they are when it saves

    def get_state(self) -> None:
        """Called as Tune saves the search's state: which trials that state has not ended. No state of its own."""
        self.live = {trial.trial_id for trial in self.trials if trial.status not in ("TERMINATED", "ERROR")}


def finite(value: Any) -> float | None:
    """A metric's value as a float, or None when it is missing, not a number or not finite."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _failures(trial_dir: Path) -> int:
    errors = trial_dir / ERROR_FILE
    return sum(line.startswith("Failure # ") for line in errors.read_text().splitlines()) if errors.is_file() else 0


def own_metrics(result: Result) -> tuple[str, dict[str, Any]]:
    """A trial's id (from its folder, trial_<id>) and its last result as Tune's state records it; an empty one when
    what Tune hands back is another trial's (seen for a trial that errored before its first result in a reused
    actor), or when Tune's state holds no result of it. Then its rows on disk, if any, are not its own either: a
    driver killed after the trial's first epoch but before Tune saved its state leaves them, and Tune's state, the
    one --resume restores, has the trial pending, with no config (seen in the long chaos run)."""
    # Tune adds _<4 hex> to a trial's folder when one of its name is there already: a driver killed after it made
    # the trial's folder but before it saved the trial in its state, and the next made it again (long chaos run)
    trial_id = re.sub(r"_[0-9a-f]{4}$", "", PurePosixPath(result.path).name.removeprefix(TRIAL_PREFIX))
    last = result.metrics or {}
    return trial_id, (last if last.get("trial_id", trial_id) == trial_id and "training_iteration" in last else {})


def trial_row(
    result: Result, spec: SearchSpec, trial_starts: dict[str, float], budget_ended: bool = False, live: Collection[str] = ()
) -> dict[str, Any]:
    """One trial: its outcome, epochs, config, final metrics, best metric, start-up, device and failures. `live`:
    the trials Tune had not ended when the search stopped (TrialClock.live): their last result is not their end."""
    config, (trial_id, last) = spec.config, own_metrics(result)
    last = its_end(trial_id, last, live, config.max_t)
    frame = result.metrics_dataframe if result.metrics_dataframe is not None and last else pd.DataFrame()
    history = [value for value in frame.get(config.metric, []) if finite(value) is not None]
    better = max if config.mode == "max" else min
    trial_config, epochs = dict(result.config or {}), int(last.get("training_iteration", 0))
    row = {
        "trial_id": trial_id,
        # the plain string: a row is data, printed (as in the statuses' dict) and written as it is
        "status": trial_status(
            last, config.max_t, error=result.error is not None, budget_ended=budget_ended, started=trial_id in trial_starts
        ).value,
        "epochs": epochs,
        "config": trial_config,
        **{key: finite(last.get(key)) for key in FINAL_METRICS},
        f"best_{config.metric}": better(history) if history else None,
        "startup_seconds": None,
        # where its last epoch trained: a trial retried after its node was lost ends on another node
        "node_id": last.get("node_id"),
        "node_ip": last.get("node_ip"),
        "cpus": last.get("cpus"),
        "gpus": last.get("gpus"),
        "gpu_ids": last.get("gpu_ids"),
        "cuda_visible_devices": last.get("cuda_visible_devices"),
        "precision": last.get("precision"),  # as its node resolved --precision auto
        "failures": _failures(spec.folder / Path(result.path).name),  # the trial's logs, also with a URI storage
        "replay": replay_command(with_precision(trial_config, last.get("precision")), epochs or None),
        "error": str(spec.folder / Path(result.path).name / ERROR_FILE) if result.error is not None else None,
    }
    if trial_id in trial_starts and len(frame) and "first_step_at" in frame:
        row["startup_seconds"] = float(frame["first_step_at"].iloc[0]) - trial_starts[trial_id]
    return row


def best_of(kept: list[tuple[Any, dict[str, Any]]], metric: str, mode: str) -> tuple[Any, dict[str, Any]]:
    """The best of a trial's (checkpoint, metrics) pairs as Tune's checkpoint manager ranks them: by the metric, and
    of equal values the later epoch. The same as the one CheckpointKeeper keeps: a tie picked the other way named
    a checkpoint pruned a moment before (seen: the winner's test found no model.ckpt)."""
    sign = 1 if mode == "max" else -1
    return max(kept, key=lambda pair: (sign * pair[1][metric], pair[1].get("training_iteration", 0)))


def best_checkpoint(result: Result, row: dict[str, Any], spec: SearchSpec) -> dict[str, Any] | None:
    """The trial's best kept checkpoint by the metric, with the metrics Tune recorded with it (not re-read from
    the result rows: a killed trial process can leave a kept checkpoint without its row)."""
    metric = spec.config.metric
    kept = [
        (checkpoint, metrics) for checkpoint, metrics in result.best_checkpoints or [] if finite(metrics.get(metric)) is not None
    ]
    if not kept or row["status"] in TrialStatus.FAILED:
        return None
    checkpoint, metrics = best_of(kept, metric, spec.config.mode)
    return {
        "trial_id": row["trial_id"],
        "metric": metric,
        "value": float(metrics[metric]),
        "epoch": int(metrics["training_iteration"]),
        "config": row["config"],
        "precision": row["precision"],
        "checkpoint": str(Path(checkpoint.path) / CHECKPOINT_NAME),
        "metrics": {key: finite(metrics.get(key)) for key in FINAL_METRICS},
    }


def collect(
    results: Iterable[Result],
    spec: SearchSpec,
    trial_starts: dict[str, float],
    budget_ended: bool | Collection[str] = False,
    live: Collection[str] = (),
) -> tuple[list[dict], dict | None]:
    """One row per trial (by trial id), and the best checkpoint of all trials that neither failed nor diverged;
    `budget_ended`: the time budget stopped the trials that have not ended (True: all of them; else their ids);
    `live`: those Tune had not ended (trial_row)."""
    rows, best = [], None
    sign = 1 if spec.config.mode == "max" else -1
    for result in sorted(results, key=lambda r: own_metrics(r)[0]):
        stopped = budget_ended if isinstance(budget_ended, bool) else own_metrics(result)[0] in budget_ended
        row = trial_row(result, spec, trial_starts, stopped, live)
        rows.append(row)
        candidate = best_checkpoint(result, row, spec)
        if candidate and (best is None or sign * candidate["value"] > sign * best["value"]):
            best = candidate
    if best:
        best["replay"] = replay_command(with_precision(best["config"], best["precision"]), best["epoch"])
    return rows, best


def unfinished(results: Iterable[Result], max_t: int, live: Collection[str] = ()) -> set[str]:
    """The ids of the trials that have not ended (stopped, or never started; its_end)."""
    return {trial_id for trial_id, last in map(own_metrics, results) if not its_end(trial_id, last, live, max_t).get("done")}


def summarize(
    spec: SearchSpec,
    rows: list[dict],
    best: dict | None,
    wall_seconds: float,
    sweep_id: str | None = None,
    parts: list[dict] | None = None,
    sampled_all: bool = True,
) -> dict[str, Any]:
    """The summary of a search (what summary.json holds); `sampled_all`: its sampler got to the end (facts.search_ended)."""
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    total_epochs = sum(row["epochs"] for row in rows)
    startups = [row["startup_seconds"] for row in rows if row["startup_seconds"] is not None]
    interrupted = not search_ended(rows, sampled_all)
    summary = {
        "name": spec.name,
        "interrupted": interrupted,
        "budget_ended": any(row["status"] in TrialStatus.BUDGET for row in rows),
        "search_dir": str(spec.folder),
        "settings": spec.config.settings(),
        "space": spec.config.space,
        "fixed": spec.config.fixed,
        "trial_process": spec.trial_process,
        "num_trials": len(rows),
        "statuses": statuses,
        "total_epochs": total_epochs,
        "epoch_fraction": total_epochs / max(1, len(rows) * spec.config.max_t),
        "wall_seconds": wall_seconds,
        # the runs of the search: the first, then one per growth (--resume with --num-samples or --time-budget)
        "parts": parts or [],
        "startup_seconds_median": statistics.median(startups) if startups else None,
        "best": best,
        "nodes": trials_per_node(rows),
        "trials": rows,
        "wandb": {"mode": spec.wandb_mode, "project": spec.wandb_project, "sweep_id": sweep_id},
        "report": str(spec.folder / REPORT_PAGE),
    }
    if spec.wandb_mode == "offline" and not interrupted:  # uploads the runs, then makes them a sweep
        summary["wandb"]["sync_command"] = search_sync_command(str(spec.folder))
    if interrupted:
        summary["resume_command"] = resume_command(spec.name, spec.where)
    return summary


def trials_per_node(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The nodes trials trained on (by the node of each trial's last epoch), with how many trials each, most first."""
    nodes: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.get("node_id"):
            node = nodes.setdefault(row["node_id"], {"node_id": row["node_id"], "node_ip": row["node_ip"], "trials": 0})
            node["trials"] += 1
    return sorted(nodes.values(), key=lambda node: (-node["trials"], node["node_id"]))


def write_results(summary: dict[str, Any], folder: Path) -> None:
    """summary.json and trials.csv (one row per trial, its config flattened into columns)."""
    rows = summary["trials"]
    flat = [{**{k: v for k, v in row.items() if k != "config"}, **row["config"]} for row in rows]
    write_whole(folder / "trials.csv", pd.DataFrame(flat).to_csv(index=False))
    write_whole(folder / SUMMARY_FILE, json.dumps(summary, indent=2, default=str))


def ranked(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The trials with a finite best metric, best first; a diverged trial is never ranked."""
    key = f"best_{summary['settings']['metric']}"
    return sorted(
        (row for row in summary["trials"] if finite(row.get(key)) is not None and row["status"] != TrialStatus.DIVERGED),
        key=lambda row: row[key],
        reverse=summary["settings"]["mode"] == "max",
    )


def print_report(summary: dict[str, Any], top: int = TOP_TRIALS, file: TextIO = sys.stdout) -> None:
    """The ranked table of the best trials, the replay command and the W&B sync (or resume) command."""
    key = f"best_{summary['settings']['metric']}"
    searched = list(summary["space"])
    print(
        f"\nSearch {summary['name']}: {summary['num_trials']} trials {summary['statuses']}, "
        f"{summary['total_epochs']} epochs, {summary['wall_seconds']:.0f} s  ->  {summary['search_dir']}",
        file=file,
    )
    widths = {k: max(12, len(k) + 2) for k in searched}  # a column a searched flag, never run into the next
    header = "".join(f"{k:>{widths[k]}}" for k in searched)
    print(f"{'rank':>4}  {'trial':<14}{key:>14}{'epochs':>8}  {'status':<18}" + header, file=file)
    for rank, row in enumerate(ranked(summary)[:top], 1):
        values = "".join(f"{short(row['config'].get(k)):>{widths[k]}}" for k in searched)
        print(f"{rank:>4}  {row['trial_id']:<14}{row[key]:>14.4f}{row['epochs']:>8}  {row['status']:<18}{values}", file=file)
    print_nodes(summary.get("nodes") or [], file)
    print_parts(summary.get("parts") or [], file)
    print_confirm(summary.get("confirm"), file)
    best = summary["best"]
    if best:
        print(
            f"\nBest trial {best['trial_id']}{confirmed_from(best)}: {best['metric']}={best['value']:.4f} "
            f"at epoch {best['epoch']}, "
            f"checkpoint {best['checkpoint']}",
            file=file,
        )
        if best.get("test_acc") is not None:
            print(
                f"On the test split (evaluated once): test_acc={best['test_acc']:.4f} test_loss={best['test_loss']:.4f}",
                file=file,
            )
        print(f"Replay it:\n  {best['replay']}", file=file)
    else:
        print("\nNo trial produced a finite metric.", file=file)
    if summary["wandb"].get("sync_command"):
        print(f"W&B runs are offline; upload them as a W&B sweep with:\n  {summary['wandb']['sync_command']}", file=file)
    if summary.get("report"):
        print(f"Report: {summary['report']}", file=file)
    if summary.get("budget_ended"):
        budget = summary["settings"]["time_budget"]
        print(f"\nThe time budget ({budget:g} s) ended the search: no trial started after it, running ones stopped.", file=file)
    if summary["interrupted"]:
        print(f"\nThe search was interrupted; its state is saved. Continue it with:\n  {summary['resume_command']}", file=file)


def print_nodes(nodes: list[dict[str, Any]], file: TextIO) -> None:
    """How many trials trained on each node (IP and the start of Ray's node id)."""
    if nodes:
        counts = ", ".join(f"{node['node_ip']} ({node['node_id'][:8]}): {node['trials']}" for node in nodes)
        print(f"Trials per node: {counts}", file=file)


def print_parts(parts: list[dict[str, Any]], file: TextIO) -> None:
    """A grown search's parts: when each began, the sample count it ran to, its budget and wall time."""
    if len(parts) > 1:
        print(f"Ran in {len(parts)} parts: " + "; ".join(describe_part(part) for part in parts), file=file)


def print_confirm(confirm: dict[str, Any] | None, file: TextIO) -> None:
    """--confirm's table: each confirmed config's mean ± std of its best val metric and its test accuracy."""
    if not confirm:
        return
    metric = confirm["metric"]
    print(
        f"\nConfirmed: the top {confirm['top_k']} configs, {confirm['seeds']} new seeds each (winner: best mean {metric})",
        file=file,
    )
    print(f"{'config of':<14}{'search':>10}{metric + ' mean ± std':>24}{'test_acc mean ± std':>24}", file=file)
    for entry in confirm["configs"]:
        print(
            f"{entry['trial_id']:<14}{entry['search_value']:>10.4f}{plus_minus(entry['val_mean'], entry['val_std']):>24}"
            f"{plus_minus(entry['test_acc_mean'], entry['test_acc_std']):>24}",
            file=file,
        )
    if confirm.get("interrupted"):
        print("The confirm stage was interrupted: --resume with the same --confirm finishes it.", file=file)


def confirmed_from(best: dict[str, Any]) -> str:
    return f" (a confirm run of {best['confirm_of']}'s config, the best mean)" if best.get("confirm_of") else ""


def plus_minus(mean: float | None, std: float | None) -> str:
    return "-" if mean is None else f"{mean:.4f} ± {std:.4f}"


def describe_part(part: dict[str, Any]) -> str:
    budget = f"budget {part['time_budget']:g} s" if part.get("time_budget") is not None else "no budget"
    return f"{part['started']} to {part['num_samples']} samples, {budget}, {part['wall_seconds']:.0f} s"


def short(value: Any) -> str:
    """A config value as a table shows it: floats to 3 significant digits."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)
