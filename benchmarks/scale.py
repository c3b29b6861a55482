"""A search of many tiny trials: what the machinery around a trial costs as the trial count grows.

    python benchmarks/scale.py --trials 1000             # the table in docs/benchmarks.md ("1,000 trials")
    python benchmarks/scale.py --trials 200 --profile     # and a cProfile of the driver, top functions printed

Each size is one real search (`search/tune_mlp.py`, the smoke space, random, W&B offline, 2 trials at a time on a
local Ray), run as a subprocess. Measured per size: the driver's wall and its seconds per trial, the search's own
wall (Tune's fit, over its drivers), the driver's peak RSS (sampled every 0.2 s), Tune's experiment-state file,
the search folder's size and files per trial, and the seconds the driver spent collecting the trials, writing
summary.json and trials.csv, the report and the W&B summary run (timed inside the driver). While a search runs,
the seconds, peak RSS and state size when 100, 300 and 1,000 of its trials had ended (one 1,000-trial search
gives all three). Writes the figures as JSON beside the searches.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

# the driver, with the steps that run once at the end timed: their seconds go to the file TIMES names
PRELUDE = """
import json, os, sys, time
from text_recognizer.search import driver
times = {}
def timed(name, function):
    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            times[name] = times.get(name, 0.0) + time.perf_counter() - began
            with open(os.environ["SCALE_TIMES"], "w") as out:
                json.dump(times, out)
    return wrapper
for name in ("collect", "write_results", "write_report", "finish_search", "keep_best_trials", "test_winner"):
    setattr(driver, name, timed(name, getattr(driver, name)))
from text_recognizer.cli import tune_mlp
tune_mlp(sys.argv[1:])
"""


MILESTONES = (100, 300, 1000)  # ended trials at which a run's figures so far are recorded


def tune_state_size(folder: Path) -> int:
    """Bytes of Tune's own experiment state (its copies written whole, *~whole.json, hold the same)."""
    return sum(p.stat().st_size for p in folder.glob("experiment_state-*.json") if "~whole" not in p.name)


def ended(folder: Path, seen: set[str]) -> int:
    """Trials of the search that have ended (their result.json's last line is done); `seen` caches them."""
    for path in folder.glob("trial_*/result.json"):
        if path.parent.name in seen:
            continue
        with path.open("rb") as stream:
            stream.seek(max(0, path.stat().st_size - 4096))
            tail = stream.read().decode(errors="replace").rstrip("\n").rsplit("\n", 1)[-1]
        if '"done": true' in tail:
            seen.add(path.parent.name)
    return len(seen)


def watch(process: psutil.Process, folder: Path, began: float, stop: threading.Event, seen: dict[str, Any]) -> None:
    """The driver's peak RSS (every 0.2 s) and, every few seconds, the trials ended: at each milestone the
    seconds since launch, the peak RSS so far and the size of Tune's experiment state."""
    done: set[str] = set()
    last_count = 0.0
    while not stop.is_set():
        try:
            seen["peak"] = max(seen["peak"], process.memory_info().rss)
        except psutil.NoSuchProcess:
            return
        if time.time() - last_count > 3:
            last_count = time.time()
            count = ended(folder, done)
            for milestone in MILESTONES:
                if count >= milestone and milestone not in seen["milestones"]:
                    state = tune_state_size(folder)
                    seen["milestones"][milestone] = {
                        "seconds": time.time() - began,
                        "peak_rss_mb": seen["peak"] / 2**20,
                        "experiment_state_mb": state / 2**20,
                        "load_average": os.getloadavg()[0],
                    }
                    print(
                        f"  {milestone} trials ended at {time.time() - began:.0f} s: {seen['milestones'][milestone]}", flush=True
                    )
        time.sleep(0.2)


def folder_size(folder: Path) -> tuple[int, int]:
    # not links: W&B links every run's logs/debug-core.log to one shared log, which would count once per run
    files = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
    return sum(p.stat().st_size for p in files), len(files)


