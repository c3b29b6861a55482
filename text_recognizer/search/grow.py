"""Runs in the driver: what lets a search grow (more samples, another time budget) and still be one Tune experiment.

Why a restored Tuner and not a new experiment seeded with the earlier results: Tune's restore already brings back
everything a grown search must continue from: the random sampler's seeded stream where it stopped, the Optuna
study with every trial, its values and intermediate values, the trials with their checkpoints and W&B run ids.
A second experiment would have to rebuild each of those by hand (fast-forward the random stream, copy the study,
keep two experiment states apart in one folder, merge two ResultGrids). Restoring keeps one experiment, one
ResultGrid, and `--resume` after a kill works as for any search. What Tune lacks, and this module adds:

- the sample count rises on restore: Tune restores its search algorithm's state (num_samples included) inside
  `Tuner.fit`, after the Tuner's own TuneConfig was read, so no public setting reaches it. GrowingVariantGenerator
  and GrowingSearchGenerator raise it right after Tune restored them, to the count the driver set for this part
  (`this_part`). That is the one private reach: `raise_samples` and `raise_searcher_samples` (tests/test_grow.py
  fails loudly if a Ray release moves what they touch).
- a time budget per part: Tune's own budget (TuneConfig.time_budget_s) is a stopper whose remaining seconds are
  saved with the experiment and restored over any new one. PartBudget instead stops at the deadline the driver
  set for this fit, so a grown part gets its own budget and a resumed part what was left of its own.
- the sampler agrees with the trials: Tune saves the trials (experiment_state) and the search algorithm in two
  files, copied to storage by a background sync that the next save does not wait for (so one copy can hold the
  trials of one save and the sampler of the next), and restores the search algorithm from the driver's staging
  folder, which can hold a newer one. A driver killed then leaves a sampler that drew trials the saved state never
  had (the long chaos run: 998 trials, the sampler at 1,000, a search that could never end). On restore its count
  goes back to the trials Tune restored (`Part.restored`), so it draws the lost ones again (`reconcile_samples`,
  `reconcile_searcher_samples`, the same private reach as the sample count's).
- the study knows every trial Tune restored: the limit's state and the study's are two more files of a save, and
  a killed driver's copy can leave them older than the trials'. A restored trial the study lacks joins it, with
  its config, at its first result (`adopt_in_searcher`), as Tune would otherwise fail the resume on a KeyError.
- the sampler hears of the trials a resume ended again (`end_in_sampler`): a state older than a trial's end
  (saved_state.repair) restores a sampler that still waits for it, and Tune never tells it.
- ASHA's rungs survive a restore: Tune never saves the scheduler's state, so a restored ASHA would judge new trials
  against empty rungs. ResumableASHA refills each restored trial's rungs from its result.json.

The driver runs one search at a time, so this part's settings are class attributes of `Part`, set around
`tuner.fit()`: the objects Tune unpickles on restore (the stopper, the search algorithm) find them there.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.search_generator import SearchGenerator
from ray.tune.stopper import Stopper
from ray.tune.utils import flatten_dict


class Part:
    """This driver's part of the search: the sample count it grows to and when its time budget runs out."""

    num_samples: int | None = None
    deadline: float | None = None
    restored: frozenset[str] | None = None  # the ids of the trials in the saved state Tune restores (a resume)
    taken: frozenset[str] = frozenset()  # the ids of the trials with a folder on storage (a resume): never made again
    ended: Mapping[str, dict] = {}  # the final results of trials the resume ended again (saved_state.repair)


@contextmanager
def this_part(
    num_samples: int,
    deadline: float | None,
    restored: Collection[str] | None = None,
    ended: Mapping[str, dict] | None = None,
    taken: Collection[str] = (),
) -> Iterator[None]:
    Part.num_samples, Part.deadline = num_samples, deadline
    Part.restored = frozenset(restored) if restored is not None else None
    Part.ended, Part.taken = dict(ended or {}), frozenset(taken)
    try:
        yield
    finally:
        Part.num_samples, Part.deadline, Part.restored, Part.ended, Part.taken = None, None, None, {}, frozenset()


def has_time() -> bool:
    """Whether this part may start trials: it has no deadline, or its deadline is still ahead. Tune marks a search
    algorithm finished when a stopper ends the experiment (a spent time budget), samples left or not; a part with
    time reopens it, and one whose budget is spent leaves it finished."""
    return Part.deadline is None or time.time() < Part.deadline


