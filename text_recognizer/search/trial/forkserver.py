"""Runs as its own process, one per node: imports what trials need once, holds the data once, forks a trial per request.

Opt-in (`--trial-process fork`). A Ray worker that imports torch (CUDA build) and Lightning holds hundreds of MB
of private memory before it trains anything, and every concurrent trial in its own actor pays it again.
Forked children share those pages (and the decoded dataset) copy-on-write with their parent, so an extra
trial costs its Tune actor (Ray only, no torch) plus what its training writes (measured: docs/benchmarks.md).

    Tune actor (tune_actor.train_in_fork) --unix socket--> fork server (one per node and code version)
                                                              | fork()
                                                              v
                                                           trial process: runs the request's target by name

The server knows nothing of training: the client names a module to import before forking and a
"module:function" target that each fork runs as target(connection, request, arrays). It is started by
the first trial that needs it on a node, in a private (0700) directory; it binds its socket before it
imports, so concurrent trials wait on the same server. It never touches CUDA (a fork after CUDA is
initialised is unusable); each trial process initialises its own. It exits when its Ray node's raylet is
gone, or after IDLE_SECONDS without trials. A trial process exits when its Tune actor is gone
(watchdog) or when the actor kills it (the trial was stopped). Outside Ray's supervision: Ray's memory
monitor and `ray stop` don't see it (see the README for when to choose it).

Why not multiprocessing's forkserver: its server imports only what `set_forkserver_preload` names once and serves
one parent process; this one is shared by every Tune actor on a node (a socket in a private directory), holds the
decoded dataset for all of them, and outlives the actor that started it, watching its raylet.

Imports the standard library only: it sits at the bottom of the import graph.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import gc
import hashlib
import importlib
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parents[1]  # text_recognizer/
IDLE_SECONDS = 600
START_TIMEOUT = 300.0
DATA_KEEP = 1  # datasets the server keeps: a new search brings its own (a search running beside it re-sends its data)


class TrialProcessError(RuntimeError):
    """The trial process failed or died; the message carries its traceback or how it ended."""


def private_dir() -> Path:
    """A directory only this user can enter: whoever can connect to the server can run code as us."""
    base = tempfile.gettempdir()
    base = base if len(base) <= 60 else "/tmp"  # a socket's path must fit in 107 bytes
    path = Path(base) / f"text-recognizer-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise RuntimeError(f"{path} must belong to uid {os.getuid()} with mode 0700; remove it and run again")
    return path


@functools.cache
def code_version(preload: str) -> str:
    """A hash of the package's source as this process first saw it (once per actor, not per trial) and of
    the module the server preloads: a server never runs other code than the trial that asks for it."""
    digest = hashlib.sha256(preload.encode())
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def socket_path(node_id: str, preload: str) -> Path:
    return private_dir() / f"fs-{node_id[:16]}-{code_version(preload)}.sock"


def preload_of(target: str) -> str:
    """The module of a "module:function" target: the server imports it before it forks."""
    return target.partition(":")[0]


# --------------------------------------------------------------------------- client (the Tune actor)


class TrialProcess:
    """A trial running in a fork of the server: iterate to get its epoch reports, `go_on` after each."""

    def __init__(self, connection: Connection, pid: int) -> None:
        self.connection = connection
        self.pid = pid
        self.finished = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            try:
                message = self.connection.recv()
            except (EOFError, OSError):
                raise TrialProcessError(f"trial process {self.pid} ended without finishing (killed, or out of memory?)") from None
            if "error" in message:
                self.finished = True
                raise TrialProcessError(f"trial process {self.pid} failed:\n{message['error']}")
            if message.get("done"):
                self.finished = True
                return
            yield message

    def go_on(self) -> None:
        self.connection.send("go on")

    def close(self) -> None:
        if not self.finished:  # stopped by Tune (ASHA) or failed here: the process must not train on
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.connection.close()


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return sock
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None


def connect(node_id: str, raylet_pid: int, preload: str) -> socket.socket:
    """A connection to this node's server that preloads `preload`; starts it when there is none."""
    path = socket_path(node_id, preload)
    sock = _connect(path)
    if sock is not None:
        return sock
    log = path.with_suffix(".log")
    with open(log, "ab") as out:
        logged = out.tell()
        # it daemonizes (forks, and its parent exits at once): Ray kills a worker's children when the
        # worker exits, and the server must outlive the trial that started it
        subprocess.run(
            [sys.executable, "-m", "text_recognizer.search.trial.forkserver", str(path), str(raylet_pid), preload],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # nor is it in the worker's process group
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
            check=True,
        )
    deadline = time.time() + START_TIMEOUT
    while time.time() < deadline:
        sock = _connect(path)
        if sock is not None:
            return sock
        with open(log, "rb") as out:
            out.seek(logged)
            news = out.read().decode(errors="replace")
        if "Traceback" in news:
            raise TrialProcessError(f"the fork server failed to start; its log {log}:\n{news[-2000:]}")
        time.sleep(0.05)
    raise TrialProcessError(f"the fork server did not answer within {START_TIMEOUT:.0f} s; see {log}")


