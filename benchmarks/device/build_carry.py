"""Build the carry folder of the GPU check: what benchmarks/device/run.py needs on the GPU machine that its image lacks.

    python benchmarks/device/build_carry.py                  # for the GPU image's Python (3.12): .device/
    python benchmarks/device/build_carry.py --python 3.11    # for this machine's Python (a stand-in, for testing)

The GPU machine (the `device` tool's nvidia-h200) has torch, Lightning, torchmetrics, torchvision, pandas, pyarrow and
numpy but no Ray and no W&B, nothing can be fetched there, and a call carries at most 64 MiB (the repo's files
included). So this writes, into an ignored folder (default .device/):
- ray-<version>-cp3XX-slim.tar.xz: Ray's wheel for that Python, unpacked, without its Java jars, RLlib, Serve, the
  LLM library and the dashboard's source maps (none of which a local Tune search uses), packed with xz;
- wheels/: every package that Ray and its `tune` extra need, directly or not, that the image's list
  (image-packages.txt) lacks: wheels for that Python, at the versions installed here;
- data/: Fashion-MNIST's four .gz files (Debian's dataset-fashion-mnist), checked by their decompressed md5;
- manifest.json: what is there, for run.py.
Prints each file's size, the total with the repo's files, and fails if that is over 64 MiB.
Needs pip and the network to PyPI (downloads are cached in ~/.cache/text-recognizer-device/).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
from text_recognizer.facts import FASHION_MNIST_MD5  # noqa: E402  (the standard library only: no torch needed)

LIMIT = 64 * 2**20  # what one device call carries: the repo's files and the carried folders together
RAY_VERSION = "2.60.0"  # pyproject pins ray>=2.60,<2.61
RAY_EXTRAS = ("tune",)
# parts of Ray a local Tune search never imports or runs
STRIP_DIRS = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/", "ray/tune/examples/", "ray/rllib/examples/")
STRIP_SUFFIXES = (".map",)  # the dashboard's JavaScript source maps
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "text-recognizer-device"
FASHION_GZ = Path("/usr/share/datasets/fashion-mnist")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> set[str]:
    lines = (HERE / "image-packages.txt").read_text().splitlines()
    return {normalize(line) for line in lines if line.strip() and not line.startswith("#")}


def download(name: str, version: str, python: str) -> Path:
    """The wheel of name==version for CPython `python` on x86-64 Linux, from PyPI (cached)."""
    folder = CACHE / f"py{python}"
    folder.mkdir(parents=True, exist_ok=True)
    for path in folder.glob("*.whl"):
        found, found_version, _, _ = parse_wheel_filename(path.name)
        if found == canonicalize_name(name) and str(found_version) == version:
            return path
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python]
    command += ["--implementation", "cp", *[f"--platform={platform}" for platform in PLATFORMS], "-d", str(folder)]
    subprocess.run([*command, f"{name}=={version}"], check=True)
    return download(name, version, python)


def requirements_of(wheel: Path) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        text = archive.read(metadata).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def missing_packages(ray_wheel: Path, python: str, image: set[str]) -> list[tuple[str, str]]:
    """(name, version) of each package that Ray with RAY_EXTRAS needs, directly or not, that the image lacks; the
    versions are the ones installed here (with this Ray, they are what the tests run on)."""
    environment = {**default_environment(), "python_version": python, "python_full_version": f"{python}.0"}
    todo = [(line, extra) for line in requirements_of(ray_wheel) for extra in ("", *RAY_EXTRAS)]
    seen: dict[str, str] = {}
    while todo:
        line, extra = todo.pop()
        requirement = Requirement(line)
        if requirement.marker and not requirement.marker.evaluate({**environment, "extra": extra}):
            continue
        name = normalize(requirement.name)
        if name in image or name in seen:
            continue
        try:
            installed = distribution(requirement.name)
        except PackageNotFoundError:
            raise SystemExit(f"build_carry.py: error: {requirement.name} (needed by Ray) is not installed here") from None
        seen[name] = installed.version
        todo += [(sub, "") for sub in installed.requires or []]
    return sorted(seen.items())


def slim_ray(wheel: Path, out: Path) -> tuple[int, int]:
    """Unpack Ray's wheel without STRIP_* (file modes kept: raylet and gcs_server must stay executable) and pack it
    as tar.xz; returns the unpacked bytes kept and dropped."""
    kept = dropped = 0
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            name = info.filename
            if name.endswith("/"):
                continue
            if name.startswith(STRIP_DIRS) or name.endswith(STRIP_SUFFIXES):
                dropped += info.file_size
                continue
            path = Path(archive.extract(info, tmp))
            path.chmod((info.external_attr >> 16) & 0o777 or 0o644)
            kept += info.file_size
        partial = out.with_suffix(".partial")
        with tarfile.open(partial, "w:xz", preset=9 | lzma.PRESET_EXTREME) as tar:
            for top in sorted(os.listdir(tmp)):
                tar.add(Path(tmp) / top, arcname=top)
        partial.replace(out)
    return kept, dropped


def copy_data(source: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, expected in FASHION_MNIST_MD5.items():
        gz = source / f"{name}.gz"
        if not gz.is_file():
            raise SystemExit(f"build_carry.py: error: {gz} is missing (apt-get install dataset-fashion-mnist)")
        if hashlib.md5(gzip.decompress(gz.read_bytes())).hexdigest() != expected:
            raise SystemExit(f"build_carry.py: error: {gz}: checksum mismatch after decompression")
        shutil.copyfile(gz, out / gz.name)


def repo_bytes() -> int:
    """What a device call sends besides the carry: the tracked files and the untracked ones git doesn't ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    return sum((ROOT / name).stat().st_size for name in listed.decode().split("\0") if name and (ROOT / name).is_file())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default="3.12", help="the GPU image's Python (3.12); this machine's for a local test")
    parser.add_argument("--out", type=Path, default=ROOT / ".device", help="the carry folder (an ignored path)")
    parser.add_argument("--data", type=Path, default=FASHION_GZ, help="folder with Fashion-MNIST's four .gz files")
    args = parser.parse_args(argv)
    began = time.time()
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    tag = f"cp{args.python.replace('.', '')}"

    ray_wheel = download("ray", RAY_VERSION, args.python)
    ray_tar = args.out / f"ray-{RAY_VERSION}-{tag}-slim.tar.xz"
    kept, dropped = slim_ray(ray_wheel, ray_tar)
    print(f"ray {RAY_VERSION} ({ray_wheel.name}, {ray_wheel.stat().st_size / 2**20:.1f} MiB): kept {kept / 2**20:.0f} MiB, ")
    print(f"  dropped {dropped / 2**20:.0f} MiB unpacked (jars, RLlib, Serve, LLM, source maps) -> {ray_tar.name}")

    (args.out / "wheels").mkdir()
    missing = missing_packages(ray_wheel, args.python, image_packages())
    for name, version in missing:
        shutil.copy(download(name, version, args.python), args.out / "wheels")
    print(f"not in the GPU image, carried as wheels: {', '.join(f'{n}=={v}' for n, v in missing)}")

    copy_data(args.data, args.out / "data")
    files = sorted(path for path in args.out.rglob("*") if path.is_file())
    manifest = {
        "python": args.python,
        "ray": RAY_VERSION,
        "ray_tar": ray_tar.name,
        "wheels": sorted(path.name for path in (args.out / "wheels").iterdir()),
        "data": sorted(path.name for path in (args.out / "data").iterdir()),
        "bytes": {str(path.relative_to(args.out)): path.stat().st_size for path in files},
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2))

    carried = sum(manifest["bytes"].values())
    repo = repo_bytes()
    print(f"\n{'file':<58}{'MiB':>8}")
    for name, size in manifest["bytes"].items():
        print(f"{name:<58}{size / 2**20:>8.2f}")
    print(f"{'carry folder ' + str(args.out.name):<58}{carried / 2**20:>8.2f}")
    print(f"{'repo files (tracked + untracked, not ignored)':<58}{repo / 2**20:>8.2f}")
    total = carried + repo
    verdict = "fits" if total <= LIMIT else "DOES NOT FIT"
    print(f"{'total sent by one device call':<58}{total / 2**20:>8.2f}  {verdict} in 64 MiB ({time.time() - began:.0f} s)")
    manifest.update(carried_bytes=carried, repo_bytes=repo, fits=total <= LIMIT)
    if total > LIMIT:
        raise SystemExit(1)
    return manifest


if __name__ == "__main__":
    main()
