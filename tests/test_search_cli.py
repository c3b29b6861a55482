"""Bad input to search/tune_mlp.py: exit status 2, one line on stderr, before Ray starts, nothing written."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT, SCRIPT, write_tiny_mnist

# A refusal comes after the imports and before Ray. The sure sign that Ray started is its session folder under
# RAY_TMPDIR (and what ray.init prints); no time limit: on a loaded machine the imports alone took 45-77 s.
RAY_STARTED = ("Started a local Ray instance", "Token authentication")  # what ray.init prints
HELP_FLAGS = (
    "--num-samples",
    "--config",
    "--name",
    "--storage-path",
    "--cpus-per-trial",
    "--gpus-per-trial",
    "--max-concurrent",
    "--address",
    "--resume",
    "--wandb-project",
    "--wandb-mode",
    "--smoke-test",
    "--trial-process",
    "--search-alg",
    "--time-budget",
    "--keep-checkpoints",
)
GOOD_SPACE = "space:\n  fc1: {choice: [8, 16]}\n"


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file and folder under `folder`, with size, mtime and content hash: what 'nothing written' compares."""
    if not folder.exists():
        return {}
    state = {}
    for path in sorted(folder.rglob("*")):
        digest = hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        state[str(path.relative_to(folder))] = (path.stat().st_size if path.is_file() else 0, path.stat().st_mtime_ns, digest)
    return state


def run_cli(args: list[str], tmp_path: Path, timeout: float = 300, ray_tmp: bool = True) -> subprocess.CompletedProcess:
    """Run the real script from the repo root; Ray (if it wrongly starts) puts its session under tmp_path/ray."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env["TEXT_RECOGNIZER_DATA_DIR"] = str(tmp_path / "no-data")  # never download into the checkout
    if ray_tmp:
        env["RAY_TMPDIR"] = str(tmp_path / "ray")
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2 and exactly one non-empty line on stderr that contains every needle."""
    output = f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert result.returncode == 2, output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), output
    line = lines[0]
    assert ": error: " in line, output
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def refuse(tmp_path: Path, args: list[str], *needles: str, storage: Path | None = None) -> str:
    """The search refuses `args` with one line, exit 2, before Ray starts, leaving the storage dir as it was."""
    storage = storage or tmp_path / "storage"
    before = snapshot(storage)
    result = run_cli([*args, *(["--storage-path", str(storage)] if "--storage-path" not in args else [])], tmp_path)
    line = assert_one_line_error(result, *needles)
    for text in RAY_STARTED:
        assert text not in result.stdout + result.stderr, f"Ray started: {text!r} in the output"
    assert not (tmp_path / "ray").exists(), "Ray started a session"
    assert snapshot(storage) == before, "the storage dir changed"
    return line


# --- setups: each returns extra command-line args, given the test's tmp_path -------------------------------


def config_file(text: str) -> Callable[[Path], list[str]]:
    def setup(tmp_path: Path) -> list[str]:
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        return ["--config", str(path)]

    return setup


def damaged_data(name: str, damage: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    """Tiny MNIST IDX files in tmp_path/data with raw file `name` damaged."""

    def setup(tmp_path: Path) -> list[str]:
        raw = write_tiny_mnist(tmp_path / "data", "MNIST")
        damage(raw / name)
        return ["--data_class=MNIST", f"--data_dir={tmp_path / 'data'}", "--name", "data-check"]

    return setup


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])  # the header survives: only the size gives it away


def truncate_header(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:6])


def bad_magic(path: Path) -> None:
    path.write_bytes(b"\x00\x00\x09\x99" + path.read_bytes()[4:])


def existing_search(tmp_path: Path) -> list[str]:
    (tmp_path / "storage" / "taken").mkdir(parents=True)
    (tmp_path / "storage" / "taken" / "marker.txt").write_text("earlier search")
    return ["--name", "taken"]


def unfinished_folder(tmp_path: Path) -> list[str]:
    (tmp_path / "storage" / "half").mkdir(parents=True)
    (tmp_path / "storage" / "half" / "marker.txt").write_text("no search.json here")
    return ["--resume", "--name", "half"]


def saved_search(tmp_path: Path) -> list[str]:
    """A saved search (as far as --resume looks before Ray): trained in its actors."""
    folder = tmp_path / "storage" / "saved"
    folder.mkdir(parents=True)
    (folder / "search.json").write_text(
        json.dumps({"config": {}, "wandb_mode": "offline", "wandb_project": "p", "trial_process": "actor"})
    )
    (folder / "tuner.pkl").write_bytes(b"")
    return ["--resume", "--name", "saved"]


