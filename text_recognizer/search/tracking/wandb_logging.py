"""Runs in the driver: W&B for a search: one run per trial (a Tune callback), and one summary run with a table and the model.

Logging from the driver, not inside trials, means a trial that ASHA stops, or whose worker dies, still
ends as one finished W&B run, and runs land in the search's own folder on the driver's storage.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from text_recognizer.facts import TRIAL_PREFIX, TrialStatus, trial_status, wandb_run_id
from text_recognizer.search.outputs.checkpoints import result_rows, tracked_results
from text_recognizer.search.spec import SearchSpec
from text_recognizer.search.tracking import sweep
from text_recognizer.util import UserError

# what a trial run's history holds, one row per epoch
HISTORY_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "epoch_seconds", "diverged")
SUMMARY_COLUMNS = ("status", "epochs", "val_acc", "val_loss", "train_acc", "train_loss")  # + best_<metric>
# where and how a trial trains, in its run's config (updated when a retry lands on another node); the precision is
# --precision auto as resolved on that node
WHERE_KEYS = ("node_id", "node_ip", "cpus", "gpus", "gpu_ids", "precision")


def check_installed(mode: str) -> None:
    """W&B is imported only when a run is logged; a search that will log one fails at once if it can't."""
    if mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise UserError(f"--wandb-mode {mode}: W&B (wandb) is not installed here; install it or use --wandb-mode disabled")


@contextmanager
def kept_out(mode: str) -> Iterator[None]:
    """With --wandb-mode disabled, not even Ray imports W&B: Tune's usage tagging imports Ray's W&B integration,
    which tries `import wandb`, whenever callbacks are given. While the search fits, that import fails at once."""
    block = mode == "disabled" and "wandb" not in sys.modules
    if block:
        sys.modules["wandb"] = None  # type: ignore[assignment]  # Python's way to make an import fail
    try:
        yield
    finally:
        if block and sys.modules.get("wandb", False) is None:
            del sys.modules["wandb"]


def run_settings(sweep_id: str | None = None, requirements: bool = False) -> Any:
    """The settings of every run the driver starts: no system-metrics sampling or code/git capture (the driver hosts
    many runs at once) and, online, the sweep the run belongs to. The installed packages (requirements.txt) only
    with `requirements`: W&B reads every package's metadata for it, which took 0.3-0.7 s of the driver per
    trial run (benchmarks/scale.py's profile), the same list each time; the search's summary run keeps it."""
    import wandb  # in each function, not at the top: with --wandb-mode disabled W&B is never imported

    return wandb.Settings(
        silent=True,
        x_disable_stats=True,
        x_disable_machine_info=True,
        x_save_requirements=requirements,
        disable_git=True,
        save_code=False,
        console="off",
        sweep_id=sweep_id,  # None: in no sweep (offline, or W&B disabled)
    )


def init_run(sweep_id: str | None = None, requirements: bool = False, **kwargs: Any) -> Any:
    """wandb.init for one of several concurrent runs in this process."""
    import wandb

    return wandb.init(reinit="create_new", resume="allow", settings=run_settings(sweep_id, requirements), **kwargs)


