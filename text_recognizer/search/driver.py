"""Runs in the driver: the search, top to bottom, a step a line (run_search), and the Tuner it fits."""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.logger import CSVLoggerCallback
from ray.tune.search import ConcurrencyLimiter, SearchAlgorithm
from ray.tune.search.basic_variant import BasicVariantGenerator

from text_recognizer.data.raw_files import RAW_FILES
from text_recognizer.facts import (
    CHECKPOINT_NAME,
    SEARCH_FILE,
    SUMMARY_FILE,
    TRIAL_PREFIX,
    leet_command,
    replay_command,
    resume_command,
    search_ended,
    with_precision,
    write_whole,
)
from text_recognizer.flags import DATA_CLASS, data_dir
from text_recognizer.search import confirm, saved_state, storage
from text_recognizer.search.cluster import ray_cluster
from text_recognizer.search.failfast import FIRST, FailFast
from text_recognizer.search.grow import (
    GrowingSearchGenerator,
    GrowingVariantGenerator,
    PartBudget,
    ResumableASHA,
    this_part,
)
from text_recognizer.search.outputs.checkpoints import CheckpointKeeper, ResultLog, keep_best_trials
from text_recognizer.search.outputs.progress import Progress
from text_recognizer.search.outputs.report import write_report
from text_recognizer.search.outputs.results import (
    FINAL_METRICS,
    TrialClock,
    best_of,
    collect,
    finite,
    own_metrics,
    print_report,
    summarize,
    unfinished,
    write_results,
)
from text_recognizer.search.preemption import Preemption
from text_recognizer.search.reuse import retrying_resets
from text_recognizer.search.spec import SearchSpec, describe
from text_recognizer.search.tracking.sweep import create_sweep, sweep_config
from text_recognizer.search.tracking.wandb_logging import WandbTrialCallback, check_installed, finish_search, kept_out
from text_recognizer.search.trial import tune_actor
from text_recognizer.util import patiently

# while a trial runs: its two best by the metric and (Tune always keeps it) its newest, for resuming. Not one: Tune
# deletes a checkpoint as soon as a better one comes, and a state file synced a little earlier (a URI storage,
# asynchronously) can still name it as the one to resume from. Once a trial has ended, CheckpointKeeper leaves
# only the best, weights only.
CHECKPOINTS_KEPT = 2


