"""GPU benchmark, for a machine with an NVIDIA GPU (e.g. one H200): run as one short script.

    python benchmarks/gpu.py [--samples 50] [--trial-process actor|fork] [--out benchmarks/results]

Run it with --trial-process fork before choosing fork on GPUs: it is the check that CUDA works in forks.

Measures, with the data resident on the GPU (BaseDataModule puts it there when a trial trains on one):
1. seconds per epoch of the default MLP in a trial on the GPU vs a plain PyTorch loop on the GPU;
2. how many trials one GPU holds at once: searches at 4, 8 and 16 trials per GPU, the concurrency
   reached, each trial's peak GPU memory and the seconds per epoch as the GPU fills up;
3. the wall time of a 50-sample search of experiments/fashion_mlp_asha.yaml with the default packing.
Prints a table and writes JSON. Needs Debian's dataset-fashion-mnist or Fashion-MNIST files in --data-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.run import DEFAULT_RUN, FASHION_CONFIG, _trial_results, ours, plain_loop_seconds_per_epoch  # noqa: E402
from text_recognizer.data import FashionMNIST  # noqa: E402


def search(storage: Path, name: str, data_dir: Path, samples: int, extra: list[str], trial_process: str) -> dict:
    """One of our searches on the GPU, with how many trials ran at once and their peak GPU memory."""
    flags = {a.split("=")[0][2:]: a.split("=", 1)[1] for a in extra if "=" in a}
    resources = tuple(a for a in extra if "=" not in a)
    figures = ours(name, storage, data_dir, FASHION_CONFIG, samples, None, flags, resources, trial_process)
    frames = _trial_results(storage / name)
    spans = [(rows[0]["trial_started_at"], rows[-1]["reported_at"]) for rows in frames.values() if rows]
    concurrency = max(sum(a <= t <= b for a, b in spans) for t, _ in spans) if spans else 0
    memory = [max(r.get("gpu_memory_mb", 0) for r in rows) for rows in frames.values() if rows]
    return {**figures, "max_concurrent": concurrency, "peak_gpu_memory_mb_per_trial": max(memory) if memory else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--trial-process", choices=("actor", "fork"), default="actor", help="where trials train")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu.py: error: no CUDA GPU here")
    import ray

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="bench-data-"))
    FashionMNIST.ensure_raw_files(data_dir)
    arrays = FashionMNIST.load_arrays(data_dir)
    storage = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    gpus, cpus, mode = torch.cuda.device_count(), os.cpu_count(), args.trial_process
    result: dict = {"gpu": torch.cuda.get_device_name(0), "gpus": gpus, "cpus": cpus, "trial_process": mode}
    result["date"] = time.strftime("%Y-%m-%d")
    result["plain_loop_seconds_per_epoch"] = plain_loop_seconds_per_epoch(arrays, cpus or 1, device="cuda")
    single = [f"--{k}={v}" for k, v in DEFAULT_RUN.items()]
    result["one_trial"] = search(storage, "one", data_dir, 1, [*single, "--gpus-per-trial", "1", "--cpus-per-trial", "1"], mode)
    result["packing"] = {}
    for per_gpu in (4, 8, 16):
        cpus_each = max(1, cpus // (per_gpu * gpus))
        extra = [*single, "--gpus-per-trial", str(1 / per_gpu), "--cpus-per-trial", str(cpus_each), "--limit_train_batches=100"]
        result["packing"][per_gpu] = search(storage, f"pack{per_gpu}", data_dir, per_gpu * gpus, extra, mode)
    result["search"] = search(storage, "search", data_dir, args.samples, [], mode)
    ray.shutdown()

    print(f"\n{result['gpu']} x{gpus}, {cpus} CPUs")
    print(
        f"seconds per epoch: trial {result['one_trial']['seconds_per_epoch']:.2f}, "
        f"plain loop {result['plain_loop_seconds_per_epoch']:.2f}, "
        f"ratio {result['one_trial']['seconds_per_epoch'] / result['plain_loop_seconds_per_epoch']:.2f}"
    )
    print(f"{'trials/GPU':>10}{'ran at once':>12}{'s/epoch':>10}{'peak MB/trial':>15}")
    for per_gpu, row in result["packing"].items():
        print(
            f"{per_gpu:>10}{row['max_concurrent']:>12}{row['seconds_per_epoch'] or 0:>10.2f}"
            f"{row['peak_gpu_memory_mb_per_trial'] or 0:>15.0f}"
        )
    s = result["search"]
    print(
        f"{args.samples}-sample search: {s['wall_seconds']:.0f} s, {s['total_epochs']} epochs, "
        f"best val_acc {s['best_val_acc']:.4f}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
