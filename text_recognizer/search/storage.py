"""Runs in the driver (and, for one check, in a task on each node): where a search is stored.

`--storage-path` is what Ray Tune takes: a folder (on a cluster, one that every node mounts) or a URI that
pyarrow opens (`s3://bucket/prefix`, `gs://bucket/prefix`; an S3-compatible server through the URI's query,
`s3://bucket/prefix?endpoint_override=host:9000&scheme=http`). Tune keeps its state and the checkpoints there.
With a URI the driver keeps its own files (DRIVER_FILES) in a local folder and copies them to the URI as well, so
that `--resume` works from the URI alone, on another machine too.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow
import pyarrow.fs as pafs

from text_recognizer.facts import SEARCH_FILE, SUMMARY_FILE, TRIAL_PREFIX
from text_recognizer.util import UserError

# the driver's own files in a search folder; everything else in it is Tune's (its state and the trials' folders)
DRIVER_FILES = (SEARCH_FILE, SUMMARY_FILE, "trials.csv", "report", "wandb")
LOCAL = pafs.LocalFileSystem()


def is_uri(storage: str) -> bool:
    """Whether --storage-path names a URI (scheme://...) rather than a folder."""
    return "://" in storage


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def open_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem of `uri` and the path on it (no scheme, no query, no trailing '/'); UserError when
    pyarrow can't read the URI or it names no bucket."""
    if urlsplit(uri).password or urlsplit(uri).username:
        raise UserError(
            "--storage-path: put credentials in the environment (e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), "
            "not in the URI: it is saved and printed in the resume command"
        )
    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
    except (pyarrow.ArrowException, ValueError, OSError) as error:
        raise UserError(f"--storage-path {uri}: {first_line(error)}") from None
    if not path.strip("/"):
        raise UserError(f"--storage-path {uri}: name a bucket, e.g. s3://bucket/prefix")
    return filesystem, path.rstrip("/")


def child(uri: str, *parts: str) -> str:
    """The URI of `parts` under `uri`, its query (endpoint, region) kept at the end."""
    base, _, query = uri.partition("?")
    joined = "/".join([base.rstrip("/"), *parts])
    return f"{joined}?{query}" if query else joined


def prove_uri(uri: str) -> None:
    """UserError unless a probe file can be written to `uri` and removed again: a bad URI, a missing bucket, refused
    credentials or an endpoint that doesn't answer are one line here, before data loads or Ray starts."""
    filesystem, path = open_uri(uri)
    probe = f"{path}/.probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        existed = filesystem.get_file_info(path).type != pafs.FileType.NotFound
        with filesystem.open_output_stream(probe) as stream:
            stream.write(b"probe")
        filesystem.delete_file(probe)
        if not existed and "/" in path:  # leave no empty prefix behind (never touch a bucket itself)
            filesystem.delete_dir(path)
    except OSError as error:
        raise UserError(f"--storage-path {uri}: can't write there ({first_line(error)})") from None


def stored(uri: str, name: str, *files: str) -> bool:
    """Whether the search `name` (or, given `files`, each of them in it) exists under `uri`."""
    filesystem, path = open_uri(uri)
    wanted = [f"{path}/{name}/{file}" for file in files] or [f"{path}/{name}"]
    return all(info.type != pafs.FileType.NotFound for info in filesystem.get_file_info(wanted))


def read_text(uri: str, name: str, file: str) -> str:
    filesystem, path = open_uri(uri)
    with filesystem.open_input_stream(f"{path}/{name}/{file}") as stream:
        return stream.read().decode()


def delete(uri: str, name: str) -> None:
    """Remove the search `name` under `uri` (--overwrite)."""
    filesystem, path = open_uri(uri)
    if stored(uri, name):
        filesystem.delete_dir(f"{path}/{name}")


def local_files(path: Path) -> list[Path]:
    """The file `path`, or the files under the folder `path`; links left out (W&B's latest-run links a run that
    is there already)."""
    if path.is_symlink() or not path.exists():
        return []
    if path.is_file():
        return [path]
    walked = [Path(root) / name for root, _, names in os.walk(path) for name in names]  # never enters a linked folder
    return [file for file in walked if not file.is_symlink()]


def upload_driver_files(folder: Path, uri: str) -> None:
    """Copy the driver's own files of the search folder to the search under `uri`; a folder replaces the stored
    one (a W&B run set aside locally is no longer where it was)."""
    filesystem, path = open_uri(uri)
    for name in DRIVER_FILES:
        if (folder / name).is_dir():
            filesystem.delete_dir_contents(f"{path}/{folder.name}/{name}", missing_dir_ok=True)
        for file in local_files(folder / name):
            remote = f"{path}/{folder.name}/{file.relative_to(folder).as_posix()}"
            pafs.copy_files(str(file), remote, source_filesystem=LOCAL, destination_filesystem=filesystem)


def is_driver_file(relative: str) -> bool:
    return relative.split("/")[0] in DRIVER_FILES


def is_trial_file(relative: str) -> bool:
    """A trial's own small file (result.json, progress.csv, error.txt, ...), not one of its checkpoints."""
    parts = relative.split("/")
    return parts[0].startswith(TRIAL_PREFIX) and len(parts) > 1 and not any(part.startswith("checkpoint_") for part in parts)


def download(uri: str, folder: Path, keep: Callable[[str], bool]) -> int:
    """Copy the files of the search under `uri` whose path (relative to the search) `keep` accepts into `folder`,
    the search's local folder; returns how many."""
    filesystem, path = open_uri(uri)
    root = f"{path}/{folder.name}"
    infos = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=True))
    files = [info for info in infos if info.type == pafs.FileType.File and keep(info.path[len(root) + 1 :])]
    for info in files:
        target = folder / info.path[len(root) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(info.path, str(target), source_filesystem=filesystem, destination_filesystem=LOCAL)
    return len(files)


def fetch(uri: str, stored_path: str, folder: Path) -> Path:
    """Download one folder of the search (e.g. a checkpoint, `stored_path` as Tune gives it: on the filesystem of
    `uri`, without a scheme) to the same place under the search's local `folder`; returns the local copy."""
    filesystem, path = open_uri(uri)
    relative = stored_path[len(f"{path}/{folder.name}/") :] if stored_path.startswith(f"{path}/{folder.name}/") else None
    if relative is None:
        raise ValueError(f"{stored_path} is not in the search {child(uri, folder.name)}")
    (folder / relative).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(stored_path, str(folder / relative), source_filesystem=filesystem, destination_filesystem=LOCAL)
    return folder / relative


def uri_of(uri: str, stored_path: str) -> str:
    """The URI of a path Tune gives on the filesystem of `uri` (e.g. a checkpoint's), with the URI's query."""
    _, path = open_uri(uri)
    if not stored_path.startswith(f"{path}/"):
        raise ValueError(f"{stored_path} is not under {uri}")
    return child(uri, stored_path[len(path) + 1 :])


def write_probe(storage: str, relative: str, text: str) -> None:
    if is_uri(storage):
        filesystem, path = open_uri(storage)
        with filesystem.open_output_stream(f"{path}/{relative}") as stream:
            stream.write(text.encode())
    else:
        Path(storage).mkdir(parents=True, exist_ok=True)
        (Path(storage) / relative).write_text(text)


def remove_probe(storage: str, relative: str) -> None:
    if is_uri(storage):
        filesystem, path = open_uri(storage)
        filesystem.delete_file(f"{path}/{relative}")
    else:
        (Path(storage) / relative).unlink(missing_ok=True)


def read_probe(storage: str, relative: str) -> str:
    """Runs in a task on one node: the probe's text as this node reads it from the storage, or why it can't."""
    try:
        if is_uri(storage):
            filesystem, path = open_uri(storage)
            with filesystem.open_input_stream(f"{path}/{relative}") as stream:
                return stream.read().decode()
        return (Path(storage) / relative).read_text()
    except (OSError, UserError) as error:
        return f"error: {first_line(error)}"


def answer(probe: Any) -> str:
    """A finished probe's text, or why its task failed (its node gone, say)."""
    import ray

    try:
        return ray.get(probe)
    except ray.exceptions.RayError as error:
        return f"error: {first_line(error)}"


def check_every_node_sees(storage: str, timeout: float = 120, nodes: list[dict] | None = None) -> None:
    """On a cluster of several nodes, UserError when another node can't read a probe the driver wrote to the
    storage: a folder that only the driver's node has, or a URI the node has no credentials for. `nodes`: Ray's
    list of them (ray.nodes()). A node that is gone by the end of the check is not asked: a driver started as a
    node was lost (the chaos benchmark's node_replace) crashed on its unschedulable probe."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    others = [node for node in (ray.nodes() if nodes is None else nodes) if node["Alive"] and node["NodeID"] != here]
    if not others:
        return
    token = uuid.uuid4().hex
    relative = f".probe-nodes-{token[:12]}"
    write_probe(storage, relative, token)
    try:
        task = ray.remote(num_cpus=0, max_retries=0)(read_probe)
        pinned = [NodeAffinitySchedulingStrategy(node["NodeID"], soft=False) for node in others]
        probes = [task.options(scheduling_strategy=where).remote(storage, relative) for where in pinned]
        answered, _ = ray.wait(probes, num_returns=len(probes), timeout=timeout)
        seen = [answer(probe) if probe in answered else f"no answer in {timeout:g} s" for probe in probes]
    finally:
        remove_probe(storage, relative)
    alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    blind = [
        (f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})", text)
        for node, text in zip(others, seen, strict=True)
        if text != token and node["NodeID"] in alive
    ]
    if blind:
        address, text = blind[0]
        why = "set its credentials on every node" if is_uri(storage) else "a folder only the driver's node has"
        raise UserError(
            f"--storage-path {storage}: node {address} can't read what the driver writes there "
            f"({text if text.startswith(('error', 'no answer')) else 'it reads other content'}): {why}; on a cluster "
            "use a folder that every node mounts (NFS) or a URI such as s3://bucket/prefix"
        )
