"""The W&B sweep of a search, as far as it goes without a W&B server: the sweep config, what each trial run carries,
the prior-run ids and the sync command. The server calls (create_sweep, stop_sweep, wandb sync) are not run against
a server here: the failure paths run against a stand-in CLI that fails as one without a server does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import wandb
from conftest import runs_written_here

from text_recognizer.search.config import CONFIGS_DIR, load_config
from text_recognizer.search.spec import SearchSpec
from text_recognizer.search.tracking.sweep import prior_run_ids, stop_sweep, sweep_config, wandb_sync_argv
from text_recognizer.search.tracking.wandb_logging import WandbTrialCallback, init_run, run_settings

ROOT = Path(__file__).resolve().parents[1]

YAML = """
metric: val_loss
mode: min
scheduler: {max_t: 6}
fixed: {data_class: FashionMNIST, limit_train_batches: 8}
space:
  fc1: {choice: [16, 64]}
  fc2: {randint: [8, 33]}
  dropout: {uniform: [0.0, 0.5]}
  lr: {loguniform: [1.0e-4, 1.0e-2]}
  optimizer: {grid: [Adam, SGD]}
"""


@pytest.fixture
def config(tmp_path: Path):
    (tmp_path / "s.yaml").write_text(YAML)
    return load_config(tmp_path / "s.yaml")


def test_the_sweep_mirrors_the_search_space(config) -> None:
    sweep = sweep_config("my-search", config)
    assert sweep["name"] == "my-search" and sweep["method"] == "random"
    assert sweep["metric"] == {"name": "val_loss", "goal": "minimize"}
    assert sweep["parameters"] == {
        "fc1": {"values": [16, 64]},
        "fc2": {"distribution": "int_uniform", "min": 8, "max": 32},  # randint's high is exclusive, W&B's max is not
        "dropout": {"distribution": "uniform", "min": 0.0, "max": 0.5},
        "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
        "optimizer": {"values": ["Adam", "SGD"]},
        "data_class": {"value": "FashionMNIST"},
        "limit_train_batches": {"value": 8},
        "max_epochs": {"value": 6},
    }
    # the parameters are the keys of a trial's config, so the sweep's panels find them in every run
    assert set(sweep["parameters"]) == set(config.param_space())


def test_trial_runs_carry_the_sweep_in_their_settings_and_never_from_the_environment(
    tmp_path: Path, config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The settings a trial run gets online put it in the sweep (its run record names it: written offline here, as
    the server would receive it); WANDB_SWEEP_ID stays unset, and offline runs of a search carry no sweep."""
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    assert run_settings("abc123").sweep_id == "abc123" and run_settings(None).sweep_id is None
    for run_id, sweep_id in (("s-online", "abc123"), ("s-offline", None)):
        run = init_run(sweep_id, project="p", id=run_id, group="s", dir=str(tmp_path), mode="offline", config={"fc1": 16})
        run.finish()
    runs = {run.id: run for run in runs_written_here(tmp_path)}
    assert runs["s-online"].sweep_id == "abc123" and runs["s-online"].config["fc1"] == 16
    assert runs["s-offline"].sweep_id == ""
    assert "WANDB_SWEEP_ID" not in os.environ
    spec = SearchSpec("s", tmp_path / "s", config, "offline", "p", None, None)
    assert WandbTrialCallback(spec).sweep_id is None  # the driver creates a sweep only online


def test_prior_runs_and_the_sync_command_name_every_trial_run_once(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    for run_id, job_type in (("s-t1", "trial"), ("s-t2", "trial"), ("s-summary", "summary")):  # as the driver starts them
        run = init_run(project="p", id=run_id, group="s", job_type=job_type, dir=str(folder), mode="offline", config={"fc1": 16})
        run.log({"val_loss": 0.5})
        run.finish()
    wandb.teardown()  # finish() can return before W&B's service wrote the last records: wait for it
    (folder / "wandb" / "superseded" / "offline-run-old-s-t1").mkdir(parents=True)  # a killed driver's, never synced
    assert prior_run_ids(folder) == ["s-t1", "s-t2"]  # the summary run is not a trial of the sweep
    command = wandb_sync_argv(folder)
    assert command[:2] == ["wandb", "sync"] and len(command) == 5
    dry = subprocess.run([command[0], command[1], "--dry-run", *command[2:]], capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert sorted(line.rsplit("-", 2)[-2] + "-" + line.rsplit("-", 1)[-1] for line in command[2:]) == [
        "s-summary",
        "s-t1",
        "s-t2",
    ]


def test_an_optuna_search_is_a_bayes_sweep(config) -> None:
    """W&B's sweep page names the method: Optuna's TPE is a Bayesian optimisation, "bayes" in W&B's words."""
    assert sweep_config("s", replace(config, search_alg="optuna"))["method"] == "bayes"
    assert sweep_config("s", replace(config, search_alg="random"))["method"] == "random"


@pytest.fixture
def failing_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `wandb` CLI that fails as one without a server does: no W&B server can be reached from here."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "wandb").write_text("#!/bin/sh\necho 'wandb: ERROR cannot reach the server' >&2\nexit 1\n")
    (bin_dir / "wandb").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_a_failed_sweep_stop_is_a_one_line_warning(failing_wandb, capsys: pytest.CaptureFixture) -> None:
    stop_sweep("abc123", "p")  # returns: the search's results are written by then
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sweep abc123 was not stopped (wandb: ERROR cannot reach the server)" in err
    assert "wandb sweep --stop --project p abc123" in err


def test_a_failed_upload_is_a_one_line_error(failing_wandb, tmp_path: Path, config) -> None:
    """`sync FOLDER` whose wandb sync fails: exit 2 and one line of ours (no traceback), no sweep created."""
    folder = tmp_path / "s"
    (folder / "wandb" / "offline-run-1-s-t1").mkdir(parents=True)
    (folder / "search.json").write_text(json.dumps({"config": asdict(config), "wandb_project": "p"}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "search/tune_mlp.py"), "sync", str(folder)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        "tune_mlp.py sync: error: wandb sync failed (exit status 1): no sweep was created; fix the above and run sync again"
    )


def schema_violations(sweep: dict) -> list[str]:
    """What W&B's own sweep engine (the `sweeps` package, its config schema) finds wrong with a sweep config."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sweeps 0.2 configures pydantic with v1 names: a warning at import
        from sweeps.config import schema_violations_from_proposed_config

        return schema_violations_from_proposed_config(sweep)


@pytest.mark.parametrize("path", [*sorted(CONFIGS_DIR.glob("*.yaml")), None], ids=lambda p: p.stem if p else "test-space")
@pytest.mark.parametrize("search_alg", ["random", "optuna"])
def test_w_and_b_s_sweep_engine_accepts_every_shipped_sweep(path: Path | None, search_alg: str, config) -> None:
    searched = replace(load_config(path) if path else config, search_alg=search_alg)
    if path is None and search_alg == "optuna":
        searched = replace(searched, space={k: v for k, v in searched.space.items() if "grid" not in v})
    assert schema_violations(sweep_config("s", searched)) == []


def test_w_and_b_s_sweep_engine_refuses_what_w_and_b_would(config) -> None:
    """The check can fail: a method W&B lacks and the base-e log_uniform, which our loguniform is not."""
    sweep = sweep_config("s", config)
    assert schema_violations({**sweep, "method": "tpe"})
    assert schema_violations({**sweep, "parameters": {"lr": {"distribution": "log_uniform", "min": 1e-4, "max": 1e-2}}})
