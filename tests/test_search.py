"""End-to-end searches on a real local Ray cluster, with real W&B offline files read back, in both trial modes."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import ROOT, TRIAL_PROCESSES, finish, results, summary_of

from text_recognizer.data.mnist import FashionMNIST
from text_recognizer.search.tracking.sweep import prior_run_ids, wandb_sync_argv
from text_recognizer.search.tracking.wandb_files import offline_runs
from text_recognizer.training import fit_and_test, parse_args, resolve_precision

pytestmark = pytest.mark.slow  # minutes: real Ray searches

SEARCH_YAML = """
metric: val_acc
mode: max
seed: 3
scheduler: {max_t: 4, grace_period: 1, reduction_factor: 2}
fixed: {data_class: FashionMNIST, limit_train_batches: 8}
space:
  fc1: {choice: [16, 64]}
  fc2: {choice: [8, 32]}
  lr: {loguniform: [1.0e-4, 3.0e-2]}
  optimizer: {choice: [Adam, SGD]}
"""


@pytest.fixture(scope="module", params=TRIAL_PROCESSES)
def search(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, launch_search) -> tuple[Path, dict, str]:
    """A 6-trial ASHA search on real Fashion-MNIST (8 batches per epoch), run once per trial mode."""
    tmp = tmp_path_factory.mktemp("search")
    # one trial at a time makes ASHA's decisions independent of timing: later trials meet full rungs
    flags = ["--num-samples", "6", "--max-concurrent", "1", "--trial-process", request.param]
    stdout = finish(launch_search(tmp, "e2e", SEARCH_YAML, *flags))
    return tmp / "e2e", summary_of(tmp / "e2e"), stdout


def test_summary_lists_every_trial_and_asha_stopped_some(search: tuple[Path, dict, str]) -> None:
    search_dir, summary, _ = search
    assert summary["num_trials"] == 6 and len(summary["trials"]) == 6
    assert sum(summary["statuses"].values()) == 6
    epochs = [row["epochs"] for row in summary["trials"]]
    assert summary["total_epochs"] == sum(epochs)
    assert summary["statuses"].get("stopped_early", 0) >= 1, summary["statuses"]
    assert min(epochs) < 4 and max(epochs) == 4
    for row in summary["trials"]:
        assert row["status"] == ("completed" if row["epochs"] == 4 else "stopped_early")
        assert row["config"]["max_epochs"] == 4 and row["config"]["data_class"] == "FashionMNIST"
    best = summary["best"]
    ranked = max(summary["trials"], key=lambda row: row["best_val_acc"])
    assert best["trial_id"] == ranked["trial_id"] and best["value"] == pytest.approx(ranked["best_val_acc"])
    assert summary["wall_seconds"] > 0 and summary["startup_seconds_median"] is not None
    csv = pd.read_csv(search_dir / "trials.csv")
    assert len(csv) == 6 and set(csv["trial_id"]) == {row["trial_id"] for row in summary["trials"]}


def test_each_trial_reported_every_epoch_with_its_threads(search: tuple[Path, dict, str]) -> None:
    search_dir, summary, _ = search
    for row in summary["trials"]:
        reports = results(search_dir)[row["trial_id"]]
        assert [r["training_iteration"] for r in reports] == list(range(1, row["epochs"] + 1))
        assert [r["epoch"] for r in reports] == list(range(1, row["epochs"] + 1))
        assert all({"val_loss", "val_acc", "train_loss", "train_acc"} <= set(r) for r in reports)
        assert all(r["torch_threads"] == 1 for r in reports)  # 1 CPU per trial -> 1 torch thread
        assert not any(r["data_copied"] for r in reports)  # trained on the shared, read-only arrays themselves
    firsts = [rows[0] for rows in results(search_dir).values()]
    if summary["trial_process"] == "fork":  # every trial in its own fork, not in its Tune actor
        assert len({r["trial_pid"] for r in firsts}) == len(firsts) and all(r["trial_pid"] != r["pid"] for r in firsts)
    else:  # in its (reused) Tune actor: one at a time, so one actor served them all
        assert all(r["trial_pid"] == r["pid"] for r in firsts) and len({r["pid"] for r in firsts}) == 1


def test_wandb_offline_runs_read_back(search: tuple[Path, dict, str]) -> None:
    search_dir, summary, _ = search
    runs = {run.id: run for run in offline_runs(search_dir)}
    trials = {row["trial_id"]: row for row in summary["trials"]}
    assert set(runs) == {f"e2e-{trial_id}" for trial_id in trials} | {"e2e-summary"}
    for trial_id, row in trials.items():
        run = runs[f"e2e-{trial_id}"]
        assert run.group == "e2e" and run.job_type == "trial" and run.name == f"trial_{trial_id}"
        assert [h["epoch"] for h in run.history] == list(range(1, row["epochs"] + 1))
        assert run.config["fc1"] == row["config"]["fc1"] and run.config["search"]["metric"] == "val_acc"
        assert run.config["precision"] == row["precision"]  # as the trial's node resolved --precision auto
        assert run.summary["epochs_trained"] == row["epochs"]
        assert run.summary["stopped_by_asha"] == (row["status"] == "stopped_early")
        assert run.summary["best_val_acc"] == pytest.approx(row["best_val_acc"])
        assert run.exit_code == 0 and not run.sweep_id  # offline: no sweep the server doesn't know
    summary_run = runs["e2e-summary"]
    assert summary_run.job_type == "summary" and summary_run.summary["num_trials"] == 6
    assert summary_run.summary["test_acc"] == pytest.approx(summary["best"]["test_acc"])
    assert summary_run.history[0]["trials/nrows"] == 6
    assert any(name.endswith("best-model") for name in summary_run.artifacts)


def test_best_checkpoint_gives_the_reported_val_acc(search: tuple[Path, dict, str], fashion_dir: Path) -> None:
    _, summary, _ = search
    best = summary["best"]
    checkpoint = torch.load(best["checkpoint"], map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] + 1 == best["epoch"]
    args = parse_args([*shlex.split(best["replay"])[2:], f"--data_dir={fashion_dir}"])
    from text_recognizer.lit_models import BaseLitModel
    from text_recognizer.models import MLP

    data = FashionMNIST(args)
    data.setup()
    lit = BaseLitModel(MLP(data.config(), args), args)
    lit.load_state_dict(checkpoint["state_dict"])
    lit.eval()
    with torch.no_grad():
        predictions = torch.cat([lit(x).argmax(1) for x, _ in data.val_dataloader()])
    accuracy = (predictions == data.tensors["y_val"]).float().mean().item()
    assert accuracy == pytest.approx(best["metrics"]["val_acc"], abs=1e-6)
    assert best["value"] == pytest.approx(best["metrics"]["val_acc"])


def test_printed_report_and_replay_command_runs(search: tuple[Path, dict, str], fashion_dir: Path, tmp_path: Path) -> None:
    _, summary, stdout = search
    best = summary["best"]
    assert f"Best trial {best['trial_id']}" in stdout and best["replay"] in stdout
    search_dir = Path(summary["search_dir"])
    assert summary["wandb"]["sync_command"] == f"python search/tune_mlp.py sync {search_dir}"
    assert summary["wandb"]["sync_command"] in stdout
    # an offline search prints `wandb leet <search>/wandb` as it starts, unless --quiet (these searches): only the report
    assert "wandb leet" not in stdout
    # what that command runs first is one the installed wandb CLI accepts, and it names every run once
    command = wandb_sync_argv(search_dir)
    dry = subprocess.run([*command[:2], "--dry-run", *command[2:]], capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert len(re.findall(r"\.wandb$", dry.stdout + dry.stderr, re.M)) == 7  # 6 trials and the summary run
    # then the sweep is made of the 6 trial runs
    assert prior_run_ids(search_dir) == sorted(f"e2e-{row['trial_id']}" for row in summary["trials"])
    assert f"test_acc={best['test_acc']:.4f}" in stdout and summary["report"] in stdout


def run_experiment(argv: list[str], fashion_dir: Path, tmp_path: Path) -> str:
    """run_experiment.py as a user types it (from a replay command); returns its stdout."""
    command = [sys.executable, "training/run_experiment.py", *argv, f"--data_dir={fashion_dir}", f"--log_dir={tmp_path}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_the_winner_is_tested_once_and_agrees_with_run_experiment(search: tuple, fashion_dir: Path, tmp_path: Path) -> None:
    """Chosen on val, tested once: the same test_acc as run_experiment.py --load_checkpoint on that checkpoint."""
    _, summary, _ = search
    best = summary["best"]
    assert 0.1 < best["test_acc"] <= 1 and best["test_loss"] > 0
    replay = shlex.split(best["replay"])[2:]
    stdout = run_experiment(
        [*replay, f"--load_checkpoint={best['checkpoint']}", "--limit_train_batches=0"], fashion_dir, tmp_path
    )
    assert f"test_acc={best['test_acc']:.4f}" in stdout


def test_every_trial_trained_in_the_precision_auto_resolves_to_here_and_replays_in_it(search: tuple) -> None:
    """--precision auto, the default: bf16-mixed on a CPU with native bf16 (this machine's), else 32-true; each row,
    trials.csv and the replay commands (the winner's too) name it, so a replay trains as the trial did."""
    search_dir, summary, _ = search
    here = resolve_precision("auto", gpu=False)
    table = pd.read_csv(search_dir / "trials.csv")
    assert {row["precision"] for row in summary["trials"]} == {here} and set(table["precision"]) == {here}
    assert all(f"--precision={here}" in row["replay"] for row in summary["trials"])
    assert summary["best"]["precision"] == here and f"--precision={here}" in summary["best"]["replay"]


def test_any_trial_replays_as_a_single_run(search: tuple, fashion_dir: Path, tmp_path: Path) -> None:
    """A trial ASHA stopped, replayed from its command in trials.csv: the same val_acc at the same epoch."""
    search_dir, summary, _ = search
    table = pd.read_csv(search_dir / "trials.csv")
    row = next(r for r in summary["trials"] if r["status"] == "stopped_early")
    command = table.loc[table["trial_id"] == row["trial_id"], "replay"].item()
    assert command == row["replay"] and f"--max_epochs={row['epochs']}" in command
    args = parse_args([*shlex.split(command)[2:], f"--data_dir={fashion_dir}", f"--log_dir={tmp_path}"])
    # same seed, same data order; only the thread count differs from the trial's (1), so sums differ in the last bits
    assert fit_and_test(args)["val_acc"] == pytest.approx(row["val_acc"], abs=2e-3)
    assert "test_acc=" in run_experiment(shlex.split(summary["best"]["replay"])[2:], fashion_dir, tmp_path)


def test_the_report_shows_every_trial(search: tuple) -> None:
    search_dir, summary, _ = search
    page = Path(summary["report"])
    assert page == search_dir / "report" / "report.html"
    text = page.read_text()
    assert text.count("<tr>") == 1 + 6  # header + one row per trial (6 <= the table's 10)
    assert text.count('src="data:image/png;base64,') == 4  # self-contained: the figures are in the page
    for name in ("curves", "parallel_coordinates", "metric_vs_hyperparameters", "importance"):
        assert (page.parent / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"test_acc <b>{summary['best']['test_acc']:.4f}</b>" in text


@pytest.mark.parametrize("trial_process", TRIAL_PROCESSES)
def test_gpu_packing_with_gpus_declared_to_ray(tmp_path: Path, launch_search, trial_process: str) -> None:
    """Two GPUs declared to Ray on this CPU machine, half a GPU per trial: four trials run at once, two per GPU."""
    # long enough trials, never stopped early, so that four workers that start one by one overlap
    config = SEARCH_YAML.replace("limit_train_batches: 8", "limit_train_batches: 200").replace(
        "grace_period: 1", "grace_period: 4"
    )
    flags = ["--num-samples", "4", "--gpus-per-trial", "0.5", "--cpus-per-trial", "1", "--trial-process", trial_process]
    prelude = 'import ray; ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False)'
    finish(launch_search(tmp_path, "gpus", config, *flags, prelude=prelude))
    spans, gpus = [], {}
    for trial_id, reports in results(tmp_path / "gpus").items():
        spans.append((reports[0]["trial_started_at"], reports[-1]["reported_at"]))
        ids = {r["gpu_ids"] for r in reports}
        assert len(ids) == 1 and ids <= {"0", "1"}  # one GPU per trial, the same for its whole life
        assert {r["cuda_visible_devices"] for r in reports} == ids  # Ray pointed CUDA at it
        gpus[trial_id] = ids.pop()
    most_at_once = max(sum(start <= t <= end for start, end in spans) for t, _ in spans)
    assert most_at_once == 4
    assert sorted(gpus.values()) == ["0", "0", "1", "1"]


def test_joins_an_existing_cluster(tmp_path: Path, launch_search) -> None:
    """`ray start --head` makes a cluster (with token auth); --address joins it and leaves it running."""
    # a short session folder of its own: Ray's socket paths must stay under the 107-character limit
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray", dir="/tmp")}
    with socket.socket() as probe:  # a free port: a fixed one may still be held by an earlier cluster
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    started = subprocess.run(
        ["ray", "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        address = re.search(r"--address='([^']+)'", started.stdout + started.stderr).group(1)
        finish(launch_search(tmp_path, "joined", None, "--smoke-test", f"--address={address}"))
        summary = summary_of(tmp_path / "joined")
        assert summary["num_trials"] == 4 and not summary["interrupted"]
        assert set(summary["statuses"]) <= {"completed", "stopped_early"}  # ASHA may stop one: timing decides
        assert all(row["epochs"] >= 1 for row in summary["trials"])
        status = subprocess.run(
            ["ray", "status", f"--address={address}"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, "RAY_AUTH_MODE": "token"},
        )
        assert status.returncode == 0  # the driver left the cluster it joined running
    finally:
        subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120, env=env)
