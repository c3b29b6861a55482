"""Quality benchmark: which arm finds a better model for the same compute: a sampler (random or Optuna's TPE,
under ASHA), or a precision (float32 against --precision auto: bf16-mixed where the hardware computes it natively).

    python benchmarks/quality.py --compare precision  # the default config, float32 vs auto, 3 seeds each (make bench-quality)
    python benchmarks/quality.py --compare sampler    # random vs optuna, 3 seeds each
    python benchmarks/quality.py --compare pruned     # Optuna told ASHA's stops as COMPLETE or as PRUNED
    python benchmarks/quality.py --seeds 0 --num-samples 12 --time-budget 2m   # a quick look

Each search is the real `search/tune_mlp.py`, one process per search (its own local Ray cluster), on the same
config, machine and budget; only the arm and the seed (the config's `seed`) change. Per arm it prints the median
and range over seeds of: the best val_acc, the winner's test_acc (evaluated once, after the search), the search
wall time, the epochs trained, the samples started, and the time to each target (wall seconds from the first
trial's start until some trial first reported val_acc >= it). Beside them, the machine's noise: a fixed one-epoch
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
from text_recognizer.data.mnist import FashionMNIST  # noqa: E402

FASHION_CONFIG = ROOT / "experiments" / "fashion_mlp_asha.yaml"
# what each comparison varies: arm -> (config keys it sets, e.g. the search_alg; extra run flags)
ARMS = {
    "sampler": {"random": ({"search_alg": "random"}, []), "optuna": ({"search_alg": "optuna"}, [])},
    "precision": {"32-true": ({}, ["--precision=32-true"]), "auto": ({}, ["--precision=auto"])},
    # what Optuna's TPE is told of a trial ASHA stopped (search/pruned.py)
    "pruned": {
        "complete": ({"search_alg": "optuna", "asha_stops_as": "complete"}, []),
        "pruned": ({"search_alg": "optuna", "asha_stops_as": "pruned"}, []),
    },
}
FIGURES = ("best_val_acc", "test_acc", "wall_seconds", "total_epochs", "samples_started")
TARGETS = (0.885, 0.900)


def search(config: Path, arm: str, seed: int, args: argparse.Namespace, storage: Path) -> dict[str, Any]:
    """One search through the real script; its figures and its best-so-far curve."""
    name = f"quality-{arm}-seed{seed}"
    keys, flags = ARMS[args.compare][arm]
    raw = yaml.safe_load(config.read_text())
    seeded = storage / f"{name}.yaml"
    seeded.write_text(yaml.safe_dump({**raw, "seed": seed, **keys}))
    command = [sys.executable, str(ROOT / "search" / "tune_mlp.py"), "--config", str(seeded), "--name", name, *flags]
    command += ["--storage-path", str(storage), "--wandb-mode", "disabled", "--quiet", f"--data_dir={args.data_dir}"]
    command += ["--num-samples", str(args.num_samples)] if args.num_samples else []
    command += ["--time-budget", args.time_budget] if args.time_budget else []
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    summary = json.loads((storage / name / "summary.json").read_text())
    curve = best_so_far(_trial_results(storage / name), summary["settings"]["metric"])
    best = summary["best"] or {}
    precisions = sorted({row["precision"] for row in summary["trials"] if row.get("precision")})
    return {
        "arm": arm,
        "seed": seed,
        "precisions": precisions,  # what the trials trained in, as their nodes resolved it
        "best_val_acc": best.get("value"),
        "test_acc": best.get("test_acc"),
        "wall_seconds": summary["wall_seconds"],
        "total_epochs": summary["total_epochs"],
        "samples_started": sum(row["epochs"] > 0 for row in summary["trials"]),
        "statuses": summary["statuses"],
        **{f"s_to_{target}": next((t for t, value in curve if value >= target), None) for target in args.targets},
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


def figure_names(targets: list[float]) -> list[str]:
    return [*FIGURES, *(f"s_to_{target}" for target in targets)]


def table(runs: list[dict[str, Any]], arms: list[str], targets: list[float]) -> dict[str, dict[str, Any]]:
    return {a: {f: spread([r[f] for r in runs if r["arm"] == a]) for f in figure_names(targets)} for a in arms}


def print_table(figures: dict[str, dict[str, Any]], noise: dict[str, Any], targets: list[float]) -> None:
    def cell(entry: dict[str, Any], digits: int) -> str:
        if entry["median"] is None:
            return "never"
        text = f"{entry['median']:.{digits}f} [{entry['min']:.{digits}f}-{entry['max']:.{digits}f}]"
        return text + (f" ({entry['missing']} never)" if entry["missing"] else "")

    digits = {"best_val_acc": 4, "test_acc": 4}
    labels = {f"s_to_{target}": f"s to val_acc>={target}" for target in targets}
    print(f"\n{'median [min-max] over seeds':<28}" + "".join(f"{s:>34}" for s in figures))
    for figure in figure_names(targets):
        print(
            f"{labels.get(figure, figure):<28}"
            + "".join(f"{cell(figures[s][figure], digits.get(figure, 0)):>34}" for s in figures)
        )
    print(
        f"\nMachine noise: a fixed 1-epoch training took {noise['median']:.2f} s median, "
        f"{noise['min']:.2f}-{noise['max']:.2f} s over the {noise['count']} searches (timed before each)."
    )


def plot(runs: list[dict[str, Any]], path: Path, targets: list[float], compare: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"random": "tab:blue", "optuna": "tab:orange", "32-true": "tab:blue", "auto": "tab:orange"}
    colors |= {"complete": "tab:blue", "pruned": "tab:orange"}
    figure, axes = plt.subplots(figsize=(8, 5))
    for run in runs:
        if run["curve"]:
            times, values = zip(*run["curve"], strict=True)
            label = f"{run['arm']} seed {run['seed']}"
            axes.step(times, values, where="post", color=colors.get(run["arm"]), alpha=0.8, label=label)
    for target in targets:
        axes.axhline(target, color="grey", linestyle=":", label=f"target {target}")
    axes.set(xlabel="wall seconds since the first trial started", ylabel="best val_acc so far")
    titles = {"sampler": "Random vs Optuna (TPE) under ASHA", "precision": "float32 vs --precision auto"}
    titles["pruned"] = "Optuna told ASHA's stops as COMPLETE vs PRUNED"
    axes.set_title(f"{titles[compare]}, same config and budget")
    lowest = min((v for run in runs for _, v in run["curve"][-1:]), default=min(targets)) - 0.02
    axes.set_ylim(bottom=max(0.0, min(lowest, min(targets) - 0.02)))
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=FASHION_CONFIG, help="search config (default: fashion_mlp_asha)")
    parser.add_argument("--compare", choices=sorted(ARMS), default="precision", help="what the arms vary (default precision)")
    parser.add_argument("--arms", nargs="+", default=None, help="a subset of the comparison's arms (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="sampler seeds (default 0 1 2)")
    parser.add_argument("--num-samples", type=int, default=None, help="trials per search (default: the config's)")
    parser.add_argument("--time-budget", default=None, help="time budget per search, e.g. 5m (default: the config's)")
    parser.add_argument("--targets", nargs="+", type=float, default=list(TARGETS), help="val_acc of the time-to figures")
    parser.add_argument("--data-dir", type=Path, default=None, help="Fashion-MNIST files (default: the data class's)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    arms = args.arms or list(ARMS[args.compare])
    if set(arms) - set(ARMS[args.compare]):
        parser.error(f"--arms: {args.compare} has the arms {', '.join(ARMS[args.compare])}")
    args.data_dir = args.data_dir or FashionMNIST(None).data_dir
    arrays = FashionMNIST.load_arrays(args.data_dir)  # a missing dataset fails here, before any search
    runs, noise = [], []
    with tempfile.TemporaryDirectory(prefix="quality-") as storage:
        for seed in args.seeds:  # seeds outermost: a drift of the machine's speed hits both arms alike
            for arm in arms:
                noise.append(plain_loop_seconds_per_epoch(arrays, threads=1, epochs=2))
                runs.append(search(args.config, arm, seed, args, Path(storage)))
                shown = [*figure_names(args.targets), "precisions"]
                print(f"{arm} seed {seed}: " + ", ".join(f"{f}={runs[-1][f]}" for f in shown), flush=True)
    figures = table(runs, arms, args.targets)
    noise_figures = {"median": statistics.median(noise), "min": min(noise), "max": max(noise), "count": len(noise)}
    print_table(figures, noise_figures, args.targets)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record = {
        "config": str(args.config),
        "num_samples": args.num_samples,
        "time_budget": args.time_budget,
        "compare": args.compare,
        "targets": args.targets,
        "cpus": os.cpu_count(),
        "figures": figures,
        "noise_seconds_per_epoch": noise_figures,
        "runs": runs,
    }
    (args.out / f"quality-{stamp}.json").write_text(json.dumps(record, indent=2, default=str))
    plot(runs, args.out / f"quality-{stamp}.png", args.targets, args.compare)
    print(f"\nwrote {args.out / f'quality-{stamp}.json'} and .png")
    return record


if __name__ == "__main__":
    main()
