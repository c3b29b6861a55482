"""Read offline W&B runs (`.wandb` files) back: id, group, job type, config, history and summary.

The `.wandb` file is a LevelDB-style log of protobuf `Record`s: a 7-byte file header, then 32 KiB blocks
of chunks, each with a 7-byte header (crc32c, length, type) and a record split FULL or FIRST/MIDDLE/LAST.
W&B 0.31 no longer ships a Python reader, so this one lets tests and reports check what a search wrote.

Why not the SDK: wandb 0.31 reads `.wandb` files only in its Go core (`wandb sync`, `wandb leet`), with no
Python API to get a run's records back, and its public Api() reads runs from a server, which offline runs never reached.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[Any]:
    """The protobuf records of a .wandb file, in order; a truncated final record is dropped."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path}: not a .wandb file")
    offset, pending = HEADER, b""
    while offset + HEADER <= len(data):
        room = BLOCK - offset % BLOCK
        if room < HEADER:  # the rest of a block too small for a chunk header is padding
            offset += room
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + HEADER])
        chunk = data[offset + HEADER : offset + HEADER + length]
        offset += HEADER + length
        if kind == 0 and length == 0:
            offset += BLOCK - offset % BLOCK if offset % BLOCK else 0
            continue
        if len(chunk) < length:
            break
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        else:
            pending += chunk
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        pending = b""
        yield record


@dataclass
class OfflineRun:
    """What an offline run holds."""

    path: Path
    id: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    sweep_id: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    exit_code: int | None = None


def _value(item: Any) -> Any:
    return json.loads(item.value_json)


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(path: Path) -> OfflineRun:
    """Parse one `.wandb` file into an OfflineRun."""
    run = OfflineRun(Path(path))
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.id, run.name = record.run.run_id, record.run.display_name
            run.group, run.job_type, run.sweep_id = record.run.run_group, record.run.job_type, record.run.sweep_id
            for item in record.run.config.update:
                run.config[_key(item)] = _value(item)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = _value(item)
        elif kind == "history":
            row = {_key(item): _value(item) for item in record.history.item}
            row["_step"] = record.history.step.num if record.history.HasField("step") else row.get("_step")
            run.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = _value(item)
        elif kind == "artifact":
            run.artifacts.append(record.artifact.name)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    run.config = {key: value.get("value", value) if isinstance(value, dict) else value for key, value in run.config.items()}
    return run


def offline_runs(search_dir: Path) -> list[OfflineRun]:
    """Every offline run under a search folder's wandb/ directory."""
    return [read_run(path) for path in sorted(Path(search_dir).glob("wandb/offline-run-*/run-*.wandb"))]