def run_search(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run or resume a search; writes summary.json and trials.csv, logs the W&B summary, returns the summary."""
    spec = describe(argv)  # 1. flags + config -> one frozen description; bad input stops here
    check_installed(spec.wandb_mode)  #    W&B, unless --wandb-mode disabled (then it is never imported)
    arrays = load_data(spec)  # checked now (a missing or corrupt file is a one-line error), decoded while Ray starts
    preemption = Preemption()  # SIGTERM, from ray.init on: ends the search as Ctrl-C does (exit 143)
    with ray_cluster(spec.address) as nodes, preemption.catching():  # 2. start or join Ray
        spec = spec.fitted_to(nodes)
        storage.check_every_node_sees(spec.where)  # on a cluster: refuse a folder that only this node has
        data = put_data(arrays.result())  # the dataset goes into Ray's object store once; the driver drops its copy
        grid, clock, record = fit(spec, data, [preemption])  # 3. build the Tuner (or restore it) and fit it
        rows, best = collect(
            grid, spec, clock.ready, set(record["budget_stopped"]), clock.live
        )  # 4. the trials, from the ResultGrid
        ended, confirmed = search_ended(rows, sampled_all(spec, rows, record)), None
        if spec.confirm and best and ended:  # --confirm: the best configs again, new seeds; best mean wins
            best, confirmed = confirm_winner(spec, rows, data, len(record["parts"]), [preemption])
        best = local_winner(spec, best if confirmed else test_winner(spec, best, data, ended))
        winner = best["trial_id"] if best else None
        kept = keep_best_trials(list(grid), rows, winner, spec.config.metric, spec.config.mode, spec.keep_checkpoints, ended)
        summary = summarize(spec, rows, best, record["wall_seconds"], record["sweep_id"], record["parts"], ended)
        summary["checkpoints_kept"] = kept  # a finished search keeps its best trials' only (--keep-checkpoints); None: all
        summary["preempted"] = preemption.received  # SIGTERM came: an interrupted search exits 143, not 130
        if confirmed is not None:
            summary["confirm"] = confirmed
            if confirmed["interrupted"]:  # --resume with the same --confirm restores the confirm experiment
                summary["interrupted"] = True
                summary["resume_command"] = resume_command(spec.name, spec.where) + f" --confirm {top_k_seeds(spec)}"
        write_results(summary, spec.folder)  # 5. summary.json, trials.csv and report/report.html, its figures
        pool = ThreadPoolExecutor(1, thread_name_prefix="report")  #  drawn while Ray shuts down (1.4-2 s each)
        report = pool.submit(write_report, spec.folder, summary)  #    and W&B logs the summary run
    if spec.wandb_mode != "disabled" and not summary["interrupted"]:  # a resumed search logs it once, at its end
        finish_search(spec, summary, summary["wandb"].get("sweep_id"))  # 6. the W&B summary run; the sweep stops
    report.result()
    pool.shutdown()
    if spec.storage:  # the driver's own files beside Tune's: --resume, anywhere, needs only the URI
        storage.upload_driver_files(spec.folder, spec.storage)
    print_report(summary, spec.top)  # 7.
    return summary


def top_k_seeds(spec: SearchSpec) -> str:
    return "x".join(map(str, spec.confirm)) if spec.confirm else ""


def sampled_all(spec: SearchSpec, rows: list[dict], record: dict[str, Any]) -> bool:
    """Whether the sampler got to the end: the search's sample count was reached, or its time budget ran out. A
    search stopped (Ctrl-C, SIGTERM) between two trials has only ended trials, and is still not done."""
    return len(rows) >= spec.config.num_samples or budget_spent(record["parts"][-1])


def budget_spent(part: dict[str, Any]) -> bool:
    """Whether its time budget ended a part of the search: the part's wall seconds (over every driver that ran it)
    reached it (PartBudget stops at that deadline)."""
    return part["time_budget"] is not None and part["wall_seconds"] >= part["time_budget"]


def load_data(spec: SearchSpec) -> Future:
    """The search's dataset: its files checked here (a missing or corrupt one is a UserError), then decoded and
    normalized in a thread, while Ray starts; the future's result: numpy arrays keyed x_train, y_train, ..."""
    raw_files, folder = RAW_FILES[spec.config.fixed.get("data_class", DATA_CLASS)], data_dir(spec.config.fixed.get("data_dir"))
    raw_files.ensure_raw_files(folder)
    pool = ThreadPoolExecutor(1, thread_name_prefix="decode")
    decoding = pool.submit(raw_files.decode_arrays, folder)
    pool.shutdown(wait=False)  # the thread ends with the decoding
    return decoding


def test_winner(spec: SearchSpec, best: dict | None, data: ray.ObjectRef, ended: bool) -> dict | None:
    """The best trial (chosen on val) with its checkpoint's test_acc and test_loss, evaluated once, at the end of a
    finished search, in the precision it trained in.

    In the driver (evaluate). The checkpoint is read where Tune stored it (a folder, or a URI through a local copy)."""
    if best is None or not ended:
        return best
    tested = earlier_test(spec.folder, best)
    if tested:  # a grown or resumed search whose winner did not change: its test stands, evaluated once
        return {**best, **tested}
    return {**best, **evaluate([best], spec, data)[0]}


TESTING = "text_recognizer.search.trial.trial_process"  # what the driver's test of the winner imports: Lightning


def preload_testing() -> None:
    """Import torch and Lightning for the winner's test (evaluate) in a thread, while Tune fits: 5 s of imports that a
    smoke search paid after its fit, serially. The driver spends the fit waiting on Ray (ray.wait), so the thread
    mostly takes a core from the trials for those seconds; a fresh Ray worker would import them all again."""
    threading.Thread(target=importlib.import_module, args=(TESTING,), name="preload-testing", daemon=True).start()


def evaluate(trials: list[dict[str, Any]], spec: SearchSpec, data: ray.ObjectRef) -> list[dict[str, float]]:
    """The test metrics of each trial's checkpoint, in the precision it trained in, one after the other in the driver,
    which has every CPU to itself once the trials are done, and has imported Lightning during the fit
    (preload_testing). The checkpoint is read where Tune stored it (a folder, or a URI through a local copy)."""
    trial_process = importlib.import_module(TESTING)  # preloaded: waits for the thread's import if it still runs

    filesystem, arrays, tested = tune_storage(spec).get("storage_filesystem"), ray.get(data), []
    for trial in trials:
        checkpoint = tune.Checkpoint(os.path.dirname(trial["checkpoint"]), filesystem=filesystem)
        config = with_precision(trial["config"], trial.get("precision"))
        with checkpoint.as_directory() as directory, quiet_lightning():
            tested.append(trial_process.test_winner(config, os.path.join(directory, CHECKPOINT_NAME), arrays))
    return tested


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's banners and warnings (devices, AMP, tips) kept out of the search's output while the driver tests the
    winner: a trial's go to its worker's log, and this is the driver's one Trainer."""
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def confirm_winner(
    spec: SearchSpec, rows: list[dict], data: ray.ObjectRef, part: int, extra: Sequence[tune.Callback] = ()
) -> tuple[dict | None, dict[str, Any]]:
    """--confirm TOP_KxSEEDS: the TOP_K best configs trained again with SEEDS new seeds each, as the trials of a
    second Tune experiment (confirm-<part> in the search's folder; restored if a killed driver left it), at the full
    max_t with the search's resources; each confirm trial tested. Returns the winner (the best run of the config
    with the best mean val metric, tested) and the per-config statistics."""
    top_k, seeds = spec.confirm
    config = spec.config
    chosen = confirm.candidates({"settings": config.settings(), "trials": rows}, top_k)
    points = confirm.trial_configs(chosen, seeds, config.max_t)
    name, where = f"confirm-{part}", tune_storage(spec)
    base = {"storage_path": f"{where['storage_path']}/{spec.name}", "storage_filesystem": where.get("storage_filesystem")}
    callbacks = [ResultLog(), CSVLoggerCallback(), CheckpointKeeper(), saved_state.WholeState(), *extra]
    wandb_callback = WandbTrialCallback(
        spec, job_type="confirm", labels=lambda trial: {confirm.ORIGIN_KEY: confirm.origin(trial.config, chosen)}
    )
    callbacks += [wandb_callback] if spec.wandb_mode != "disabled" else []
    function = trainable(spec, data)
    if tune.Tuner.can_restore(f"{base['storage_path']}/{name}", storage_filesystem=base["storage_filesystem"]):
        tuner, _ = restore(f"{base['storage_path']}/{name}", function, callbacks, config.max_t, set(), base["storage_filesystem"])
    else:
        tune_settings = tune.TuneConfig(
            metric=config.metric,
            mode=config.mode,
            num_samples=len(points),
            search_alg=BasicVariantGenerator(points_to_evaluate=points),  # exactly these configs, no early stopping
            reuse_actors=True,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        )
        run = run_config(spec, callbacks, name, base, stop=False)
        tuner = tune.Tuner(function, param_space=confirm.param_space(points), tune_config=tune_settings, run_config=run)
    with tune_environment(spec.output), kept_out(spec.wandb_mode):
        grid = tuner.fit()
    wandb_callback.finish_open_runs()
    confirmed = [confirmed_trial(result, spec, chosen) for result in grid]
    done = [trial for trial in confirmed if trial["done"] and trial["checkpoint"]]
    for trial, tested in zip(done, evaluate(done, spec, data), strict=True):
        trial.update(tested)
    summary = {**confirm.aggregate(chosen, confirmed, config.metric, config.mode), "top_k": top_k, "seeds": seeds}
    summary["experiment"], summary["interrupted"] = name, len(done) < len(points)
    if summary["interrupted"] or summary["winner"] is None:
        return None, summary
    runs = [trial for trial in summary["configs"][0]["runs"] if trial["checkpoint"]]
    sign = 1 if config.mode == "max" else -1
    best = max(runs, key=lambda trial: sign * trial["value"])
    winner = {
        key: best[key]
        for key in ("trial_id", "value", "epoch", "config", "precision", "checkpoint", "metrics", "test_acc", "test_loss")
    }
    return {
        **winner,
        "metric": config.metric,
        "replay": replay_command(with_precision(best["config"], best["precision"]), best["epoch"]),
        "confirm_of": summary["winner"],
    }, summary


def confirmed_trial(result: tune.Result, spec: SearchSpec, chosen: list[dict]) -> dict[str, Any]:
    """One confirm trial: the config it repeats, its seed, its best checkpoint by the metric with that epoch's metrics."""
    metric, (trial_id, _) = spec.config.metric, own_metrics(result)
    kept = [(c, m) for c, m in result.best_checkpoints or [] if finite(m.get(metric)) is not None]
    checkpoint, metrics = best_of(kept, metric, spec.config.mode) if kept else (None, {})
    return {
        "trial_id": trial_id,
        "origin": confirm.origin(result.config, chosen),
        "seed": result.config.get("seed"),
        "config": dict(result.config),
        "done": bool((result.metrics or {}).get("done")),
        "value": finite(metrics.get(metric)),
        "epoch": int(metrics.get("training_iteration", 0)),
        "precision": metrics.get("precision"),  # as its node resolved --precision auto
        "checkpoint": f"{checkpoint.path}/{CHECKPOINT_NAME}" if checkpoint else None,
        "metrics": {key: finite(metrics.get(key)) for key in FINAL_METRICS},
    }


def earlier_test(folder: Path, best: dict[str, Any]) -> dict[str, float] | None:
    """The test metrics of the same winner (trial and epoch), when an earlier end of this search evaluated it."""
    path = folder / SUMMARY_FILE
    earlier = (json.loads(path.read_text()).get("best") or {}) if path.is_file() else {}
    same = (earlier.get("trial_id"), earlier.get("epoch")) == (best["trial_id"], best["epoch"])
    return {key: earlier[key] for key in ("test_acc", "test_loss")} if same and earlier.get("test_acc") is not None else None


def local_winner(spec: SearchSpec, best: dict | None) -> dict | None:
    """With a URI storage: the winner's checkpoint downloaded into the search's local folder (predict and replay
    read a local file), its URI beside it."""
    if best is None or spec.storage is None:
        return best
    folder = storage.fetch(spec.storage, os.path.dirname(best["checkpoint"]), spec.folder)
    return {
        **best,
        "checkpoint": str(folder / CHECKPOINT_NAME),
        "checkpoint_uri": storage.uri_of(spec.storage, best["checkpoint"]),
    }


def put_data(arrays: dict[str, Any]) -> ray.ObjectRef:
    """Put the dataset into Ray's object store, once per search, and drop the driver's own copy: from here on
    every trial on a node reads the node's one copy without copying it."""
    ref = ray.put(arrays)
    arrays.clear()
    return ref


def trainable(spec: SearchSpec, data: ray.ObjectRef) -> Any:
    """What Tune runs per trial, with its resources: in the trial's actor (default) or in a fork."""
    if spec.trial_process == "fork":
        # a new key per search: a fork server never serves another search's data
        function = tune_actor.trainable_class(tune_actor.train_in_fork, arrays=data, data_key=uuid.uuid4().hex)
    else:
        function = tune_actor.trainable_class(tune_actor.train_in_actor, arrays=data)
    cpus, gpus = spec.resources
    return tune.with_resources(function, {"CPU": cpus, "GPU": gpus})


def tune_config(spec: SearchSpec) -> tune.TuneConfig:
    config = spec.config
    return tune.TuneConfig(
        metric=config.metric,
        mode=config.mode,
        num_samples=config.num_samples,
        scheduler=ResumableASHA(  # its rungs refilled on --resume (Tune saves no scheduler state)
            time_attr="training_iteration",
            max_t=config.max_t,
            grace_period=config.grace_period,
            reduction_factor=config.reduction_factor,
        ),
        search_alg=search_alg(spec),
        reuse_actors=True,  # a trial starts in a running actor: no new worker, no imports again
        # module functions, not lambdas: Tune's saved state holds both in every trial's entry, a lambda by value
        # (1.3 KB each, cloudpickled), a function by name
        trial_name_creator=trial_name,
        trial_dirname_creator=trial_name,
    )


def trial_name(trial: Any) -> str:
    """A trial's name and its folder's: trial_<id>."""
    return f"{TRIAL_PREFIX}{trial.trial_id}"


def search_alg(spec: SearchSpec) -> SearchAlgorithm:
    """The config's sampler, seeded by its seed: random (Tune's own) or Optuna's TPE (a model of the results so far),
    each one that a grown search raises to its new sample count when Tune restores it (grow.py)."""
    config = spec.config
    if config.search_alg == "random":
        return GrowingVariantGenerator(random_state=config.seed, max_concurrent=spec.max_concurrent or 0)
    import optuna  # only for searches that use it
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study and trial in the search's output
    pruned = {"max_t": config.max_t} if config.asha_stops_as == "pruned" else None  # what TPE hears of ASHA's stops
    if spec.warm_start:  # the earlier search's finished trials start the study (warm.py)
        from text_recognizer.search.warm import WarmOptunaSearch, earlier_trials

        warm = {"warm": earlier_trials(spec.warm_start, config.metric), "source": str(spec.warm_start)}
        if pruned:
            from text_recognizer.search.pruned import PrunedWarmOptunaSearch

            searcher = PrunedWarmOptunaSearch(seed=config.seed, **warm, **pruned)
        else:
            searcher = WarmOptunaSearch(seed=config.seed, **warm)
    elif pruned:
        from text_recognizer.search.pruned import PrunedOptunaSearch

        searcher = PrunedOptunaSearch(seed=config.seed, **pruned)
    else:
        searcher = OptunaSearch(seed=config.seed)  # TPE; metric and mode come from the TuneConfig
    limited = ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent) if spec.max_concurrent else searcher
    return GrowingSearchGenerator(limited)


