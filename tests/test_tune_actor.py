"""A reused Tune actor that can't take the next trial says where the last trial's thread is: real Ray, a real
function trainable and its session, in this process."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from ray import tune
from ray.train._internal.storage import StorageContext

from text_recognizer.search.trial import tune_actor


def two_epochs(config: dict, pause: float) -> None:
    """A trial whose thread takes `pause` seconds to wind down once Tune stops it (its `finally`)."""
    try:
        tune.report({"epoch": 1})
        tune.report({"epoch": 2})
    finally:
        time.sleep(pause)


def reset_after_one_epoch(tmp_path: Path, pause: float) -> bool:
    trainable = tune_actor.trainable_class(two_epochs, pause=pause)(
        config={}, storage=StorageContext(storage_path=str(tmp_path), experiment_dir_name="e", trial_dir_name="t")
    )
    try:
        assert trainable.train()["epoch"] == 1
        return trainable.reset_config({})  # what Tune calls to reuse the actor for the next trial
    finally:
        trainable.stop()  # ends the session: one at a time in a process


def test_a_reset_that_fails_prints_where_the_last_trials_thread_is(
    local_ray: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TUNE_FUNCTION_THREAD_TIMEOUT_S", "1")
    assert reset_after_one_epoch(tmp_path, pause=4) is False
    err = capfd.readouterr().err
    assert "had not ended 1 s after Tune stopped it" in err
    assert "in two_epochs" in err and "time.sleep(pause)" in err


def test_a_reset_that_succeeds_prints_nothing(
    local_ray: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TUNE_FUNCTION_THREAD_TIMEOUT_S", "5")
    assert reset_after_one_epoch(tmp_path, pause=0.1) is True
    assert "warning" not in capfd.readouterr().err


def test_the_trainable_keeps_the_functions_name() -> None:
    assert tune_actor.trainable_class(two_epochs, pause=0).__name__ == "two_epochs"
