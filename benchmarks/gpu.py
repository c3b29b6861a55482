"""GPU benchmark, for a machine with an NVIDIA GPU (e.g. one H200): one short script, one table, both trial modes.

    python benchmarks/gpu.py [--trial-process actor fork] [--samples 50] [--budget-s 420] [--out benchmarks/results]
    python benchmarks/gpu.py --cpu-stand-in --samples 4 --max-t 2     # no GPU: the same steps, small, on CPUs

On the GPU machine lent through the `device` tool, run it through benchmarks/device/run.py (it brings Ray there).
It is also the check that CUDA works in forks: run it with fork before choosing --trial-process fork on GPUs.

Measures, for each trial mode, with the data resident on the GPU (BaseDataModule puts it there when a trial
trains on one), in this order (with --budget-s, a step that would not fit in what is left is skipped, and says so):
1. seconds per epoch of the default MLP in one trial alone on the GPU, against a plain PyTorch loop on the GPU;
2. the wall time of a 50-sample search of benchmarks/speed_config.yaml with the default packing (4 trials per
   GPU), how many trials ran at once and their GPU memory;
3. searches of 16 and 8 short trials (2 epochs of 100 batches) at 16 and 8 trials per GPU: how many ran at once,
   their GPU memory, s/epoch as the GPU fills up, and the epochs per second of all trials together.
GPU memory per trial is each trial process's peak as nvidia-smi sees it (CUDA context included), and PyTorch's peak
allocation. Prints one table and writes JSON (after every step, so a run cut short still leaves its figures).
W&B is disabled (the GPU image has none). Needs Debian's dataset-fashion-mnist or Fashion-MNIST files in --data-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.run import DEFAULT_RUN, FASHION_CONFIG, MODES, _trial_results, ours, plain_loop_seconds_per_epoch  # noqa: E402
from text_recognizer.data.mnist import FashionMNIST  # noqa: E402

# a step's expected seconds on one H200 (guesses until the first run: used only to skip what --budget-s can't fit)
EXPECTED_SECONDS = {"one": 45, "search": 150, "pack": 45}
PACK_BATCHES = 100  # train batches per epoch in the packing searches
ONE_PRECISIONS = ("32-true", "bf16-mixed")  # the one-trial step, each against the plain loop in the same precision


class GpuMemory(threading.Thread):
    """Polls nvidia-smi: the peak memory of each compute process on the GPU, and the GPU's peak memory in use."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.per_process: dict[str, float] = {}
        self.baseline = self.peak_used = self._used()
        self.running = True

    @staticmethod
    def _query(*args: str) -> list[list[str]]:
        try:
            done = subprocess.run(["nvidia-smi", *args, "--format=csv,noheader,nounits"], capture_output=True, text=True)
        except OSError:
            return []
        return [[f.strip() for f in line.split(",")] for line in done.stdout.splitlines() if line.strip()]

    def _used(self) -> float | None:
        rows = self._query("--query-gpu=memory.used")
        return sum(float(row[0]) for row in rows) if rows else None

    def run(self) -> None:
        while self.running:
            for pid, used in (row for row in self._query("--query-compute-apps=pid,used_memory") if len(row) == 2):
                try:
                    self.per_process[pid] = max(float(used), self.per_process.get(pid, 0.0))
                except ValueError:
                    pass
            used = self._used()
            if used is not None:
                self.peak_used = max(used, self.peak_used or 0.0)
            time.sleep(0.5)

    def stop(self) -> dict[str, float | None]:
        self.running = False
        self.join()
        return {
            "gpu_mb_per_process_median": statistics.median(self.per_process.values()) if self.per_process else None,
            "gpu_processes_seen": len(self.per_process),
            "gpu_mb_used_peak_over_idle": (self.peak_used - self.baseline) if self.baseline is not None else None,
        }


def search(storage: Path, name: str, data_dir: Path, samples: int, max_t: int | None, extra: list[str], mode: str) -> dict:
    """One of our searches, with how many trials ran at once and their GPU memory."""
    flags = {a.split("=")[0][2:]: a.split("=", 1)[1] for a in extra if "=" in a}
    resources = tuple(a for a in extra if "=" not in a)
    sampler = GpuMemory() if torch.cuda.is_available() else None
    if sampler:
        sampler.start()
    figures = ours(name, storage, data_dir, FASHION_CONFIG, samples, max_t, flags, resources, mode, wandb_mode="disabled")
    frames = _trial_results(storage / name)
    spans = [(rows[0]["trial_started_at"], rows[-1]["reported_at"]) for rows in frames.values() if rows]
    concurrency = max(sum(a <= t <= b for a, b in spans) for t, _ in spans) if spans else 0
    allocated = [max(r.get("gpu_memory_mb", 0) for r in rows) for rows in frames.values() if rows]
    return {
        **figures,
        "max_concurrent": concurrency,
        "torch_peak_allocated_mb_per_trial": max(allocated) if allocated else None,
        **(sampler.stop() if sampler else {}),
        "epochs_per_second": figures["total_epochs"] / figures["wall_seconds"] if figures["wall_seconds"] else None,
    }


