"""The driver's dealings with Ray: the dataset goes to the object store once, a restored Tuner gets this driver's
callbacks. On a real local Ray cluster (one CPU)."""

from __future__ import annotations

import gc
import io
import sys
import weakref
from pathlib import Path

import numpy as np
import ray
from ray import tune

from text_recognizer.search.driver import put_data, replace_callbacks
from text_recognizer.search.outputs.progress import Progress


def test_the_driver_drops_its_arrays_once_they_are_in_the_object_store(local_ray: None) -> None:
    arrays = {"x_train": np.arange(1000, dtype=np.float32).reshape(10, 100), "y_train": np.arange(10)}
    expected = {name: array.copy() for name, array in arrays.items()}
    alive = [weakref.ref(array) for array in arrays.values()]
    ref = put_data(arrays)
    gc.collect()
    assert arrays == {} and not any(alive_ref() for alive_ref in alive)  # the driver holds no copy
    stored = ray.get(ref)
    assert all(np.array_equal(stored[name], expected[name]) for name in expected)
    assert not stored["x_train"].flags.writeable  # a view of the shared object store, not a copy


def report_once(config: dict) -> None:
    tune.report({"score": config["x"]})


def report_epochs(config: dict) -> None:
    for epoch in range(1, config["epochs"] + 1):
        tune.report({"val_acc": config["x"] * epoch, "diverged": False})


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers can't import this test module


class Seen(tune.Callback):
    def __init__(self) -> None:
        self.ended = 0

    def on_experiment_end(self, trials: list, **info) -> None:
        self.ended += len(trials)


def test_a_restored_tuner_calls_the_new_callbacks(local_ray: None, tmp_path: Path) -> None:
    """Tune.restore has no public way to take new callbacks; replace_callbacks is it (fails loudly if Ray moves it)."""
    first = Seen()
    config = tune.RunConfig(name="r", storage_path=str(tmp_path), callbacks=[first], verbose=0)
    grid = tune.Tuner(report_once, param_space={"x": tune.grid_search([1, 2])}, run_config=config).fit()
    assert first.ended == 2 and not grid.errors
    restored = tune.Tuner.restore(str(tmp_path / "r"), report_once)
    second = Seen()
    replace_callbacks(restored, [second])
    grid = restored.fit()
    assert second.ended == 2 and not grid.errors and sorted(result.metrics["score"] for result in grid) == [1, 2]


def test_progress_prints_a_line_per_finished_trial_and_where_the_search_stands(local_ray: None, tmp_path: Path) -> None:
    out = io.StringIO()
    progress = Progress("val_acc", "max", max_t=3, params=["x"], file=out, every=0.0)
    config = tune.RunConfig(name="p", storage_path=str(tmp_path), callbacks=[progress], verbose=0)
    space = {"x": tune.grid_search([0.1, 0.2]), "epochs": 3}
    tune.Tuner(report_epochs, param_space=space, run_config=config).fit()
    lines = out.getvalue().splitlines()
    finished = [line for line in lines if " trial " in line]
    assert len(finished) == 2 and all("completed" in line and "3 epochs" in line for line in finished)
    assert {line.split("x=")[1] for line in finished} == {"0.1", "0.2"}
    status = [line for line in lines if " done, " in line]
    assert status and "best val_acc 0.6000" in status[-1] and "| 6 epochs |" in status[-1]
    assert not any("config" in line or "pid" in line for line in lines)  # no Tune internals