def saved_grown_search(tmp_path: Path) -> list[str]:
    """A saved search of 10 samples that can grow (it records its parts), as far as --resume looks before Ray."""
    saved_search(tmp_path)
    path = tmp_path / "storage" / "saved" / "search.json"
    record = json.loads(path.read_text())
    record["parts"] = [{"started": "2026-12-01T00:00:00Z", "num_samples": 10, "time_budget": None, "wall_seconds": 1.0}]
    path.write_text(json.dumps(record))
    return ["--resume", "--name", "saved"]


def earlier_search(metric: str = "val_acc", mode: str = "max") -> Callable[[Path], list[str]]:
    """A finished search's folder (its search.json and summary.json) to --warm-start from."""

    def setup(tmp_path: Path) -> list[str]:
        folder = tmp_path / "earlier"
        folder.mkdir()
        (folder / "search.json").write_text("{}")
        (folder / "summary.json").write_text(json.dumps({"settings": {"metric": metric, "mode": mode}, "trials": []}))
        return ["--search-alg", "optuna", "--warm-start", str(folder)]

    return setup


def not_a_search(tmp_path: Path) -> list[str]:
    (tmp_path / "elsewhere").mkdir()
    return ["--search-alg", "optuna", "--warm-start", str(tmp_path / "elsewhere")]


def no_setup(tmp_path: Path) -> list[str]:
    return []