@contextlib.contextmanager
def start_trial(request: dict[str, Any], node_id: str, raylet_pid: int, arrays: Any) -> Iterator[TrialProcess]:
    """Run request["target"] in a fork of this node's server; the trial's stdout and stderr are this process's.

    `arrays` (numpy arrays, e.g. read-only views of Ray's object store) are sent once per server and data key,
    straight from their memory.
    """
    sock = connect(node_id, raylet_pid, preload_of(request["target"]))
    socket.send_fds(sock, [b"fds"], [sys.stdout.fileno(), sys.stderr.fileno()])
    connection = Connection(sock.detach())
    trial = None
    try:
        connection.send(request)
        reply = connection.recv()
        if reply == "send data":  # the first trial of this search on this node: the arrays, without a copy
            connection.send({name: (array.dtype.str, array.shape) for name, array in arrays.items()})
            for array in arrays.values():
                connection.send_bytes(memoryview(array).cast("B"))
            reply = connection.recv()
        trial = TrialProcess(connection, reply["pid"])  # sent by the trial process itself
        yield trial
    finally:
        if trial is not None:
            trial.close()
        else:
            connection.close()


# --------------------------------------------------------------------------- the server


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _watch(pid: int) -> None:
    """In a trial process: exit when the Tune actor that asked for it is gone (killed with its driver)."""

    def loop() -> None:
        while _alive(pid):
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=loop, daemon=True, name="watch-actor").start()


def _run_child(connection: Connection, fds: list[int], request: dict[str, Any], arrays: Any) -> None:
    """The forked trial process: never returns (the server's loop must not run twice)."""
    status = 1
    try:
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        os.environ.clear()
        os.environ.update(request["env"])  # the actor's: CUDA_VISIBLE_DEVICES from Ray, threads, W&B, ...
        os.chdir(request["cwd"])
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):  # the server's settings are not the trial's
            signal.signal(signum, signal.SIG_DFL)
        _watch(request["actor_pid"])
        connection.send({"pid": os.getpid()})
        module, _, function = request["target"].partition(":")
        getattr(importlib.import_module(module), function)(connection, request, arrays)
        connection.send({"done": True})
        status = 0
    except BaseException:  # everything goes back to the actor, which raises it in Tune
        with contextlib.suppress(Exception):
            connection.send({"error": traceback.format_exc()})
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)


def serve(path: Path, raylet_pid: int, preload: str) -> None:
    lock = open(path.with_suffix(".lock"), "w")  # held for the server's life
    fcntl.flock(lock, fcntl.LOCK_EX)
    if _connect(path) is not None:
        return  # another server for this node and code version won the race
    path.unlink(missing_ok=True)  # a socket left by a server that died
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(64)
    fcntl.flock(lock, fcntl.LOCK_UN)
    print(f"{time.strftime('%F %T')} fork server {os.getpid()} on {path}, node raylet {raylet_pid}", flush=True)

    # bound first, imported second: trials that connect meanwhile wait in the backlog. Should an import
    # ask torch whether CUDA is there, it asks NVML: torch's own check initialises CUDA and so poisons
    # every fork (each trial process resets its environment to its actor's and initialises CUDA itself)
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    importlib.import_module(preload)  # e.g. torch, Lightning and the package, for every fork
    gc.collect()
    gc.freeze()  # the collector no longer walks these objects, so it doesn't copy their pages into every fork
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # trial processes are reaped by the kernel
    datasets: dict[str, Any] = {}
    children: set[int] = set()
    idle_since = time.time()
    listener.settimeout(1.0)
    try:
        while _alive(raylet_pid):
            children = {pid for pid in children if _alive(pid)}
            if children:
                idle_since = time.time()
            elif time.time() - idle_since > IDLE_SECONDS:
                break
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            idle_since = time.time()
            try:
                pid = _accept_trial(sock, listener, datasets)
            except Exception as error:  # one bad connection must not end the server
                # not the message itself: it may hold a slice of the data (BufferTooShort)
                print(f"{time.strftime('%F %T')} a trial request failed: {type(error).__name__}", flush=True)
                traceback.print_tb(error.__traceback__, file=sys.stdout)
                continue
            if pid:
                children.add(pid)
    finally:
        listener.close()
        path.unlink(missing_ok=True)


def _receive_arrays(connection: Connection) -> dict[str, Any]:
    import numpy as np

    arrays = {}
    for name, (dtype, shape) in connection.recv().items():
        array = np.empty(shape, dtype=dtype)
        connection.recv_bytes_into(memoryview(array).cast("B"))
        array.flags.writeable = False  # shared by every fork: nobody writes into it
        arrays[name] = array
    return arrays


def _accept_trial(sock: socket.socket, listener: socket.socket, datasets: dict[str, Any]) -> int | None:
    sock.settimeout(None)
    if _peer_uid(sock) != os.getuid():
        sock.close()
        return None
    _, fds, _, _ = socket.recv_fds(sock, 16, 2)
    connection = Connection(sock.detach())
    try:
        request = connection.recv()
        key = request["data_key"]
        if key not in datasets:
            connection.send("send data")
            datasets[key] = _receive_arrays(connection)
            size = sum(array.nbytes for array in datasets[key].values())
            print(f"{time.strftime('%F %T')} dataset {key} received: {size} bytes", flush=True)  # once per search
            for old in list(datasets)[:-DATA_KEEP]:
                del datasets[old]
            gc.collect()
            gc.freeze()
        arrays = datasets[key]
        pid = os.fork()
        if pid == 0:
            listener.close()
            _run_child(connection, fds, request, arrays)
        return pid
    finally:
        connection.close()
        for fd in fds:
            os.close(fd)


if __name__ == "__main__":
    if os.fork() > 0:
        os._exit(0)  # the caller waits for this; the server goes on in the child, no longer the worker's
    serve(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