def tune_storage(spec: SearchSpec) -> dict[str, Any]:
    """Where Tune keeps the search: a folder, or a URI's path with its pyarrow filesystem (Tune appends the search's
    name to the path, which a URI's query, e.g. an endpoint, would break)."""
    if spec.storage is None:
        return {"storage_path": str(spec.folder.parent)}
    filesystem, path = storage.open_uri(spec.storage)
    return {"storage_path": path, "storage_filesystem": filesystem}


def run_config(
    spec: SearchSpec,
    callbacks: list[tune.Callback],
    name: str | None = None,
    where: dict[str, Any] | None = None,
    stop: bool = True,
) -> tune.RunConfig:
    """The search's RunConfig; `name` and `where` (storage_path and storage_filesystem) for another experiment of
    the search (its --confirm stage, which `stop=False` gives no time budget)."""
    return tune.RunConfig(
        name=name or spec.name,
        **(where or tune_storage(spec)),
        callbacks=callbacks,
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=CHECKPOINTS_KEPT, checkpoint_score_attribute=spec.config.metric, checkpoint_score_order=spec.config.mode
        ),
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        # the time budget: each part of the search (grow.py) its own; Tune's time_budget_s can't change on restore
        stop=PartBudget() if stop else None,
        verbose=2 if spec.output == "tune" else 0,
    )