def plan(args: argparse.Namespace, gpus: int, cpus: int) -> list[tuple[str, str, int, int, int | None, list[str]]]:
    """The steps, most wanted first: (kind, mode, trials per GPU, samples, max_t, extra flags)."""
    single = [f"--{k}={v}" for k, v in DEFAULT_RUN.items()]
    gpu_flag = "0" if args.cpu_stand_in else "1"
    alone = [*single, "--gpus-per-trial", gpu_flag, "--cpus-per-trial", "1"]
    # one trial alone in each precision (bf16-mixed: Ampere and later compute it natively; the rest use auto)
    steps = [("one", m, 1, 1, args.one_epochs, [*alone, f"--precision={p}"]) for p in ONE_PRECISIONS for m in args.modes]
    default_packing = 1 if args.cpu_stand_in else 4  # the search's own default: 4 trials per GPU (1 CPU each on CPUs)
    steps += [("search", m, default_packing, args.samples, args.max_t, []) for m in args.modes]
    for per_gpu in args.packing:
        cpus_each = 1 if args.cpu_stand_in else max(1, cpus // (per_gpu * gpus))
        share = "0" if args.cpu_stand_in else str(1 / per_gpu)
        extra = [*single, "--gpus-per-trial", share, "--cpus-per-trial", str(cpus_each), f"--limit_train_batches={PACK_BATCHES}"]
        steps += [("pack", m, per_gpu, per_gpu * max(gpus, 1), 2, extra) for m in args.modes]  # CPUs: 1 each
    return steps


def table(result: dict[str, Any]) -> str:
    """The one table: a row per step and trial mode."""
    plains = result.get("plain_loop_seconds_per_epoch_by_precision") or {"32-true": result.get("plain_loop_seconds_per_epoch")}
    device = "CPU stand-in (no GPU)" if result["cpu_stand_in"] else f"{result['gpu']} x{result['gpus']}"
    lines = [
        f"{device}, {result['cpus']} CPUs, torch {result['torch']}, ray {result['ray']}, W&B disabled; "
        f"plain loop on the {'CPU' if result['cpu_stand_in'] else 'GPU'} (default MLP, batch 128), s/epoch: "
        + ", ".join(f"{p} {_fmt(v, 2)}" for p, v in plains.items()),
        f"{'step':<24}{'mode':<7}{'per GPU':>8}{'at once':>8}{'s/epoch':>9}{'/plain':>8}{'GPU MB/proc':>12}"
        f"{'torch MB':>9}{'wall s':>8}{'epochs':>7}{'epochs/s':>9}{'best acc':>9}",
    ]
    for row in result["steps"]:
        label = {
            "one": f"one trial, {row.get('precision', '32-true')}",
            "search": f"{row['samples']}-sample search",
            "pack": f"{row['samples']} short trials",
        }
        head = f"{label[row['kind']]:<24}{row['mode']:<7}{row['per_gpu']:>8}"
        if "skipped" in row or "error" in row:
            lines.append(f"{head}  {row.get('skipped') or row.get('error')}")
            continue
        own = plains.get(row.get("precision", "32-true"))  # the plain loop in the trial's own precision
        ratio = row["seconds_per_epoch"] / own if row["kind"] == "one" and row["seconds_per_epoch"] and own else None
        lines.append(
            f"{head}{row['max_concurrent']:>8}{_fmt(row['seconds_per_epoch'], 2):>9}{_fmt(ratio, 2):>8}"
            f"{_fmt(row.get('gpu_mb_per_process_median'), 0):>12}{_fmt(row['torch_peak_allocated_mb_per_trial'], 0):>9}"
            f"{_fmt(row['wall_seconds'], 0):>8}{row['total_epochs']:>7}{_fmt(row['epochs_per_second'], 2):>9}"
            f"{_fmt(row['best_val_acc'], 4):>9}"
        )
    lines.append(
        f"per GPU: trials per GPU asked for; at once: the most that trained at the same time; s/epoch: median of epochs "
        f"after the first ({PACK_BATCHES} train batches in the short trials, all 430 otherwise); GPU MB/proc: median "
        f"peak per process on the GPU (nvidia-smi, CUDA context included; '-' where it shows none); torch MB: the "
        f"largest peak allocated by a trial; epochs/s: all trials' epochs over the wall time."
    )
    return "\n".join(lines)


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trial-process", dest="modes", nargs="+", choices=MODES, default=list(MODES), help="where trials train")
    parser.add_argument("--samples", type=int, default=50, help="samples of the search step")
    parser.add_argument("--max-t", type=int, default=None, help="epochs per trial in the search step (default: the config's 10)")
    parser.add_argument("--one-epochs", type=int, default=4, help="epochs of the one-trial step")
    parser.add_argument("--packing", type=int, nargs="*", default=[16, 8], help="trials per GPU of the short-trial steps")
    parser.add_argument("--budget-s", type=float, default=None, help="skip the steps that would end after this many seconds")
    parser.add_argument("--cpu-stand-in", action="store_true", help="no GPU: run the same steps on CPUs (checks the script)")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--table-from", type=Path, default=None, help="only print the table of a JSON this wrote")
    args = parser.parse_args(argv)
    if args.table_from:
        result = json.loads(args.table_from.read_text())
        print(table(result))
        return result
    began = time.time()
    if not torch.cuda.is_available() and not args.cpu_stand_in:
        sys.exit("gpu.py: error: no CUDA GPU here (torch.cuda.is_available() is False); --cpu-stand-in runs it on CPUs")
    import ray

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="bench-data-"))
    FashionMNIST.ensure_raw_files(data_dir)
    arrays = FashionMNIST.load_arrays(data_dir)
    storage = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    gpus, cpus = (0 if args.cpu_stand_in else torch.cuda.device_count()), os.cpu_count() or 1
    result: dict[str, Any] = {
        "gpu": None if args.cpu_stand_in else torch.cuda.get_device_name(0),
        "gpus": gpus,
        "cpus": cpus,
        "cpu_stand_in": args.cpu_stand_in,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "steps": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    device, threads = ("cpu", 1) if args.cpu_stand_in else ("cuda", cpus)
    result["plain_loop_seconds_per_epoch_by_precision"] = {
        p: plain_loop_seconds_per_epoch(arrays, threads, device=device, precision=p) for p in ONE_PRECISIONS
    }
    result["plain_loop_seconds_per_epoch"] = result["plain_loop_seconds_per_epoch_by_precision"]["32-true"]
    print(f"plain loop: {result['plain_loop_seconds_per_epoch_by_precision']} s/epoch ({time.time() - began:.0f} s)", flush=True)
    path.write_text(json.dumps(result, indent=2))
    for kind, mode, per_gpu, samples, max_t, extra in plan(args, gpus, cpus):
        row: dict[str, Any] = {"kind": kind, "mode": mode, "per_gpu": per_gpu, "samples": samples}
        row["precision"] = next((a.split("=", 1)[1] for a in extra if a.startswith("--precision=")), "auto")
        left = args.budget_s - (time.time() - began) if args.budget_s else None
        if left is not None and left < EXPECTED_SECONDS[kind]:
            row["skipped"] = f"skipped: {left:.0f} s of the budget left, expected {EXPECTED_SECONDS[kind]} s"
        else:
            name = f"{kind}-{mode}-{per_gpu}-{row['precision']}"
            try:
                row.update(search(storage, name, data_dir, samples, max_t, extra, mode))
            except (Exception, SystemExit) as error:  # one failed step is a row; the others still run
                row["error"] = f"failed: {type(error).__name__}: {str(error)[:200]}"
                traceback.print_exc(file=sys.stdout)
        result["steps"].append(row)
        outcome = row.get("skipped") or row.get("error") or "done"
        print(f"  {kind} {mode} {per_gpu}/GPU: {outcome} ({time.time() - began:.0f} s)", flush=True)
        path.write_text(json.dumps(result, indent=2))
    ray.shutdown()
    result["wall_seconds"] = time.time() - began
    path.write_text(json.dumps(result, indent=2))
    print("\n" + table(result))
    print(f"wrote {path} ({result['wall_seconds']:.0f} s in all)")
    return result


if __name__ == "__main__":
    main()
