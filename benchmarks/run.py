"""Benchmarks of the search against a plain PyTorch loop and the textbook Tune + Lightning recipe.

    python benchmarks/run.py --quick     # minutes: 8-sample searches of 3 epochs
    python benchmarks/run.py --full      # the 50-sample search of benchmarks/speed_config.yaml

Every figure is measured in this one run, side by side, on Fashion-MNIST, on the same Ray cluster
(1 CPU per trial). Prints a table of figures with the baseline beside each and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from text_recognizer.data.mnist import FashionMNIST  # noqa: E402
from text_recognizer.search.trial import forkserver  # noqa: E402
from text_recognizer.training import native_bf16  # noqa: E402

HERE = Path(__file__).resolve().parent
FASHION_CONFIG = HERE / "speed_config.yaml"  # fixed for speed comparisons; the quality benchmark uses the shipped config
MODES = ("actor", "fork")  # where our trials train: the default, and --trial-process fork
DEFAULT_RUN = {"fc1": 1024, "fc2": 128, "dropout": 0.5, "lr": 1e-3, "batch_size": 128, "optimizer": "Adam"}


def plain_loop_seconds_per_epoch(
    arrays: dict, threads: int, epochs: int = 3, batch_size: int = 128, device: str = "cpu", precision: str = "32-true"
) -> float:
    """A plain PyTorch loop over in-memory tensors (train + validation), median seconds of epochs after the first;
    in bf16 autocast for `precision` bf16-mixed, as Lightning's bf16-mixed trains."""
    from text_recognizer.models import MLP

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x, y, xv, yv = (torch.from_numpy(arrays[key]).to(device) for key in ("x_train", "y_train", "x_val", "y_val"))
    model = MLP({"input_dims": (1, 28, 28), "mapping": list(range(10))}, argparse.Namespace(**DEFAULT_RUN)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    for _ in range(epochs):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(x), device=device)
        for i in range(0, len(x), batch_size):
            index = order[i : i + batch_size]
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad(), autocast:
            correct = sum(
                (model(xv[i : i + batch_size]).argmax(1) == yv[i : i + batch_size]).sum() for i in range(0, len(xv), batch_size)
            )
        assert correct.item() > 0  # .item() waits for the GPU, so the epoch's time is all in
        times.append(time.perf_counter() - start)
    torch.set_num_threads(os.cpu_count() or 1)
    return statistics.median(times[1:])