# (case id, setup, args, substrings of the one stderr line)
CASES = [
    ("unknown-data-class", no_setup, ["--data_class=Nope"], ("data_class", "Nope")),
    ("unknown-model-class", no_setup, ["--model_class=Nope"], ("model_class", "Nope")),
    ("unknown-search-flag", no_setup, ["--nope"], ("--nope",)),
    ("unknown-run-flag-value", no_setup, ["--optimizer=Nope"], ("optimizer", "Nope")),
    ("positional-argument", no_setup, ["stray"], ("stray",)),
    ("zero-layer-flag", no_setup, ["--fc1=0"], ("fc1", "0")),
    ("negative-layer-flag", no_setup, ["--fc2=-4"], ("fc2", "-4")),
    ("max-epochs-flag", no_setup, ["--max_epochs=3"], ("max_epochs", "max_t")),
    ("num-samples-0", no_setup, ["--num-samples", "0"], ("--num-samples", "0")),
    ("num-samples-text", no_setup, ["--num-samples", "ten"], ("--num-samples", "ten")),
    ("cpus-per-trial-0", no_setup, ["--cpus-per-trial", "0"], ("--cpus-per-trial",)),
    ("gpus-per-trial-negative", no_setup, ["--gpus-per-trial", "-1"], ("--gpus-per-trial",)),
    ("max-concurrent-0", no_setup, ["--max-concurrent", "0"], ("--max-concurrent",)),
    ("wandb-mode", no_setup, ["--wandb-mode", "sometimes"], ("--wandb-mode", "sometimes")),
    ("name-separator", no_setup, ["--name", "a/b"], ("--name", "a/b")),
    ("name-dotdot", no_setup, ["--name", ".."], ("--name", "..")),
    ("name-dotdot-inside", no_setup, ["--name", "a..b"], ("--name", "a..b")),
    ("name-absolute", no_setup, ["--name", "/tmp/x"], ("--name", "/tmp/x")),
    ("missing-config", no_setup, ["--config", "/nonexistent/search.yaml"], ("/nonexistent/search.yaml", "no such file")),
    ("yaml-syntax", config_file("metric: val_acc\nspace: {fc1: [1, 2\n"), [], ("bad.yaml", "YAML syntax error", "line")),
    ("unknown-space-key", config_file("space:\n  fc3: {choice: [8]}\n"), [], ("bad.yaml", "space.fc3")),
    ("wrong-type", config_file("num_samples: ten\n" + GOOD_SPACE), [], ("bad.yaml", "num_samples", "ten")),
    ("unknown-metric", config_file("metric: val_f1\n" + GOOD_SPACE), [], ("bad.yaml", "metric", "val_f1")),
    ("empty-space", config_file("space: {}\n"), [], ("bad.yaml", "space")),
    ("inverted-range", config_file("space:\n  lr: {loguniform: [0.1, 0.01]}\n"), [], ("space.lr", "inverted")),
    ("empty-range", config_file("space:\n  fc1: {randint: [3, 3]}\n"), [], ("space.fc1", "empty")),
    ("zero-layer-config", config_file("space:\n  fc1: {choice: [0, 8]}\n"), [], ("bad.yaml", "space.fc1")),
    ("negative-layer-config", config_file("space:\n  fc1: {randint: [-4, 8]}\n"), [], ("bad.yaml", "space.fc1")),
    ("lr-as-string", config_file("space:\n  lr: {choice: [1e-3]}\n"), [], ("space.lr", "1.0e-3")),
    ("max-epochs-in-space", config_file("space:\n  max_epochs: {choice: [3]}\n"), [], ("space.max_epochs",)),
    ("data-class-fixed-nope", config_file("fixed: {data_class: Nope}\n" + GOOD_SPACE), [], ("fixed.data_class", "Nope")),
    ("truncated-images", damaged_data("train-images-idx3-ubyte", truncate), [], ("train-images", "truncated")),
    ("truncated-labels", damaged_data("t10k-labels-idx1-ubyte", truncate), [], ("t10k-labels", "truncated")),
    ("truncated-header", damaged_data("t10k-images-idx3-ubyte", truncate_header), [], ("t10k-images", "corrupt")),
    ("corrupt-magic", damaged_data("train-labels-idx1-ubyte", bad_magic), [], ("train-labels", "corrupt")),
    ("resume-missing", no_setup, ["--resume", "--name", "never-ran"], ("--resume", "never-ran")),
    ("resume-without-name", no_setup, ["--resume"], ("--resume", "--name")),
    ("resume-not-a-search", unfinished_folder, [], ("--resume", "half")),
    ("resume-with-config", no_setup, ["--resume", "--name", "x", "--config", "experiments/smoke.yaml"], ("--resume", "--config")),
    ("resume-with-changes", no_setup, ["--resume", "--name", "x", "--num-samples", "3", "--fc1=8"], ("--num-samples", "--fc1")),
    ("name-taken", existing_search, [], ("taken", "--resume", "--overwrite")),
    ("resume-in-another-mode", saved_search, ["--trial-process", "fork"], ("--resume", "--trial-process actor")),
    ("storage-under-proc", no_setup, ["--storage-path", "/proc/text-recognizer"], ("--storage-path", "/proc", "not writable")),
    ("storage-under-sys", no_setup, ["--storage-path", "/sys/x/y"], ("--storage-path", "/sys", "not writable")),
    ("smoke-with-config", no_setup, ["--smoke-test", "--config", "mlp_asha"], ("--smoke-test", "--config")),
    ("trial-process", no_setup, ["--trial-process", "thread"], ("--trial-process", "thread")),
    ("max-failures-negative", no_setup, ["--max-failures", "-1"], ("--max-failures",)),
    ("keep-checkpoints-0", no_setup, ["--keep-checkpoints", "0"], ("--keep-checkpoints", "winner")),
    ("search-alg-unknown", no_setup, ["--search-alg", "bayes"], ("--search-alg", "bayes")),
    (
        "grid-under-optuna-flag",
        config_file("space:\n  fc1: {grid: [8, 16]}\n"),
        ["--search-alg", "optuna"],
        ("--search-alg optuna", "space.fc1", "grid"),
    ),
    ("time-budget-text", no_setup, ["--time-budget", "a while"], ("--time-budget", "a while", "10m")),
    ("time-budget-zero", no_setup, ["--time-budget", "0s"], ("--time-budget", "more than 0")),
    ("resume-with-search-alg", saved_search, ["--search-alg", "optuna"], ("--resume", "--search-alg")),
    ("grow-a-search-from-before-growing", saved_search, ["--time-budget", "5m"], ("--resume", "before searches could grow")),
    ("grow-to-fewer-samples", saved_grown_search, ["--num-samples", "5"], ("--num-samples 5", "10 samples already")),
    ("grow-with-config", saved_grown_search, ["--num-samples", "20", "--config", "mlp_asha"], ("--resume", "--config")),
    ("grow-with-run-flag", saved_grown_search, ["--num-samples", "20", "--lr=0.1"], ("--resume", "--lr")),
    ("grow-with-search-alg", saved_grown_search, ["--num-samples", "20", "--search-alg", "optuna"], ("--search-alg",)),
    (
        "grow-with-another-metric",
        config_file("metric: val_loss\nmode: min\n" + GOOD_SPACE),
        ["--resume", "--name", "saved", "--num-samples", "20"],
        ("--resume", "--config"),
    ),
    ("grow-with-zero-budget", saved_grown_search, ["--time-budget", "0"], ("--time-budget", "more than 0")),
    ("grow-with-warm-start", saved_grown_search, ["--warm-start", "elsewhere"], ("--resume", "--warm-start")),
    ("confirm-0x3", no_setup, ["--confirm", "0x3"], ("--confirm 0x3", "at least 1")),
    ("confirm-3x0", no_setup, ["--confirm", "3x0"], ("--confirm 3x0", "at least 1")),
    ("confirm-text", no_setup, ["--confirm", "three"], ("--confirm", "TOP_KxSEEDS")),
    ("warm-start-not-a-search", not_a_search, [], ("--warm-start", "not a search folder")),
    ("warm-start-other-metric", earlier_search("val_loss", "min"), [], ("--warm-start", "val_loss", "val_acc")),
    ("warm-start-random", earlier_search(), ["--search-alg", "random"], ("--warm-start", "random", "optuna")),
]


