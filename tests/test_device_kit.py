"""The GPU check's kit (benchmarks/device/): what the carry holds, and run.py on a machine without a GPU.

The real carry needs PyPI and minutes (build_carry.py downloads Ray's 79 MB wheel): here it is made of small
stand-ins with the same layout, so that what these scripts do with it is checked on every run.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, write_tiny_mnist

DEVICE = ROOT / "benchmarks" / "device"


def load(name: str) -> Any:
    sys.path.insert(0, str(DEVICE))  # image_venv imports build_carry as its neighbour
    try:
        spec = importlib.util.spec_from_file_location(f"device_{name}", DEVICE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(DEVICE))


def fake_ray_wheel(path: Path, requires: list[str]) -> Path:
    """A wheel laid out like Ray's: a package that imports, an executable raylet, and parts the slim Ray drops."""
    files = {
        "ray/__init__.py": ("__version__ = '2.60.0'\n", 0o644),
        "ray/tune/__init__.py": ("", 0o644),
        "ray/core/src/ray/raylet/raylet": ("#!/bin/sh\necho raylet\n", 0o755),
        "ray/jars/ray_dist.jar": ("jar" * 1000, 0o644),
        "ray/rllib/__init__.py": ("", 0o644),
        "ray/dashboard/client/build/static/js/main.js": ("js", 0o644),
        "ray/dashboard/client/build/static/js/main.js.map": ("map" * 1000, 0o644),
        "ray-2.60.0.dist-info/METADATA": (
            "Name: ray\nVersion: 2.60.0\n" + "".join(f"Requires-Dist: {r}\n" for r in requires),
            0o644,
        ),
    }
    with zipfile.ZipFile(path, "w") as archive:
        for name, (text, mode) in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o100000 | mode) << 16
            archive.writestr(info, text)
    return path


def test_the_carry_holds_what_the_image_lacks(tmp_path: Path) -> None:
    """Ray's requirements (and its tune extra's), followed through the packages installed here, less the image's."""
    build = load("build_carry")
    wheel = fake_ray_wheel(
        tmp_path / "ray-2.60.0-cp311-cp311-manylinux2014_x86_64.whl",
        [
            "jsonschema",
            "msgpack<2.0.0,>=1.0.0",
            'pandas; extra == "tune"',
            'pydantic<3,>=2.5.0; extra == "tune"',
            'cupy; extra == "adag"',
        ],
    )
    image = {"msgpack", "pandas", "numpy", "attrs", "typing-extensions"}
    missing = dict(build.missing_packages(wheel, "3.11", image))
    assert {"jsonschema", "referencing", "rpds-py", "jsonschema-specifications", "pydantic", "pydantic-core"} <= set(missing)
    assert not set(missing) & (image | {"cupy", "ray"})  # what the image has; an extra the check doesn't use
    assert missing["jsonschema"] == build.distribution("jsonschema").version  # the version tested here


def test_the_slim_ray_drops_parts_and_keeps_modes(tmp_path: Path) -> None:
    build = load("build_carry")
    wheel = fake_ray_wheel(tmp_path / "ray.whl", [])
    kept, dropped = build.slim_ray(wheel, tmp_path / "ray.tar.xz")
    with tarfile.open(tmp_path / "ray.tar.xz") as tar:
        members = {member.name: member for member in tar.getmembers() if member.isfile()}
    assert "ray/__init__.py" in members and "ray-2.60.0.dist-info/METADATA" in members
    assert members["ray/core/src/ray/raylet/raylet"].mode & 0o111  # Ray's binaries stay executable
    assert not [name for name in members if name.startswith(("ray/jars", "ray/rllib")) or name.endswith(".map")]
    assert dropped > kept > 0


def fake_carry(tmp_path: Path, python: str) -> Path:
    """A carry folder as build_carry.py writes it, with the stand-in Ray, one wheel and tiny IDX data."""
    build = load("build_carry")
    carry = tmp_path / "carry"
    (carry / "wheels").mkdir(parents=True)
    (carry / "data").mkdir()
    build.slim_ray(fake_ray_wheel(tmp_path / "ray.whl", []), carry / "ray-slim.tar.xz")
    with zipfile.ZipFile(carry / "wheels" / "extra-1.0-py3-none-any.whl", "w") as archive:
        archive.writestr("extra_carried/__init__.py", "")
    raw = write_tiny_mnist(tmp_path / "idx", "FashionMNIST")
    for path in raw.iterdir():
        (carry / "data" / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes()))
    manifest = {"python": python, "ray": "2.60.0", "ray_tar": "ray-slim.tar.xz"}
    manifest |= {"wheels": ["extra-1.0-py3-none-any.whl"], "data": sorted(p.name for p in (carry / "data").iterdir())}
    (carry / "manifest.json").write_text(json.dumps(manifest))
    return carry


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_run_unpacks_the_carry_and_says_there_is_no_gpu(tmp_path: Path) -> None:
    """Ray imports from the unpacked carry, ahead of any installed one; without a GPU: one line, exit status 3."""
    carry = fake_carry(tmp_path, f"{sys.version_info.major}.{sys.version_info.minor}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(DEVICE / "run.py"), "--carry", str(carry), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 3, done.stdout + done.stderr[-3000:]
    assert "no GPU here" in done.stdout and "W&B" in done.stdout
    facts = json.loads((tmp_path / "out" / "environment.json").read_text())
    assert facts["ray_from"].endswith("site/ray") and "device-check-" in facts["ray_from"] and facts["cuda"] is False
    assert not Path(facts["ray_from"]).exists()  # the temporary folder is gone


def test_run_refuses_a_carry_for_another_python(tmp_path: Path) -> None:
    carry = fake_carry(tmp_path, "2.7")
    command = [sys.executable, str(DEVICE / "run.py"), "--carry", str(carry), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "built for Python 2.7" in done.stderr and "--python" in done.stderr
