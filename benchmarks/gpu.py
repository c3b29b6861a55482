"""GPU benchmark, for a machine with an NVIDIA GPU (e.g. one H200): run as one short script.

    python benchmarks/gpu.py [--samples 50] [--out benchmarks/results]

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
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.run import DEFAULT_RUN, FASHION_CONFIG, _trial_results  # noqa: E402
from text_recognizer.data import FashionMNIST  # noqa: E402


def plain_gpu_epoch(arrays: dict, epochs: int = 3, batch_size: int = 128) -> float:
    """A plain loop on the GPU over GPU-resident tensors: median seconds per epoch after the first."""
    from text_recognizer.models import MLP

    device = torch.device("cuda")
    x, y = torch.from_numpy(arrays["x_train"]).to(device), torch.from_numpy(arrays["y_train"]).to(device)
    xv, yv = torch.from_numpy(arrays["x_val"]).to(device), torch.from_numpy(arrays["y_val"]).to(device)
    model = MLP({"input_dims": (1, 28, 28), "mapping": list(range(10))}, argparse.Namespace(**DEFAULT_RUN)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for _ in range(epochs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        order = torch.randperm(len(x), device=device)
        for i in range(0, len(x), batch_size):
            index = order[i : i + batch_size]
            loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            (model(xv).argmax(1) == yv).sum().item()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def search(storage: Path, name: str, data_dir: Path, samples: int, extra: list[str]) -> dict:
    from text_recognizer.cli import tune_mlp

    argv = [
        "--config",
        str(FASHION_CONFIG),
        "--num-samples",
        str(samples),
        "--storage-path",
        str(storage),
        "--name",
        name,
        f"--data_dir={data_dir}",
        "--wandb-mode",
        "offline",
        "--quiet",
        *extra,
    ]
    summary = tune_mlp(argv)
    frames = _trial_results(storage / name)
    spans = [(rows[0]["trial_started_at"], rows[-1]["reported_at"]) for rows in frames.values() if rows]
    concurrency = max(sum(a <= t <= b for a, b in spans) for t, _ in spans) if spans else 0
    epochs = [r["time_this_iter_s"] for rows in frames.values() for r in rows if r["training_iteration"] > 1]
    memory = [max(r.get("gpu_memory_mb", 0) for r in rows) for rows in frames.values() if rows]
    return {
        "wall_seconds": summary["wall_seconds"],
        "trials": summary["num_trials"],
        "max_concurrent": concurrency,
        "seconds_per_epoch": statistics.median(epochs) if epochs else None,
        "peak_gpu_memory_mb_per_trial": max(memory) if memory else None,
        "best_val_acc": summary["best"]["value"] if summary["best"] else None,
        "startup_seconds_median": summary["startup_seconds_median"],
        "total_epochs": summary["total_epochs"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=50)
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
    gpus, cpus = torch.cuda.device_count(), os.cpu_count()
    result: dict = {"gpu": torch.cuda.get_device_name(0), "gpus": gpus, "cpus": cpus, "date": time.strftime("%Y-%m-%d")}
    result["plain_loop_seconds_per_epoch"] = plain_gpu_epoch(arrays)
    single = [f"--{k}={v}" for k, v in DEFAULT_RUN.items()]
    result["one_trial"] = search(storage, "one", data_dir, 1, [*single, "--gpus-per-trial", "1", "--cpus-per-trial", "1"])
    result["packing"] = {}
    for per_gpu in (4, 8, 16):
        cpus_each = max(1, cpus // (per_gpu * gpus))
        extra = [*single, "--gpus-per-trial", str(1 / per_gpu), "--cpus-per-trial", str(cpus_each), "--limit_train_batches=100"]
        result["packing"][per_gpu] = search(storage, f"pack{per_gpu}", data_dir, per_gpu * gpus, extra)
    result["search"] = search(storage, "search", data_dir, args.samples, [])
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