# One case of each kind of check (flags, config, data, saved searches) through the real script: each run costs
# the package's ~6 s of imports, and every case runs in-process above.
REAL_SCRIPT = {
    "unknown-data-class",
    "name-separator",
    "yaml-syntax",
    "truncated-images",
    "resume-missing",
    "storage-under-proc",
    "grow-to-fewer-samples",
}
SCRIPT_CASES = [case for case in CASES if case[0] in REAL_SCRIPT]


class RayStarted(Exception):
    """Raised in place of starting Ray: every refusal must come before."""


def refuse_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, args: list[str], *needles: str
) -> str:
    """tune_mlp(argv) in this process: SystemExit(2), one stderr line, Ray never started, storage untouched."""
    from text_recognizer import flags
    from text_recognizer.cli import tune_mlp
    from text_recognizer.search import driver

    def no_ray(address: str | None) -> None:
        raise RayStarted

    monkeypatch.setattr(driver, "ray_cluster", no_ray)
    monkeypatch.setattr(flags, "DATA_DIRNAME", tmp_path / "no-data")
    storage = tmp_path / "storage"
    before = snapshot(storage)
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        tune_mlp([*args, *(["--storage-path", str(storage)] if "--storage-path" not in args else [])])
    captured = capsys.readouterr()
    result = subprocess.CompletedProcess(args, caught.value.code, captured.out, captured.err)
    line = assert_one_line_error(result, *needles)
    assert snapshot(storage) == before, "the storage dir changed"
    return line


@pytest.mark.parametrize(("setup", "args", "needles"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_refused_in_process(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    setup: Callable[[Path], list[str]],
    args: list[str],
    needles: tuple[str, ...],
) -> None:
    (tmp_path / "storage").mkdir(exist_ok=True)
    refuse_in_process(tmp_path, monkeypatch, capsys, [*setup(tmp_path), *args], *needles)


@pytest.mark.parametrize(
    ("setup", "args", "needles"), [case[1:] for case in SCRIPT_CASES], ids=[case[0] for case in SCRIPT_CASES]
)
def test_refused_by_the_script(
    tmp_path: Path, setup: Callable[[Path], list[str]], args: list[str], needles: tuple[str, ...]
) -> None:
    (tmp_path / "storage").mkdir(exist_ok=True)
    refuse(tmp_path, [*setup(tmp_path), *args], *needles)


def test_existing_search_is_untouched(tmp_path: Path) -> None:
    args = existing_search(tmp_path)
    marker = tmp_path / "storage" / "taken" / "marker.txt"
    stat = marker.stat()
    refuse(tmp_path, args, "taken", "--resume", "--overwrite")
    assert marker.read_text() == "earlier search" and marker.stat().st_mtime_ns == stat.st_mtime_ns


@pytest.mark.parametrize("under", ["file/sub", "file"], ids=["under-a-file", "is-a-file"])
def test_unwritable_storage_path(tmp_path: Path, under: str) -> None:
    (tmp_path / "file").write_text("a regular file")  # root ignores chmod: a file in the way stops even root
    line = refuse(tmp_path, [], "--storage-path", storage=tmp_path / under)
    assert str(tmp_path / under) in line
    assert (tmp_path / "file").read_text() == "a regular file"


def test_help_lists_every_flag(tmp_path: Path) -> None:
    result = run_cli(["--help"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for flag in HELP_FLAGS:
        assert flag in result.stdout, flag
    assert not (tmp_path / "ray").exists()


# --- refusals that need Ray: the cluster's largest node is too small for one trial --------------------------


@pytest.mark.parametrize(
    ("flags", "needles"),
    [(["--gpus-per-trial", "1"], ("largest node", "GPU")), (["--cpus-per-trial", "64"], ("largest node", "64 CPUs"))],
    ids=["gpus", "cpus"],
)
def test_trial_larger_than_any_node(tmp_path: Path, fashion_dir: Path, flags: list[str], needles: tuple[str, ...]) -> None:
    storage = tmp_path / "storage"
    storage.mkdir()
    args = [*flags, "--smoke-test", "--data_class=FashionMNIST", f"--data_dir={fashion_dir}", "--name", "too-big"]
    # Ray's session sockets need a short path: let it use its default temp dir here
    result = run_cli([*args, "--storage-path", str(storage)], tmp_path, timeout=120, ray_tmp=False)
    assert_one_line_error(result, *needles)
    assert snapshot(storage) == {}, "the storage dir changed"