def raise_samples(generator: BasicVariantGenerator, num_samples: int, reopen: bool = True) -> int:
    """Private reach: let a restored random sampler draw up to `num_samples` samples, continuing its seeded stream
    (the same numpy generator, pickled with its state); `reopen`: draw the samples left even if a spent budget marked
    it finished (a search grown by --time-budget alone). Returns the samples added."""
    iterators = getattr(generator, "_iterators", None)
    if not iterators or not all(hasattr(iterators[-1], key) for key in ("num_samples", "num_samples_left")):
        raise RuntimeError("this Ray release keeps BasicVariantGenerator's sample count elsewhere: update raise_samples")
    last = iterators[-1]
    extra = max(0, num_samples - last.num_samples)
    per_sample = max(1, generator._total_samples // max(1, last.num_samples))  # a grid's variants per sample
    last.num_samples += extra
    last.num_samples_left += extra
    generator._total_samples += extra * per_sample
    if extra or (reopen and last.num_samples_left > 0):
        generator._finished = False  # it draws what is left, and marks itself finished once it runs out
    return extra


def raise_searcher_samples(generator: SearchGenerator, num_samples: int, reopen: bool = True) -> int:
    """Private reach: let a restored model-based search (Optuna's) ask for up to `num_samples` trials; its searcher
    (the study, all earlier trials in it) is as Tune restored it; `reopen` as for raise_samples. Returns the
    samples added."""
    state = generator.get_state()
    if not {"total_samples", "finished"} <= set(state):
        raise RuntimeError("this Ray release keeps SearchGenerator's sample count elsewhere: update raise_searcher_samples")
    extra = max(0, num_samples - state["total_samples"])
    finished = state["finished"] and not (extra or (reopen and state["counter"] < state["total_samples"]))
    generator.set_state({**state, "total_samples": state["total_samples"] + extra, "finished": finished})
    return extra


def reconcile_samples(generator: BasicVariantGenerator, restored: Collection[str], taken: Collection[str] = ()) -> int:
    """Private reach: a restored random sampler made to agree with the trials Tune restored (`restored`, their ids:
    <prefix><5-digit index>). Its samples left are set to its sample count less those trials, so it draws the lost
    ones again; set, not raised by the trials it lacks: the long chaos run restored one state in 5 resumes in a row,
    each drew its 3 lost trials again, and the search sampled 2,233 trials for 2,200. It goes on under new ids, never
    one it made before nor one with a folder on storage (`taken`): a lost trial's folder holds its rows and
    checkpoints, which a new trial must not resume from. Returns the change in samples left."""
    iterators = getattr(generator, "_iterators", None)
    if not iterators or not all(hasattr(iterators[-1], key) for key in ("counter", "uuid_prefix", "num_samples_left")):
        raise RuntimeError("this Ray release keeps BasicVariantGenerator's trial count elsewhere: update reconcile_samples")
    last = iterators[-1]
    if len(iterators) > 1 or max(1, generator._total_samples // max(1, last.num_samples)) > 1:
        return 0  # a grid (several variants a sample) or several configurations: a trial is no sample; left as it is
    prefix = last.uuid_prefix
    index = {
        tid: int(tid[len(prefix) :]) for tid in {*restored, *taken} if tid.startswith(prefix) and tid[len(prefix) :].isdigit()
    }
    has = sum(tid in index for tid in restored)
    change = max(0, last.num_samples - has) - last.num_samples_left
    last.num_samples_left += change
    counter = max(last.counter, max(index.values(), default=-1) + 1)
    if counter != last.counter:
        last.counter, last.variants = counter, None
    generator._live_trials = {tid for tid in generator._live_trials if tid in restored}
    return change


def reconcile_searcher_samples(generator: SearchGenerator, restored: Collection[str]) -> int:
    """Private reach: a restored model-based search's count of trials made set to the trials Tune restored; the
    ones its concurrency limit still counts as running and Tune lost end as errored in the searcher (Optuna marks
    them failed), or the limit would wait for them forever. Returns the trials it makes again (negative: skipped)."""
    state = generator.get_state()
    if "counter" not in state:
        raise RuntimeError("this Ray release keeps SearchGenerator's trial count elsewhere: update reconcile_searcher_samples")
    lost = state["counter"] - len(restored)
    if lost:
        generator.set_state({**state, "counter": len(restored)})
    for trial_id in set(getattr(generator.searcher, "live_trials", ())) - set(restored):
        generator.on_trial_complete(trial_id, error=True)  # a study that lacks it too: only the limit lets go
    return lost


def end_in_sampler(generator: BasicVariantGenerator | SearchGenerator, ended: Mapping[str, dict]) -> list[str]:
    """Tell a restored sampler that these trials ended, with their final results, where it still waits for them:
    its saved state may be as old as the trials' (saved_state.repair ended them again), and Tune, which restores
    them ended, never tells it. A random sampler forgets them (public and idempotent); a concurrency limit (a
    ConcurrencyLimiter's live trials) passes them on to its searcher, as Tune would have, or would wait for them
    forever. Without a limit nothing waits: Optuna's study keeps them running, without their values. Returns the
    ids it told."""
    live = set(getattr(generator.searcher, "live_trials", ())) if isinstance(generator, SearchGenerator) else set(ended)
    told = [trial_id for trial_id in ended if trial_id in live]
    for trial_id in told:
        generator.on_trial_complete(trial_id, result=ended[trial_id])
    return told


class GrowingVariantGenerator(BasicVariantGenerator):
    """Tune's random sampler, made to agree with the trials Tune restored and raised to this part's sample count
    whenever Tune restores it."""

    def restore_from_dir(self, dirpath: str) -> None:
        super().restore_from_dir(dirpath)
        end_in_sampler(self, Part.ended)
        if Part.restored is not None:
            reconcile_samples(self, Part.restored, Part.taken)
        if Part.num_samples:
            raise_samples(self, Part.num_samples, reopen=has_time())


def adopt_in_searcher(generator: SearchGenerator, trial_id: str, result: Mapping[str, Any] | None) -> bool:
    """Private reach: make a trial that Tune restored and its Optuna study lacks one of the study's, with the
    config Tune's flattened `result` holds (config/<key>), counted running by its concurrency limit, so that what
    Tune tells of it reaches the study. Tune saves the trials, the limit and the study in three files, which a
    killed driver's copy to storage can leave from different saves (CI, test_optuna_search_killed_then_resumed: a
    KeyError in OptunaSearch.on_trial_result ended the resume). Returns whether the searcher may hear of the trial:
    True for one it knows (now) and for a searcher that is not Optuna's; False for a result without the config (a
    trial that failed before its first result), which only frees its slot in the limit."""
    wrappers, searcher = [], generator.searcher
    while hasattr(searcher, "searcher"):  # a ConcurrencyLimiter (Tune's wrappers all keep the wrapped one there)
        wrappers.append(searcher)
        searcher = searcher.searcher
    known = getattr(searcher, "_ot_trials", None)
    if known is None or trial_id in known or trial_id in searcher._completed_trials:
        return True
    limits = [wrapper for wrapper in wrappers if getattr(wrapper, "_limit_concurrency", False)]
    flat = flatten_dict(dict(result or {}))  # Tune's results come flat; an ended.json's (end_in_sampler) nested
    params = {key: flat.get(f"config/{key}") for key in searcher._space}
    if None in params.values():
        for limit in (limit for limit in limits if trial_id in limit.live_trials):
            limit.live_trials.discard(trial_id)
            limit.num_unfinished_live_trials -= 1
        return False
    searcher._ot_study.enqueue_trial(params)  # the restored trial's values, asked back as they are
    known[trial_id] = searcher._ot_study.ask(fixed_distributions=searcher._space)
    for limit in (limit for limit in limits if trial_id not in limit.live_trials):
        limit.live_trials.add(trial_id)
        limit.num_unfinished_live_trials += 1
    return True


class GrowingSearchGenerator(SearchGenerator):
    """Tune's wrapper of a Searcher (OptunaSearch), made to agree with the trials Tune restored and raised to this
    part's sample count whenever Tune restores it; a restored trial its study lacks is adopted (adopt_in_searcher)."""

    def restore_from_dir(self, dirpath: str) -> None:
        super().restore_from_dir(dirpath)
        end_in_sampler(self, Part.ended)
        if Part.restored is not None:
            reconcile_searcher_samples(self, Part.restored)
        if Part.num_samples:
            raise_searcher_samples(self, Part.num_samples, reopen=has_time())

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if adopt_in_searcher(self, trial_id, result):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if adopt_in_searcher(self, trial_id, result):
            super().on_trial_complete(trial_id, result, error)


class PartBudget(Stopper):
    """Stops every trial (and the search) once this part's deadline passes; no deadline, no stop."""

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return Part.deadline is not None and time.time() >= Part.deadline


def stored_history(trial: Any) -> list[dict[str, Any]]:
    """A trial's results as Tune stored them (result.json, a line an epoch), through the trial's own storage
    filesystem (a folder or a URI); [] when it has none."""
    try:
        with trial.storage.storage_filesystem.open_input_stream(f"{trial.path}/result.json") as stream:
            text = stream.readall().decode()
    except (OSError, RuntimeError):  # no file yet (a new trial), or no trial folder
        return []
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]


class ResumableASHA(ASHAScheduler):
    """ASHA whose rungs a restore refills: a restored trial's results go into its bracket as ASHA recorded them
    the first time (the first result at or past each milestone), so new trials meet the rungs earlier ones filled."""

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        if not trial.has_reported_at_least_once:
            return
        bracket = self._trial_info[trial.trial_id]
        for result in stored_history(trial):
            value = result.get(self._metric)
            if self._time_attr in result and isinstance(value, (int, float)) and not math.isinf(value):
                bracket.on_result(trial, result[self._time_attr], self._metric_op * value)  # records; no decision


def rung_values(scheduler: ResumableASHA) -> list[dict[str, float]]:
    """The values recorded at each rung of the first bracket, lowest rung first (for tests and debugging)."""
    return [dict(recorded) for _, recorded in reversed(scheduler._brackets[0]._rungs)]
