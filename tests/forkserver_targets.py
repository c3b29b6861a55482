"""Targets the fork server runs by name in its forks (tests/test_forkserver.py): the standard library only."""

from __future__ import annotations

import os
import subprocess
from multiprocessing.connection import Connection
from typing import Any


def exit_status_of_a_subprocess(connection: Connection, request: dict[str, Any], arrays: Any) -> None:
    """Run `sh -c 'exit 3'` and send back the exit status the trial process sees."""
    status = subprocess.run(["sh", "-c", "exit 3"], check=False).returncode
    connection.send({"metrics": {"status": status, "pid": os.getpid()}, "checkpoint": None})
    connection.recv()


def where_the_arrays_are(connection: Connection, request: dict[str, Any], arrays: Any) -> None:
    """Send the address of each array's data and whether it is writable."""
    info = {name: (array.ctypes.data, array.flags.writeable) for name, array in arrays.items()}
    connection.send({"metrics": info, "checkpoint": None})
    connection.recv()