def replace_callbacks(tuner: tune.Tuner, callbacks: list[tune.Callback]) -> None:
    """Give a restored Tuner this driver's callbacks. Tune unpickles the first run's callbacks and has no public
    way to pass new ones to Tuner.restore; this reaches into Tuner's private state (tests/test_driver.py
    checks it, so a Ray upgrade that moves it fails loudly)."""
    local = getattr(tuner, "_local_tuner", None)
    if local is None or not hasattr(local, "get_run_config"):
        raise RuntimeError("this Ray release keeps a restored Tuner's run config elsewhere: update replace_callbacks")
    local.get_run_config().callbacks = callbacks


def open_folder(spec: SearchSpec) -> dict[str, Any]:
    """The search folder, ready for Tune (wiped first with --overwrite); returns the saved record of the search,
    its parts (a new one when the search grows) included."""
    if spec.overwrite and not spec.resume:  # only now: every check passed, the data loaded and Ray started
        shutil.rmtree(spec.folder, ignore_errors=True)
        if spec.storage:
            storage.delete(spec.storage, spec.name)
    unwritable = f"the search folder {spec.folder} can't be written"
    patiently(lambda: spec.folder.mkdir(parents=True, exist_ok=True), unwritable)
    if spec.resume and spec.storage and not (spec.folder / SEARCH_FILE).is_file():  # resumed on another machine
        storage.download(spec.storage, spec.folder, storage.is_driver_file)
    previous = json.loads((spec.folder / SEARCH_FILE).read_text()) if spec.resume else {}
    parts = [dict(part) for part in previous.get("parts", [])]
    if previous and not parts:  # saved before searches grew: one part so far, with its wall seconds
        parts = [{**new_part(spec), "started": None, "wall_seconds": previous.get("wall_seconds", 0.0)}]
    if spec.grow or not parts:  # a new search, or one that grows: a new part, with its sample count and budget
        parts.append(new_part(spec))
    record = {
        **spec.saved(),
        "wall_seconds": previous.get("wall_seconds", 0.0),
        "sweep_id": previous.get("sweep_id"),
        "parts": parts,
        "budget_stopped": previous.get("budget_stopped", []),  # trials an earlier part's budget stopped
    }
    if spec.wandb_mode == "online" and not record["sweep_id"]:  # offline, `sync FOLDER` makes the sweep later
        record["sweep_id"] = create_sweep(sweep_config(spec.name, spec.config), spec.wandb_project)
    patiently(lambda: write_whole(spec.folder / SEARCH_FILE, json.dumps(record, indent=2)), unwritable)
    if spec.storage:  # from now on --resume works from the URI alone
        patiently(lambda: storage.upload_driver_files(spec.folder, spec.storage), f"{spec.storage} can't be written")
    return record