class MemorySampler(threading.Thread):
    """Polls the unique memory (USS) of every Tune trial actor and trial process; keeps each one's peak.

    By default (and in the recipe) a trial trains in its Tune actor: an extra trial costs that actor's USS
    (what the kernel would free if it ended). With --trial-process fork it trains in a fork of the node's
    fork server: an extra trial costs its actor plus its trial process; the server is paid once per node and
    its proportional share (PSS) is kept apart.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak: dict[str, dict[int, int]] = {"actor": {}, "trial": {}, "server": {}}
        self.running = True

    def run(self) -> None:
        while self.running:
            for process in psutil.process_iter(["cmdline", "ppid", "pid"]):
                try:
                    command = " ".join(process.info["cmdline"] or [])
                    if forkserver.__name__ in command:
                        memory = process.memory_full_info()
                        parent = psutil.Process(process.info["ppid"])
                        is_trial = forkserver.__name__ in " ".join(parent.cmdline())
                        role, value = ("trial", memory.uss) if is_trial else ("server", memory.pss)
                    elif "ImplicitFunc" in command:
                        role, value = "actor", process.memory_full_info().uss
                    else:
                        continue
                    self.peak[role][process.pid] = max(value, self.peak[role].get(process.pid, 0))
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            time.sleep(0.5)

    def stop(self) -> dict[str, float | None]:
        """Median peak per role, in MB, and per extra trial (actor + trial process)."""
        self.running = False
        self.join()
        medians = {role: statistics.median(peaks.values()) / 2**20 if peaks else None for role, peaks in self.peak.items()}
        medians["per_trial"] = (medians["actor"] or 0.0) + (medians["trial"] or 0.0) if medians["actor"] else None
        return medians


def ours(
    name: str,
    storage: Path,
    data_dir: Path,
    config: Path,
    samples: int,
    max_t: int | None,
    space_fixed: dict[str, Any] | None = None,
    resources: tuple[str, ...] = ("--cpus-per-trial", "1", "--gpus-per-trial", "0"),
    trial_process: str = "actor",
    wandb_mode: str = "offline",
) -> dict[str, Any]:
    """Our search through its real CLI entry point, in this process (the Ray cluster is shared)."""
    from text_recognizer.cli import tune_mlp

    if max_t is not None:
        config_copy = storage / f"{name}.yaml"
        raw = yaml.safe_load(config.read_text())
        config_copy.write_text(yaml.safe_dump({**raw, "scheduler": {**raw["scheduler"], "max_t": max_t}}))
        config = config_copy
    argv = ["--config", str(config), "--num-samples", str(samples), "--storage-path", str(storage), "--name", name]
    argv += [f"--data_dir={data_dir}", "--wandb-mode", wandb_mode, "--quiet", "--trial-process", trial_process, *resources]
    argv += [f"--{key}={value}" for key, value in (space_fixed or {}).items()]
    sampler = MemorySampler()
    sampler.start()
    summary = tune_mlp(argv)
    frames = _trial_results(storage / name)
    return {
        "wall_seconds": summary["wall_seconds"],
        "best_val_acc": summary["best"]["value"] if summary["best"] else None,
        "total_epochs": summary["total_epochs"],
        "epoch_fraction": summary["epoch_fraction"],
        "startup_seconds_median": summary["startup_seconds_median"],
        "seconds_per_epoch": _later_epoch_seconds(frames),
        "epoch_split": epoch_split(frames),
        "memory_mb": sampler.stop(),
    }


# where a trial's wall time per epoch goes (the medians over epochs after the first); see ReportCallback
SPLIT = ("steps", "validation", "checkpoint", "report", "other")


def epoch_split(frames: dict[str, list[dict]]) -> dict[str, float] | None:
    """Median seconds per epoch of: the training steps, validation, writing the checkpoint, handing the epoch to Tune
    (until Tune took it: persisting the checkpoint, the driver's callbacks) and the rest (Lightning's loop, the
    actor), from what every trial report records."""
    split: dict[str, list[float]] = {part: [] for part in SPLIT}
    for rows in frames.values():
        for row, following in zip(rows, rows[1:], strict=False):
            if row["training_iteration"] < 2 or "checkpoint_seconds" not in row:
                continue
            report = following["previous_report_seconds"]
            split["steps"].append(row["epoch_seconds"] - row["validation_seconds"])
            split["validation"].append(row["validation_seconds"])
            split["checkpoint"].append(row["checkpoint_seconds"])
            split["report"].append(report)
            # between two reports: this epoch, its checkpoint, the report and whatever else ran
            split["other"].append(
                following["time_this_iter_s"] - following["epoch_seconds"] - following["checkpoint_seconds"] - report
            )
    return {part: statistics.median(values) for part, values in split.items()} if split["steps"] else None


def recipe(
    name: str,
    storage: Path,
    data_dir: Path,
    config: Path,
    samples: int,
    max_t: int | None,
    space_fixed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The textbook recipe on the same space, ASHA settings, seed, data and CPUs."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from benchmarks.recipe import recipe_trainable
    from text_recognizer.search.config import load_config
    from text_recognizer.search.outputs.results import TrialClock

    search = load_config(config, space_fixed)
    if max_t is not None:
        search = replace(search, max_t=max_t)
    space = {**search.param_space(), "data_dir": str(data_dir)}
    space.pop("data_class", None)
    clock = TrialClock()
    tuner = tune.Tuner(
        tune.with_resources(recipe_trainable, {"CPU": 1}),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=search.metric,
            mode=search.mode,
            num_samples=samples,
            scheduler=ASHAScheduler(
                max_t=search.max_t, grace_period=search.grace_period, reduction_factor=search.reduction_factor
            ),
            search_alg=BasicVariantGenerator(random_state=search.seed),
        ),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), callbacks=[clock], verbose=0),
    )
    sampler = MemorySampler()
    sampler.start()
    began = time.time()
    grid = tuner.fit()
    wall = time.time() - began
    frames = _trial_results(storage / name)
    epochs = sum(len(rows) for rows in frames.values())
    startups = []
    for trial_dir in (storage / name).glob("*/first_step.json"):
        trial_id = next(t for t in clock.ready if t in trial_dir.parent.name)
        startups.append(json.loads(trial_dir.read_text())["first_step_at"] - clock.ready[trial_id])
    best = max((max(r["val_acc"] for r in rows) for rows in frames.values() if rows), default=None)
    return {
        "wall_seconds": wall,
        "best_val_acc": best,
        "total_epochs": epochs,
        "epoch_fraction": epochs / (len(grid) * search.max_t),
        "startup_seconds_median": statistics.median(startups) if startups else None,
        "seconds_per_epoch": _later_epoch_seconds(frames),
        "memory_mb": sampler.stop(),
    }


def smoke_outside_fit(storage: Path, data_dir: Path, name: str, wandb_mode: str) -> dict[str, float]:
    """A smoke search (--smoke-test) as a user runs it, in its own process and Ray cluster: its wall time from start
    to exit, Tune's fit (summary.json's wall_seconds) and the rest, outside the fit: imports, data, Ray's start and
    shutdown, the winner's test, the results, the report, the W&B summary run."""
    command = [sys.executable, str(HERE.parent / "search" / "tune_mlp.py"), "--smoke-test", "--quiet", "--name", name]
    command += ["--storage-path", str(storage), f"--data_dir={data_dir}", "--wandb-mode", wandb_mode]
    began = time.time()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "RAY_ADDRESS": ""})
    wall = time.time() - began
    fit = json.loads((storage / name / "summary.json").read_text())["wall_seconds"]
    return {"wall_seconds": wall, "fit_seconds": fit, "outside_fit_seconds": wall - fit}


