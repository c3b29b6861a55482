"""The GPU check in one call of the `device` tool: unpack the carry folder, then run benchmarks/gpu.py in it.

On the GPU machine (the image has torch and Lightning but no Ray and no W&B, and nothing can be fetched), after
`python benchmarks/device/build_carry.py` here, one call of the device tool's `run`:
    carry: [".device"]
    command: PYTHONUNBUFFERED=1 python3 benchmarks/device/run.py --out "$OUT"
Here, without a GPU (with a carry built for this machine's Python: build_carry.py --python 3.11):
    python benchmarks/device/run.py --cpu-stand-in -- --samples 4 --max-t 2 --packing 2

It unpacks the slim Ray and the wheels into a temporary folder that goes first on PYTHONPATH (no pip install; Ray's
own binaries, raylet and gcs_server, are in it), decompresses Fashion-MNIST, checks that Ray imports from there and
says whether W&B is present, then runs benchmarks/gpu.py (both trial modes, W&B disabled) within --budget-s seconds
(default 480: the call's 8 minutes), stopping it if it runs over. gpu.py prints one table; the JSON of its figures,
its log and this check's environment land in --out. Without a GPU it says so and stops (exit status 3), unless
--cpu-stand-in. Anything after `--` goes to gpu.py. Standard library only: it runs before Ray is importable.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
NO_GPU = 3  # exit status when there is no GPU and no --cpu-stand-in

PREFLIGHT = """
import importlib.util, json, os, sys
import torch, pytorch_lightning, ray, ray.tune
print(json.dumps({
    "python": sys.version.split()[0], "executable": sys.executable, "torch": torch.__version__,
    "lightning": pytorch_lightning.__version__, "ray": ray.__version__, "ray_from": os.path.dirname(ray.__file__),
    "wandb": "present" if importlib.util.find_spec("wandb") else "absent",
    "cuda": torch.cuda.is_available(), "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    "cpus": os.cpu_count(),
}))
"""


def unpack(carry: Path, work: Path) -> tuple[Path, Path, dict]:
    """Ray and the wheels into work/site, the data into work/data/FashionMNIST/raw; returns them and the manifest."""
    manifest = json.loads((carry / "manifest.json").read_text())
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python"] != here:
        sys.exit(
            f"run.py: error: {carry} was built for Python {manifest['python']}, this is {here}: "
            f"run build_carry.py --python {here}"
        )
    site, raw = work / "site", work / "data" / "FashionMNIST" / "raw"
    site.mkdir(parents=True)
    with tarfile.open(carry / manifest["ray_tar"]) as tar:  # keeps file modes: raylet and gcs_server run from here
        if hasattr(tarfile, "data_filter"):
            tar.extractall(site, filter="data")
        else:
            tar.extractall(site)  # our own archive, on Pythons before the filters
    for wheel in manifest["wheels"]:
        with zipfile.ZipFile(carry / "wheels" / wheel) as archive:
            archive.extractall(site)
    raw.mkdir(parents=True)
    for name in manifest["data"]:
        (raw / name.removesuffix(".gz")).write_bytes(gzip.decompress((carry / "data" / name).read_bytes()))
    return site, raw.parents[1], manifest


def run_gpu_benchmark(command: list[str], env: dict, log: Path, timeout: float) -> int:
    """Run gpu.py, its output to the console and to `log`; past `timeout`, Ctrl-C it (then kill it)."""
    with log.open("w") as sink:
        output = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
        process = subprocess.Popen(command, env=env, start_new_session=True, **output)

        def pump() -> None:
            for line in process.stdout or []:
                sys.stdout.write(line)
                sys.stdout.flush()
                sink.write(line)
                sink.flush()

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"\nrun.py: gpu.py ran past {timeout:.0f} s: stopping it (what it measured so far is in its JSON)", flush=True)
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        thread.join(5)
    return process.returncode


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passed = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--carry", type=Path, default=ROOT / ".device", help="the folder build_carry.py wrote")
    default_out = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
    parser.add_argument("--out", type=Path, default=default_out, help="where the JSON and the logs go (default $OUT)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds for everything, unpacking included")
    parser.add_argument("--cpu-stand-in", action="store_true", help="no GPU: run gpu.py's steps on CPUs (checks the kit)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args(argv)
    began = time.time()
    if not (args.carry / "manifest.json").is_file():
        sys.exit(f"run.py: error: no {args.carry}/manifest.json: run benchmarks/device/build_carry.py first (and carry it)")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="device-check-"))
    try:
        site, data_dir, manifest = unpack(args.carry, work)
        print(
            f"unpacked Ray {manifest['ray']}, {len(manifest['wheels'])} wheels and the data into {work} "
            f"({time.time() - began:.1f} s)",
            flush=True,
        )
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        done = subprocess.run([sys.executable, "-c", PREFLIGHT], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-4000:])
            sys.exit("run.py: error: Ray, torch or Lightning does not import from the unpacked carry (above)")
        facts = json.loads(done.stdout.strip().splitlines()[-1])
        (args.out / "environment.json").write_text(json.dumps({**facts, "carry": manifest}, indent=2))
        print(
            f"python {facts['python']} ({facts['executable']}), torch {facts['torch']}, Lightning {facts['lightning']}, "
            f"ray {facts['ray']} from {facts['ray_from']}, W&B {facts['wandb']}, {facts['cpus']} CPUs, "
            f"GPUs: {', '.join(facts['gpus']) or 'none'}",
            flush=True,
        )
        if not facts["ray_from"].startswith(str(site)):
            print(f"run.py: warning: ray was imported from {facts['ray_from']}, not from the carry")
        if not facts["cuda"] and not args.cpu_stand_in:
            print(
                "run.py: no GPU here: torch.cuda.is_available() is False, nothing measured "
                "(--cpu-stand-in runs the same steps on CPUs)"
            )
            return NO_GPU
        left = args.budget_s - (time.time() - began)
        command = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--data-dir", str(data_dir), "--out", str(args.out)]
        command += ["--budget-s", f"{left - 40:.0f}", *(["--cpu-stand-in"] if args.cpu_stand_in else []), *passed]
        status = run_gpu_benchmark(command, env, args.out / "gpu.log", timeout=left - 15)
        if status != 0:
            results = sorted(args.out.glob("gpu-*.json"))
            if results:  # cut short: the table of what it measured
                subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--table-from", str(results[-1])], env=env)
        print(f"run.py: done in {time.time() - began:.0f} s, gpu.py exit status {status}; files in {args.out}")
        return status
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