def new_part(spec: SearchSpec) -> dict[str, Any]:
    """A part of the search: when it began, the sample count it runs to, its time budget, its wall seconds so far."""
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    config = spec.config
    return {"started": started, "num_samples": config.num_samples, "time_budget": config.time_budget, "wall_seconds": 0.0}


def restore(
    experiment: str, function: Any, callbacks: list[tune.Callback], max_t: int, stopped: set[str], filesystem: Any = None
) -> tuple[tune.Tuner, saved_state.Repair]:
    """The Tuner of a saved search, from its newest state that reads (saved_state), with these callbacks, and what
    saved_state.repair made of that state: its unfinished and errored trials go on, and so do those it ended early
    without an end (`stopped`: the ones a time budget stopped, which stay stopped); those pruned after their end
    stay ended."""
    unwritable = f"the saved state at {experiment} can't be repaired"
    if warning := patiently(lambda: saved_state.restorable(experiment, filesystem), unwritable):
        print(warning, file=sys.stderr, flush=True)
    repaired = patiently(lambda: saved_state.repair(experiment, max_t, stopped, filesystem), unwritable)
    for warning in repaired.warnings:
        print(warning, file=sys.stderr, flush=True)
    tuner = tune.Tuner.restore(experiment, function, resume_unfinished=True, resume_errored=True, storage_filesystem=filesystem)
    replace_callbacks(tuner, callbacks)
    return tuner, repaired