def _trial_results(search_dir: Path) -> dict[str, list[dict]]:
    return {path.parent.name: [json.loads(line) for line in path.open()] for path in search_dir.glob("*/result.json")}


def _later_epoch_seconds(frames: dict[str, list[dict]]) -> float | None:
    """Median wall seconds between a trial's reports, over epochs after its first (no start-up in it)."""
    times = [r["time_this_iter_s"] for rows in frames.values() for r in rows if r["training_iteration"] > 1]
    return statistics.median(times) if times else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="8-sample searches of 3 epochs (default)")
    mode.add_argument("--full", action="store_true", help="50-sample searches of the Fashion-MNIST config")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray cluster")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON results")
    args = parser.parse_args(argv)
    samples, max_t, label = (50, None, "full") if args.full else (8, 3, "quick")

    import ray

    os.environ.setdefault("WANDB_SILENT", "true")
    data_dir = Path(tempfile.mkdtemp(prefix="bench-data-"))
    FashionMNIST.ensure_raw_files(data_dir)
    arrays = FashionMNIST.load_arrays(data_dir)
    storage = Path(tempfile.mkdtemp(prefix="bench-"))
    # first, before this process starts Ray: smoke searches in their own processes, W&B offline and disabled
    smoke = {mode: smoke_outside_fit(storage, data_dir, f"smoke-{mode}", mode) for mode in ("offline", "disabled")}
    for mode, figures in smoke.items():
        print(f"  smoke search, W&B {mode}: {figures['wall_seconds']:.1f} s, fit {figures['fit_seconds']:.1f} s", flush=True)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    print(
        f"benchmark ({label}) on {platform.node()}: {args.cpus} CPUs ({cpu_model()}, native bf16: {native_bf16(gpu=False)}), "
        f"torch {torch.__version__}, storage {storage}"
    )

    # per-epoch: the default MLP, one trial of 4 epochs alone on the cluster, vs the plain loop (1 thread each) in the
    # same precision, which runs before and after ours (their mean: this machine's speed drifts by ~10 % over minutes)
    precisions = ("32-true", "bf16-mixed") if native_bf16(gpu=False) else ("32-true",)
    ours_one: dict[str, dict[str, Any]] = {precision: {} for precision in precisions}
    ours_search, plains = {}, []
    for mode in MODES:
        for precision in precisions:
            before = plain_loop_seconds_per_epoch(arrays, threads=1, epochs=4, precision=precision)
            run = {**DEFAULT_RUN, "precision": precision}
            one = ours(f"{mode}-{precision}-epoch", storage, data_dir, FASHION_CONFIG, 1, 4, run, trial_process=mode)
            after = plain_loop_seconds_per_epoch(arrays, threads=1, epochs=4, precision=precision)
            one["plain_loop_seconds_per_epoch"] = (before + after) / 2
            ours_one[precision][mode] = one
            if precision == "32-true":
                plains.append(one["plain_loop_seconds_per_epoch"])
            print(
                f"  {mode} {precision}: {one['seconds_per_epoch']:.3f} s/epoch, "
                f"plain loop {one['plain_loop_seconds_per_epoch']:.3f}"
            )
        ours_search[mode] = ours(f"{mode}-search", storage, data_dir, FASHION_CONFIG, samples, max_t, trial_process=mode)
        print(f"  {mode}: search {ours_search[mode]['wall_seconds']:.0f} s (--precision auto)")
    plain = statistics.mean(plains)
    recipe_one = recipe("recipe-epoch", storage, data_dir, FASHION_CONFIG, 1, 4, DEFAULT_RUN)
    recipe_search = recipe("recipe-search", storage, data_dir, FASHION_CONFIG, samples, max_t)
    print(f"  recipe: {recipe_one['seconds_per_epoch']:.2f} s/epoch, search {recipe_search['wall_seconds']:.0f} s")
    ray.shutdown()

    figures = []
    for precision in precisions:  # the recipe trains in Lightning's default, float32: its ratios are to that loop
        one = ours_one[precision]
        recipe_ratio = recipe_one["seconds_per_epoch"] / plain if precision == "32-true" else None
        figures += [
            row(
                f"s/epoch in a trial / plain loop, {precision}",
                [one[m]["seconds_per_epoch"] / one[m]["plain_loop_seconds_per_epoch"] for m in MODES],
                recipe_ratio,
                "<= 1.10",
            ),
            row(
                f"  s/epoch in a trial, {precision}",
                [one[m]["seconds_per_epoch"] for m in MODES],
                recipe_one["seconds_per_epoch"] if recipe_ratio else None,
                "",
            ),
            row(f"  plain loop, around it, {precision}", [one[m]["plain_loop_seconds_per_epoch"] for m in MODES], None, ""),
        ]
        figures += [
            row(f"    of which {part}, s", [(one[m]["epoch_split"] or {}).get(part) for m in MODES], None, "") for part in SPLIT
        ]
    if len(precisions) == 2:
        figures.append(
            row(
                "s/epoch bf16-mixed / 32-true (this CPU's bf16)",
                [ours_one["bf16-mixed"][m]["seconds_per_epoch"] / ours_one["32-true"][m]["seconds_per_epoch"] for m in MODES],
                None,
                "",
            )
        )
    figures += [
        row(
            "trial start -> first step, median s",
            pick(ours_search, "startup_seconds_median"),
            recipe_search["startup_seconds_median"],
            "<= 1.5",
        ),
        row(f"{samples}-sample search wall s", pick(ours_search, "wall_seconds"), recipe_search["wall_seconds"], ""),
        row(
            "search wall / recipe's",
            [ours_search[m]["wall_seconds"] / recipe_search["wall_seconds"] for m in MODES],
            1.0,
            "<= 0.4",
        ),
        row("best val_acc", pick(ours_search, "best_val_acc"), recipe_search["best_val_acc"], "not lower"),
        row(
            "epochs trained / (samples x max_t)", pick(ours_search, "epoch_fraction"), recipe_search["epoch_fraction"], "<= 0.35"
        ),
        row(
            "memory per extra concurrent trial, MB",
            memory(ours_search, "per_trial"),
            recipe_search["memory_mb"]["per_trial"],
            "<= 400",
        ),
        row("  of which the Tune actor (USS)", memory(ours_search, "actor"), recipe_search["memory_mb"]["actor"], ""),
        row("  of which the trial process (USS)", memory(ours_search, "trial"), None, ""),
        row("fork server, once per node (PSS), MB", [None, ours_search["fork"]["memory_mb"]["server"]], None, ""),
    ]
    print(f"\n{'figure':<44}" + "".join(f"{m:>10}" for m in MODES) + f"{'recipe':>10}  target")
    for figure in figures:
        print(
            f"{figure['figure']:<44}"
            + "".join(f"{_fmt(v):>10}" for v in figure["ours"].values())
            + f"{_fmt(figure['recipe']):>10}  {figure['target']}"
        )
    result = {
        "mode": label,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {args.cpus} CPUs, {cpu_model()}",
        "native_bf16_cpu": native_bf16(gpu=False),
        "torch": torch.__version__,
        "plain_loop_seconds_per_epoch": plain,
        "per_epoch": {"ours": ours_one, "recipe": recipe_one},
        "search": {"ours": ours_search, "recipe": recipe_search},
        "figures": figures,
    }
    for mode, figures_ in smoke.items():
        print(
            f"smoke search (W&B {mode}): {figures_['wall_seconds']:.1f} s start to exit, "
            f"Tune's fit {figures_['fit_seconds']:.1f} s, "
            f"outside the fit {figures_['outside_fit_seconds']:.1f} s (target <= 8)"
        )
    result["smoke"] = smoke
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")
    return result


def cpu_model() -> str:
    """The CPU's model name (the bf16 figures depend on it), from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as file:
            return next((line.split(":", 1)[1].strip() for line in file if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


def row(figure: str, ours: list[float | None], recipe: float | None, target: str) -> dict[str, Any]:
    """One figure: ours in each trial mode, the recipe's, and the target."""
    return {"figure": figure, "ours": dict(zip(MODES, ours, strict=True)), "recipe": recipe, "target": target}


def pick(runs: dict[str, dict], key: str) -> list[Any]:
    return [runs[mode][key] for mode in MODES]


def memory(runs: dict[str, dict], key: str) -> list[Any]:
    return [runs[mode]["memory_mb"][key] for mode in MODES]


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if abs(value) < 10 else f"{value:.0f}"


if __name__ == "__main__":
    main()