class WandbTrialCallback(tune.Callback):
    """A Tune callback that mirrors every trial into a W&B run: config, per-epoch history, final summary.

    Why not Ray's WandbLoggerCallback: it gives no run its own settings (the sweep id goes in each run's settings,
    never the environment), finishes runs without our trial statuses, and a resumed trial would start a second
    offline file for the same run id; this one takes over the old run and re-logs its epochs (see below)."""

    def __init__(
        self,
        spec: SearchSpec,
        sweep_id: str | None = None,
        job_type: str = "trial",
        labels: Callable[[Any], dict[str, Any]] | None = None,
    ) -> None:
        """`job_type`: trial, or confirm for a --confirm stage's runs; `labels`: more config keys for a trial's run."""
        self.spec, self.sweep_id, self.job_type, self.labels = spec, sweep_id, job_type, labels
        # each open run with its Tune trial, to finish it if the search is interrupted
        self.runs: dict[str, tuple[Any, Any]] = {}
        self.logged_epoch: dict[str, int] = {}
        self.best: dict[str, float] = {}
        self.where: dict[str, dict[str, Any]] = {}
        self.deadline: float | None = None  # when the time budget runs out: runs still open then were stopped by it
        self.damaged: set[str] = set()  # trials whose run missed a write (see _mirroring): rewritten after the fit

    def _run(self, trial: Any, earlier: list[dict[str, Any]] | None = None) -> Any:
        """The trial's open run, started if it has none; `earlier`: the rows it starts with (default: a resumed
        trial's epochs up to its checkpoint, offline)."""
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id][0]
        identifier = wandb_run_id(self.spec.name, trial.trial_id)
        # only a resumed driver finds a run of the trial from an earlier one (a glob of every run's folder per trial)
        takes_over = self.spec.wandb_mode == "offline" and self.spec.resume and earlier is None
        earlier = self._take_over_offline_run(identifier, trial) if takes_over else (earlier or [])
        run = init_run(
            self.sweep_id,
            project=self.spec.wandb_project,
            id=identifier,
            name=str(trial),
            group=self.spec.name,
            job_type=self.job_type,
            dir=str(self.spec.folder),
            mode=self.spec.wandb_mode,
            config={
                **trial.config,
                "search": self.spec.config.settings(),
                "trial_id": trial.trial_id,
                **(self.labels(trial) if self.labels else {}),
            },
        )
        self.runs[trial.trial_id] = run, trial
        self.logged_epoch[trial.trial_id] = 0
        for row in earlier:
            self._log(trial, run, row)
        return run

    def _take_over_offline_run(self, identifier: str, trial: Any) -> list[dict[str, Any]]:
        """The rows a resumed trial's run must start with: its epochs up to the checkpoint it resumes from.

        Offline, a resumed run would start a second, disconnected `.wandb` file for the same id, and
        syncing both breaks the run. So the old folder moves to wandb/superseded/ (kept, never synced) and
        the new run re-logs the earlier epochs. They come from Tune's result.json, flushed at every
        result: a killed driver never got to flush its `.wandb` files.
        """
        supersede_offline_runs(self.spec.folder, identifier)
        _, latest = tracked_results(trial)
        results = Path(trial.path) / "result.json"
        if latest is None or not results.is_file():
            return []
        resumed_at = latest.metrics["training_iteration"]
        rows = {}
        for line in results.read_text().splitlines():
            row = json.loads(line)
            rows[row["training_iteration"]] = row
        # up to the first epoch Tune never delivered, if any: the resumed trial's first report fills the rest
        return [rows[epoch] for epoch in itertools.takewhile(rows.__contains__, range(1, resumed_at + 1))]

    def _log(self, trial: Any, run: Any, result: dict[str, Any]) -> None:
        epoch = result["training_iteration"]
        if epoch <= self.logged_epoch.get(trial.trial_id, 0):
            return  # a trial restored from an older checkpoint repeats epochs the run already has
        run.log({key: result[key] for key in HISTORY_KEYS if key in result} | {"epoch": epoch}, step=epoch)
        self.logged_epoch[trial.trial_id] = epoch
        value = result.get(self.spec.config.metric)
        if value is not None and math.isfinite(value):
            better = max if self.spec.config.mode == "max" else min
            self.best[trial.trial_id] = better(value, self.best.get(trial.trial_id, value))

    @contextmanager
    def _mirroring(self, trial_id: str, what: str) -> Iterator[None]:
        """W&B mirrors the search and never stops it: a failed write (storage gone read-only for a moment, seen in
        the chaos benchmark, where it ended the driver with a traceback; a W&B error) is one warning line. A trial
        without its run gets one at its next result; offline, a damaged run is written again from Tune's results
        once the fit returns (rewrite_runs)."""
        try:
            yield
        except Exception as error:  # whatever W&B or the disk raised: the search goes on
            self.damaged.add(trial_id)
            print(
                f"warning: trial {trial_id}: its W&B run missed {what} ({type(error).__name__}: {error})",
                file=sys.stderr,
                flush=True,
            )

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with self._mirroring(trial.trial_id, "its start"):
            self._run(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        with self._mirroring(trial.trial_id, f"epoch {result.get('training_iteration')}"):
            self._log_result(trial, result)

    def _log_result(self, trial: Any, result: dict[str, Any]) -> None:
        run = self._run(trial)
        # a trial's first report after a restore carries its checkpoint's epochs: those Tune never delivered (the
        # trial's worker died after keeping the checkpoint, before the result) are logged now, the others skipped
        for row in result.get("restored_history") or []:
            if row["epoch"] < result["training_iteration"]:
                self._log(trial, run, {**row, "training_iteration": row["epoch"]})
        self._record_where(trial, run, result)
        self._log(trial, run, result)

    def _record_where(self, trial: Any, run: Any, result: dict[str, Any]) -> None:
        """The node and resources the trial trains on, in its run's config; again when a retry lands elsewhere."""
        where = {key: result.get(key) for key in WHERE_KEYS}
        if where["node_id"] and self.where.get(trial.trial_id) != where:
            run.config.update(where, allow_val_change=True)
            self.where[trial.trial_id] = where

    def _finish(self, trial: Any, status: str) -> None:
        run, _ = self.runs.pop(trial.trial_id, (None, None))
        if run is None:
            return
        run.summary.update(
            {
                f"best_{self.spec.config.metric}": self.best.get(trial.trial_id),
                "epochs_trained": self.logged_epoch.get(trial.trial_id, 0),
                "status": str(status),  # W&B writes an Enum member by its name: the plain string, as summary.json's
                "stopped_by_asha": status == TrialStatus.STOPPED_EARLY,
            }
        )
        run.finish(exit_code=1 if status == TrialStatus.ERROR else 0)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # the same outcome as summary.json's
        with self._mirroring(trial.trial_id, "its end"):
            self._finish(trial, trial_status({**(trial.last_result or {}), "done": True}, self.spec.config.max_t))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with self._mirroring(trial.trial_id, "its end"):
            self._finish(trial, TrialStatus.ERROR)

    def rewrite_runs(self, rows: list[dict[str, Any]]) -> list[str]:
        """Offline, after the fit: an ended trial whose run missed a write in this driver (`damaged`), or that
        ended under an earlier driver and whose run has no end (that driver was SIGKILLed before W&B's service
        wrote it: the chaos benchmark found a completed trial with no run), gets its run again from Tune's
        result.json, finished with its status; the old folder moves to wandb/superseded/. Returns the ids of the
        trials rewritten."""
        # only a resumed driver can meet runs an earlier one left unended: only then read every run's file
        ends = offline_run_ends(self.spec.folder) if self.spec.resume else {}
        ended = {run_id for run_id, exit_code in ends.items() if exit_code is not None}
        rewritten = []
        for row in rows:
            identifier = wandb_run_id(self.spec.name, row["trial_id"])
            if row["status"] not in TrialStatus.FINAL or row["status"] == TrialStatus.NOT_STARTED:
                continue
            if row["trial_id"] not in self.damaged and (not self.spec.resume or identifier in ended):
                continue
            trial = EndedTrial(row["trial_id"], row["config"])
            self.damaged.discard(trial.trial_id)
            with self._mirroring(trial.trial_id, "its rewrite"):
                supersede_offline_runs(self.spec.folder, identifier)
                self._run(trial, earlier=result_rows(self.spec.folder / trial.name / "result.json"))
                self._finish(trial, row["status"])
                rewritten.append(row["trial_id"])
        return rewritten

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.finish_open_runs()

    def finish_open_runs(self) -> None:
        """Finish the runs of trials still running (the search was interrupted): --resume takes them over.

        An open run is a started trial, so it was interrupted, even one stopped before its first epoch (whose last
        result alone would read as pending)."""
        spent = self.deadline is not None and time.time() >= self.deadline
        status = TrialStatus.STOPPED_BY_BUDGET if spent else TrialStatus.INTERRUPTED
        for _, trial in list(self.runs.values()):
            with self._mirroring(trial.trial_id, "its end"):
                self._finish(trial, status)


@dataclass(frozen=True)
class EndedTrial:
    """What a trial run needs of a Tune trial, for a trial that ended under an earlier driver."""

    trial_id: str
    config: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{TRIAL_PREFIX}{self.trial_id}"

    def __str__(self) -> str:  # as str() of a Tune trial: its name
        return self.name


def offline_run_ends(folder: Path) -> dict[str, int | None]:
    """Each offline run of the search by id, with its exit code (None: the run has no end, or its file can't be read)."""
    from text_recognizer.search.tracking.wandb_files import read_run

    ends: dict[str, int | None] = {}
    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        identifier = path.parent.name.removeprefix("offline-run-").split("-", 1)[-1]  # offline-run-<time>-<id>
        try:
            ends[identifier] = read_run(path).exit_code
        except Exception:  # a file the killed driver left cut short or empty: a run with no end
            ends.setdefault(identifier, None)
    return ends


def supersede_offline_runs(folder: Path, identifier: str) -> None:
    """Move a search's earlier offline folders of run `identifier` to wandb/superseded/ (kept, never synced): the
    run that starts next replaces them, so syncing the search uploads each run once."""
    superseded = folder / "wandb" / "superseded"
    for earlier in sorted(folder.glob(f"wandb/offline-run-*-{identifier}")):
        superseded.mkdir(parents=True, exist_ok=True)
        earlier.rename(superseded / earlier.name)


def finish_search(spec: SearchSpec, summary: dict[str, Any], sweep_id: str | None) -> None:
    """The end of a finished search in W&B: its summary run, and (online) its sweep marked finished."""
    log_summary_run(spec, summary)
    if sweep_id:
        sweep.stop_sweep(sweep_id, spec.wandb_project)


def log_summary_run(spec: SearchSpec, summary: dict[str, Any]) -> str:
    """One more run (job_type summary): a table of all trials and the best checkpoint as a model artifact."""
    import wandb

    if spec.wandb_mode == "offline":  # a grown search's summary covers the whole search: it replaces the earlier one
        supersede_offline_runs(spec.folder, wandb_run_id(spec.name, "summary"))
    run = init_run(
        requirements=True,  # once per search: what it ran with
        project=spec.wandb_project,
        id=wandb_run_id(spec.name, "summary"),
        name=f"{spec.name}-summary",
        group=spec.name,
        job_type="summary",
        dir=str(spec.folder),
        mode=spec.wandb_mode,
        config={key: summary.get(key) for key in ("name", "settings", "space", "parts")},
    )
    rows, best_key = summary["trials"], f"best_{spec.config.metric}"
    columns = sorted({key for row in rows for key in row["config"]})
    metrics = [*SUMMARY_COLUMNS, best_key]
    table = wandb.Table(columns=["trial_id", *columns, *metrics])
    for row in rows:
        values = [str(row[m]) if m == "status" else row.get(m) for m in metrics]  # the status as a plain string
        table.add_data(row["trial_id"], *[row["config"].get(c) for c in columns], *values)
    run.log({"trials": table})
    best = summary.get("best")
    if best and best.get("checkpoint"):
        artifact = wandb.Artifact(
            f"{wandb_run_id(spec.name, 'best')}-model",
            type="model",
            metadata={key: best[key] for key in ("trial_id", "config", "metrics")},
        )
        artifact.add_file(best["checkpoint"], name="model.ckpt")
        run.log_artifact(artifact)
        run.summary.update({"best_trial_id": best["trial_id"], best_key: best["value"]})
        run.summary.update({key: best[key] for key in ("test_acc", "test_loss") if best.get(key) is not None})
    run.summary.update({"num_trials": summary["num_trials"], "total_epochs": summary["total_epochs"]})
    run.summary.update({"num_parts": len(summary.get("parts") or []), "wall_seconds": summary["wall_seconds"]})
    run.finish()
    return run.dir