def fit(spec: SearchSpec, data: ray.ObjectRef, extra: Sequence[tune.Callback] = ()) -> tuple[tune.ResultGrid, TrialClock, dict]:
    """Build the Tuner (or restore it, with --resume) and fit it; returns its ResultGrid, the trials' start clock
    and the search's saved record (its wall seconds over all its drivers, its parts, its W&B sweep)."""
    record = open_folder(spec)
    if spec.wandb_mode == "offline" and spec.output != "quiet":
        print(f"W&B runs are offline; watch them live with:  {leet_command(str(spec.folder))}", flush=True)
    function = trainable(spec, data)
    clock, wandb_callback, keeper = TrialClock(), WandbTrialCallback(spec, record["sweep_id"]), CheckpointKeeper()
    callbacks = [ResultLog(), CSVLoggerCallback(), clock, keeper, saved_state.WholeState(), *extra]
    callbacks += [wandb_callback] if spec.wandb_mode != "disabled" else []
    if spec.output == "progress":
        config = spec.config
        callbacks.append(Progress(config.metric, config.mode, config.max_t, list(config.space)))
    failfast = FailFast(min(FIRST, spec.config.num_samples))
    callbacks.append(failfast)  # last: a failed trial's run and line come first
    # a resume: the trials Tune restores, those it ended again and those with a folder, for its sampler (grow.Part)
    restored, ended, taken = None, {}, set()
    if spec.resume:
        where = tune_storage(spec)
        experiment, filesystem = f"{where['storage_path']}/{spec.name}", where.get("storage_filesystem")
        tuner, repaired = restore(experiment, function, callbacks, spec.config.max_t, set(record["budget_stopped"]), filesystem)
        restored, ended, taken = repaired.trial_ids, repaired.ended, repaired.folders
    else:
        tuner = tune.Tuner(
            function, param_space=spec.config.param_space(), tune_config=tune_config(spec), run_config=run_config(spec, callbacks)
        )
    part, began = record["parts"][-1], time.time()
    # when this part's budget runs out: what it has left (a resumed part) from now
    deadline = began + part["time_budget"] - part["wall_seconds"] if part["time_budget"] is not None else None
    wandb_callback.deadline = deadline
    preload_testing()
    try:
        part_settings = this_part(spec.config.num_samples, deadline, restored, ended, taken)
        with tune_environment(spec.output), kept_out(spec.wandb_mode), part_settings:
            grid = tuner.fit()
    finally:  # also when FailFast stopped the search
        wandb_callback.finish_open_runs()  # an interrupted search leaves none open: --resume takes them over
    failfast.check()  # the first trials failed before any epoch: SearchCannotTrain, one line, exit 1
    keeper.prune_ended()  # the ended trials' checkpoints: Tune's final state, saved, no longer names them
    elapsed = time.time() - began
    record["wall_seconds"] += elapsed
    part["wall_seconds"] += elapsed
    if budget_spent(part):  # the trials it stopped stay stopped_by_budget (or not_started) in every later part
        record["budget_stopped"] = sorted(set(record["budget_stopped"]) | unfinished(grid, spec.config.max_t, clock.live))
    write_whole(spec.folder / SEARCH_FILE, json.dumps(record, indent=2))
    if spec.storage:  # the trials' logs (not their checkpoints) for the results and the report
        storage.download(spec.storage, spec.folder, storage.is_trial_file)
    # ended trials whose run missed a write here, or that a killed driver left without its end
    if spec.wandb_mode == "offline" and (spec.resume or wandb_callback.damaged):
        rewritten = wandb_callback.rewrite_runs(collect(grid, spec, clock.ready, set(record["budget_stopped"]), clock.live)[0])
        if rewritten:
            print(f"W&B: {len(rewritten)} trial runs written again from Tune's results", file=sys.stderr)
    return grid, clock, record


