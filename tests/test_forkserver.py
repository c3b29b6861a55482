"""The fork server: trials are forks that share its imports and data; errors, stops and kills reach the caller."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from text_recognizer.data.mnist import MNIST
from text_recognizer.search.trial import forkserver
from text_recognizer.search.trial.tune_actor import FORK_TARGET


@pytest.fixture(scope="module")
def arrays(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from conftest import write_tiny_mnist

    data_dir = tmp_path_factory.mktemp("data")
    write_tiny_mnist(data_dir, "MNIST", n_train=600, n_test=100)
    return MNIST.load_arrays(data_dir)


@pytest.fixture(scope="module")
def node_id() -> str:
    """A node of its own: this module's server, watching this process, gone when pytest is."""
    return f"test{uuid.uuid4().hex}"


def request(tmp_path: Path, key: str, target: str = FORK_TARGET, **config) -> dict:
    """What tune_actor.train_in_fork sends: the target by name, the actor's environment, the trial's config."""
    return {
        "target": target,
        "data_key": key,
        "env": dict(os.environ),
        "cwd": str(tmp_path),
        "actor_pid": os.getpid(),
        "config": {"data_class": "MNIST", "max_epochs": 3, "fc1": 32, "fc2": 16, **config},
        "trial": {"checkpoint": None, "threads": 1, "gpu_ids": [], "started": time.time()},
    }


def test_trials_are_forks_sharing_the_servers_memory(tmp_path: Path, arrays: dict, node_id: str) -> None:
    key = uuid.uuid4().hex
    with forkserver.start_trial(request(tmp_path, key), node_id, os.getpid(), arrays) as first:
        message = next(iter(first))  # the trial process now waits for go_on: it holds a model and the data
        server = psutil.Process(first.pid).parent()
        assert "text_recognizer.search.trial.forkserver" in " ".join(server.cmdline())
        trial_memory = psutil.Process(first.pid).memory_full_info()
        server_memory = server.memory_full_info()
        # torch, Lightning and the data are the server's pages: the fork's own memory is a fraction of them
        assert server_memory.rss > 300 * 2**20
        assert trial_memory.uss < 150 * 2**20 and trial_memory.uss < server_memory.rss / 3
        assert message["metrics"]["epoch"] == 1 and not message["metrics"]["data_copied"]
        assert (Path(message["checkpoint"]) / "model.ckpt").is_file()
        first.go_on()
        epochs = [message["metrics"]["epoch"]]
        for message in first:
            epochs.append(message["metrics"]["epoch"])
            first.go_on()
        assert epochs == [1, 2, 3] and first.finished
    # a second trial with the same data key: the same server, no data sent again, another process
    with forkserver.start_trial(request(tmp_path, key, fc1=16), node_id, os.getpid(), None) as second:
        message = next(iter(second))
        assert psutil.Process(second.pid).parent().pid == server.pid and second.pid != first.pid


def test_a_stopped_trial_process_is_killed(tmp_path: Path, arrays: dict, node_id: str) -> None:
    with forkserver.start_trial(request(tmp_path, "stop", max_epochs=50), node_id, os.getpid(), arrays) as trial:
        next(iter(trial))
        process = psutil.Process(trial.pid)
    # Tune stopped the trial (ASHA): leaving the block without finishing kills the process
    process.wait(timeout=10)
    assert not psutil.pid_exists(trial.pid) or process.status() == psutil.STATUS_ZOMBIE


def test_an_error_comes_back_with_its_traceback(tmp_path: Path, arrays: dict, node_id: str) -> None:
    with pytest.raises(forkserver.TrialProcessError, match="(?s)failed:.*--optimizer: invalid choice"):
        with forkserver.start_trial(request(tmp_path, "error", optimizer="Nope"), node_id, os.getpid(), arrays) as trial:
            list(trial)


def test_a_killed_trial_process_is_an_error(tmp_path: Path, arrays: dict, node_id: str) -> None:
    with pytest.raises(forkserver.TrialProcessError, match="ended without finishing"):
        with forkserver.start_trial(request(tmp_path, "kill", max_epochs=50), node_id, os.getpid(), arrays) as trial:
            for _ in trial:
                os.kill(trial.pid, signal.SIGKILL)
                trial.go_on()


def test_the_socket_directory_must_be_private(monkeypatch: pytest.MonkeyPatch) -> None:
    base = Path(tempfile.mkdtemp(prefix="tr-"))  # short: a longer temp dir falls back to /tmp
    monkeypatch.setattr(forkserver.tempfile, "gettempdir", lambda: str(base))
    try:
        assert forkserver.private_dir() == base / f"text-recognizer-{os.getuid()}"
        assert forkserver.private_dir().stat().st_mode & 0o777 == 0o700
        forkserver.private_dir().chmod(0o755)  # anyone who can connect can run code as us
        with pytest.raises(RuntimeError, match="mode 0700"):
            forkserver.private_dir()
    finally:
        shutil.rmtree(base)


def test_the_trial_process_sees_its_subprocesses_exit_status(tmp_path: Path, arrays: dict, node_id: str) -> None:
    """The server ignores SIGCHLD (the kernel reaps its forks); a trial process must not inherit that."""
    target = "forkserver_targets:exit_status_of_a_subprocess"
    with forkserver.start_trial(request(tmp_path, "sigchld", target), node_id, os.getpid(), arrays) as trial:
        message = next(iter(trial))
        trial.go_on()
    assert message["metrics"]["status"] == 3


def test_the_server_keeps_one_read_only_copy_and_forks_use_it(tmp_path: Path, arrays: dict, node_id: str) -> None:
    """Sent once per data key; every fork sees the same read-only arrays at the same addresses (no copies)."""
    target = "forkserver_targets:where_the_arrays_are"
    seen = []
    for _ in range(2):
        with forkserver.start_trial(request(tmp_path, "where", target), node_id, os.getpid(), arrays) as trial:
            seen.append(next(iter(trial))["metrics"])
            trial.go_on()
    assert seen[0] == seen[1] and set(seen[0]) == set(arrays)
    assert not any(writeable for _, writeable in seen[0].values())
