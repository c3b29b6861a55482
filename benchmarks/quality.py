"""Quality benchmark: which sampler finds a better model for the same compute, random or Optuna's TPE (under ASHA).

    python benchmarks/quality.py                      # the default Fashion-MNIST config, 3 seeds per sampler
    python benchmarks/quality.py --seeds 0 --num-samples 12 --time-budget 2m   # a quick look

Each search is the real `search/tune_mlp.py`, one process per search (its own local Ray cluster), on the same
config, machine and budget; only the sampler and its seed (the config's `seed`) change. Per sampler it prints
the median and range over seeds of: the best val_acc, the winner's test_acc (evaluated once, after the
search), the search wall time, the epochs trained, and the time to target (wall seconds from the first trial's
start until some trial first reported val_acc >= --target). Beside them, the machine's noise: a fixed one-epoch
training timed before every search. Writes JSON and a plot of the best val_acc so far against wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.run import _trial_results, plain_loop_seconds_per_epoch  # noqa: E402
from text_recognizer.data import FashionMNIST  # noqa: E402

FASHION_CONFIG = ROOT / "experiments" / "fashion_mlp_asha.yaml"
SAMPLERS = ("random", "optuna")
FIGURES = ("best_val_acc", "test_acc", "wall_seconds", "total_epochs", "time_to_target")


def search(config: Path, sampler: str, seed: int, args: argparse.Namespace, storage: Path) -> dict[str, Any]:
    """One search through the real script; its figures and its best-so-far curve."""
    name = f"quality-{sampler}-seed{seed}"
    raw = yaml.safe_load(config.read_text())
    seeded = storage / f"{name}.yaml"
    seeded.write_text(yaml.safe_dump({**raw, "seed": seed, "search_alg": sampler}))
    command = [sys.executable, str(ROOT / "search" / "tune_mlp.py"), "--config", str(seeded), "--name", name]
    command += ["--storage-path", str(storage), "--wandb-mode", "disabled", "--quiet", f"--data_dir={args.data_dir}"]
    command += ["--num-samples", str(args.num_samples)] if args.num_samples else []
    command += ["--time-budget", args.time_budget] if args.time_budget else []
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    summary = json.loads((storage / name / "summary.json").read_text())
    curve = best_so_far(_trial_results(storage / name), summary["settings"]["metric"])
    best = summary["best"] or {}
    return {
        "sampler": sampler,
        "seed": seed,
        "best_val_acc": best.get("value"),
        "test_acc": best.get("test_acc"),
        "wall_seconds": summary["wall_seconds"],
        "total_epochs": summary["total_epochs"],
        "statuses": summary["statuses"],
        "time_to_target": next((t for t, value in curve if value >= args.target), None),
        "winner": {key: best.get(key) for key in ("trial_id", "epoch", "config")},
        "curve": curve,
    }


def best_so_far(frames: dict[str, list[dict]], metric: str) -> list[tuple[float, float]]:
    """(seconds since the first trial started, best metric reported so far), at every improvement."""
    rows = sorted((row for rows in frames.values() for row in rows if metric in row), key=lambda r: r["reported_at"])
    if not rows:
        return []
    start = min(row["trial_started_at"] for rows in frames.values() for row in rows)
    curve, best = [], float("-inf")
    for row in rows:
        if row[metric] > best:
            best = row[metric]
            curve.append((row["reported_at"] - start, best))
    return curve


def spread(values: list[float | None]) -> dict[str, Any]:
    """Median, min and max of the values that exist, and how many runs had none (e.g. never reached the target)."""
    present = [v for v in values if v is not None]
    if not present:
        return {"median": None, "min": None, "max": None, "missing": len(values)}
    return {"median": statistics.median(present), "min": min(present), "max": max(present), "missing": len(values) - len(present)}


def table(runs: list[dict[str, Any]], samplers: list[str]) -> dict[str, dict[str, Any]]:
    return {s: {f: spread([r[f] for r in runs if r["sampler"] == s]) for f in FIGURES} for s in samplers}


def print_table(figures: dict[str, dict[str, Any]], noise: dict[str, Any], target: float) -> None:
    def cell(entry: dict[str, Any], digits: int) -> str:
        if entry["median"] is None:
            return "never"
        text = f"{entry['median']:.{digits}f} [{entry['min']:.{digits}f}-{entry['max']:.{digits}f}]"
        return text + (f" ({entry['missing']} never)" if entry["missing"] else "")

    digits = {"best_val_acc": 4, "test_acc": 4, "wall_seconds": 0, "total_epochs": 0, "time_to_target": 0}
    labels = {"time_to_target": f"s to val_acc>={target}"}
    print(f"\n{'median [min-max] over seeds':<28}" + "".join(f"{s:>34}" for s in figures))
    for figure in FIGURES:
        print(f"{labels.get(figure, figure):<28}" + "".join(f"{cell(figures[s][figure], digits[figure]):>34}" for s in figures))
    print(
        f"\nMachine noise: a fixed 1-epoch training took {noise['median']:.2f} s median, "
        f"{noise['min']:.2f}-{noise['max']:.2f} s over the {noise['count']} searches (timed before each)."
    )


def plot(runs: list[dict[str, Any]], path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"random": "tab:blue", "optuna": "tab:orange"}
    figure, axes = plt.subplots(figsize=(8, 5))
    for run in runs:
        if run["curve"]:
            times, values = zip(*run["curve"], strict=True)
            label = f"{run['sampler']} seed {run['seed']}"
            axes.step(times, values, where="post", color=colors.get(run["sampler"]), alpha=0.8, label=label)
    axes.axhline(target, color="grey", linestyle=":", label=f"target {target}")
    axes.set(xlabel="wall seconds since the first trial started", ylabel="best val_acc so far")
    axes.set_title("Random vs Optuna (TPE) under ASHA, same config and budget")
    lowest = min((v for run in runs for _, v in run["curve"][-1:]), default=target) - 0.02
    axes.set_ylim(bottom=max(0.0, min(lowest, target - 0.02)))
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=FASHION_CONFIG, help="search config (default: fashion_mlp_asha)")
    parser.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="sampler seeds (default 0 1 2)")
    parser.add_argument("--num-samples", type=int, default=None, help="trials per search (default: the config's)")
    parser.add_argument("--time-budget", default=None, help="time budget per search, e.g. 5m (default: the config's)")
    parser.add_argument("--target", type=float, default=0.885, help="val_acc of the time-to-target figure (0.885)")
    parser.add_argument("--data-dir", type=Path, default=None, help="Fashion-MNIST files (default: the data class's)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    args.data_dir = args.data_dir or FashionMNIST(None).data_dir
    arrays = FashionMNIST.load_arrays(args.data_dir)  # a missing dataset fails here, before any search
    runs, noise = [], []
    with tempfile.TemporaryDirectory(prefix="quality-") as storage:
        for seed in args.seeds:  # seeds outermost: a drift of the machine's speed hits both samplers alike
            for sampler in args.samplers:
                noise.append(plain_loop_seconds_per_epoch(arrays, threads=1, epochs=2))
                runs.append(search(args.config, sampler, seed, args, Path(storage)))
                print(f"{sampler} seed {seed}: " + ", ".join(f"{f}={runs[-1][f]}" for f in FIGURES), flush=True)
    figures = table(runs, args.samplers)
    noise_figures = {"median": statistics.median(noise), "min": min(noise), "max": max(noise), "count": len(noise)}
    print_table(figures, noise_figures, args.target)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record = {
        "config": str(args.config),
        "num_samples": args.num_samples,
        "time_budget": args.time_budget,
        "target": args.target,
        "cpus": os.cpu_count(),
        "figures": figures,
        "noise_seconds_per_epoch": noise_figures,
        "runs": runs,
    }
    (args.out / f"quality-{stamp}.json").write_text(json.dumps(record, indent=2, default=str))
    plot(runs, args.out / f"quality-{stamp}.png", args.target)
    print(f"\nwrote {args.out / f'quality-{stamp}.json'} and .png")
    return record


if __name__ == "__main__":
    main()