class TuneStopLines(logging.Filter):
    """Drops tune.run's own lines about a stopped experiment."""

    STARTS = ("Stop signal received", "Trials did not complete", "Experiment has been interrupted")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.STARTS)


@contextmanager
def tune_environment(output: str) -> Iterator[None]:
    """Tune settings that only exist as environment variables (and one logger's level), for the duration of one search."""
    values = {
        # Tune's newer console output prints a settings box even at verbose=0: only --verbose wants Tune's output
        "RAY_AIR_NEW_OUTPUT": "1" if output == "tune" else "0",
        "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # JSON and CSV are given explicitly: no TensorBoard files per trial
        # a failed trial's traceback stays in its error.txt; FailFast prints one line for it instead
        "TUNE_PRINT_ALL_TRIAL_ERRORS": "1" if output == "tune" else "0",
        # ...and Ray's driver would print it again, for the failed trial's result that Tune never fetched
        "RAY_IGNORE_UNHANDLED_ERRORS": None if output == "tune" else "1",
        # a snapshot per checkpoint is what makes --resume lose nothing; don't warn about its cost
        "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    }
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update({key: value for key, value in values.items() if value is not None})
    # a trial that never started (the time budget ended the search first) has no results: Tune warns of each one,
    # a line a trial, when it builds the ResultGrid; summary.json counts them as not_started
    analysis = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = analysis.level
    analysis.setLevel(logging.ERROR)
    # a stopped search (Ctrl-C, SIGTERM, FailFast) says itself what happened and how to resume: not Tune's lines
    # ("Stop signal received ... Ctrl+C", "Resume experiment with: Tuner.restore(...)"), wrong for our commands
    tune_log, interrupted = logging.getLogger("ray.tune.tune"), TuneStopLines()
    if output != "tune":
        tune_log.addFilter(interrupted)
    try:
        with retrying_resets():  # a trial whose reused actor dies as it is handed over is retried, not failed
            yield
    finally:
        analysis.setLevel(level)
        tune_log.removeFilter(interrupted)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