def one_search(trials: int, root: Path, data_dir: Path, profile: bool) -> dict[str, Any]:
    name = f"scale{trials}"
    times = root / f"{name}-times.json"
    flags = ["--smoke-test", "--num-samples", str(trials), "--search-alg", "random", "--max-concurrent", "2"]
    flags += ["--wandb-mode", "offline", "--storage-path", str(root), "--name", name, "--quiet", f"--data_dir={data_dir}"]
    python = [sys.executable]
    if profile:
        python += ["-m", "cProfile", "-o", str(root / f"{name}.prof")]
    command = [*python, write_prelude(root), *flags]
    env = {**os.environ, "SCALE_TIMES": str(times), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    began = time.time()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop, seen = threading.Event(), {"peak": 0, "milestones": {}}
    peak = seen  # the figures below read seen["peak"]
    args = (psutil.Process(process.pid), root / name, began, stop, seen)
    sampler = threading.Thread(target=watch, args=args, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    wall = time.time() - began
    stop.set()
    if process.returncode not in (0, 130, 143):  # 130, 143: stopped (Ctrl-C, SIGTERM); its figures so far count
        raise SystemExit(f"the {trials}-trial search exited {process.returncode}:\n{output[-3000:]}")
    folder = root / name
    summary = json.loads((folder / "summary.json").read_text())
    size, files = folder_size(folder)
    state = tune_state_size(folder)
    ended_trials = sum(n for status, n in summary["statuses"].items() if status not in ("pending", "interrupted"))
    trials = ended_trials or trials  # a stopped search: per trial that ended
    figures = {
        "trials": trials,
        "interrupted": summary["interrupted"],
        "driver_seconds": wall,
        "driver_seconds_per_trial": wall / trials,
        "search_seconds": summary["wall_seconds"],
        "search_seconds_per_trial": summary["wall_seconds"] / trials,
        "driver_peak_rss_mb": peak["peak"] / 2**20,
        "experiment_state_mb": state / 2**20,
        "disk_mb": size / 2**20,
        "disk_kb_per_trial": size / 1024 / trials,
        "files": files,
        "statuses": summary["statuses"],
        "end_seconds": json.loads(times.read_text()) if times.is_file() else {},
        "milestones": seen["milestones"],
        "load_average": os.getloadavg(),
    }
    print(
        f"{trials:>6} trials: driver {wall:7.1f} s ({wall / trials:.3f} s/trial), search {summary['wall_seconds']:7.1f} s "
        f"({summary['wall_seconds'] / trials:.3f} s/trial), peak RSS {peak['peak'] / 2**20:6.0f} MB, "
        f"state {state / 2**20:5.2f} MB, disk {size / 2**20:6.1f} MB ({size / 1024 / trials:.0f} KB/trial, {files} files); "
        f"end steps {', '.join(f'{k} {v:.1f} s' for k, v in figures['end_seconds'].items())}",
        flush=True,
    )
    return figures


def write_prelude(root: Path) -> str:
    path = root / "driver_prelude.py"
    path.write_text(PRELUDE)
    return str(path)


def print_profile(path: Path, top: int = 25) -> None:
    import pstats

    print(f"\ncProfile of the driver ({path}), by cumulative time:")
    pstats.Stats(str(path)).sort_stats("cumulative").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[1000], help="a search of each size (default 1000)")
    parser.add_argument("--profile", action="store_true", help="run each driver under cProfile and print its top functions")
    parser.add_argument("--folder", type=Path, default=None, help="where the searches go (default: a temporary folder)")
    args = parser.parse_args(argv)
    from text_recognizer.data.raw_files import FashionMNISTFiles

    root = args.folder or Path(tempfile.mkdtemp(prefix="scale-"))
    root.mkdir(parents=True, exist_ok=True)
    data_dir = root / "data"
    FashionMNISTFiles.ensure_raw_files(data_dir)
    print(f"scale: {args.trials} trials, in {root}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    figures = []
    for trials in args.trials:
        figures.append(one_search(trials, root, data_dir, args.profile))
        if args.profile:
            print_profile(root / f"scale{trials}.prof")
    (root / "scale.json").write_text(json.dumps({"load_average": os.getloadavg(), "figures": figures}, indent=2))
    print(f"figures: {root / 'scale.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
