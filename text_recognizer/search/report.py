"""Runs in the driver at the end of a search, or on demand (`text-recognizer-search report FOLDER`): an offline
report anyone can open, `report.html` with its PNGs in `<search>/report/`, built from summary.json and Tune's
per-trial result.json files (no W&B needed)."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node or in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from text_recognizer.facts import REPORT_PAGE  # noqa: E402
from text_recognizer.search.results import describe_part, finite, plus_minus, ranked, short  # noqa: E402
from text_recognizer.util import UserError  # noqa: E402

TOP = 10  # rows of the report's table
IMPORTANCE_METHOD = "eta²: share of the metric's variance explained\nby each hyperparameter alone (its groups' means)"


def load_summary(folder: Path) -> dict[str, Any]:
    """A search folder's summary.json."""
    if not (folder / "summary.json").is_file():
        raise UserError(f"{folder}: not a search folder (no summary.json)")
    return json.loads((folder / "summary.json").read_text())


def load_curves(folder: Path, summary: dict[str, Any]) -> dict[str, list[dict]]:
    """Each trial's results (one dict per epoch, from Tune's result.json), by trial id."""
    curves = {}
    for row in summary["trials"]:
        path = folder / f"trial_{row['trial_id']}" / "result.json"
        lines = path.read_text().splitlines() if path.is_file() else []
        by_epoch = {}
        for line in lines:
            try:
                result = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed driver
                continue
            by_epoch[result["training_iteration"]] = result  # a retried epoch: its newest result
        curves[row["trial_id"]] = [by_epoch[epoch] for epoch in sorted(by_epoch)]
    return curves


def rungs(settings: dict[str, Any]) -> list[int]:
    """ASHA's rungs, in epochs: grace_period * reduction_factor^k below max_t."""
    rung, found = settings["grace_period"], []
    while rung < settings["max_t"]:
        found.append(int(rung))
        rung *= settings["reduction_factor"]
    return found


def plot_curves(summary: dict[str, Any], curves: dict[str, list[dict]], path: Path) -> int:
    """The metric per epoch, one line per trial; a trial ASHA stopped ends in a cross at its rung. Returns the
    number of curves drawn."""
    metric, settings = summary["settings"]["metric"], summary["settings"]
    status = {row["trial_id"]: row["status"] for row in summary["trials"]}
    figure, axes = plt.subplots(figsize=(9, 5))
    drawn = 0
    for rung in rungs(settings):
        axes.axvline(rung, color="0.85", linestyle="--", zorder=0)
    for trial_id, results in curves.items():
        epochs = [r["training_iteration"] for r in results if finite(r.get(metric)) is not None]
        values = [r[metric] for r in results if finite(r.get(metric)) is not None]
        if not values:
            continue
        (line,) = axes.plot(epochs, values, marker=".", linewidth=1, alpha=0.8)
        drawn += 1
        if status[trial_id] == "stopped_early":
            axes.plot(epochs[-1], values[-1], marker="x", markersize=9, color=line.get_color())
    axes.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch, {drawn} trials (x: stopped by ASHA; dashed: rungs)")
    axes.set_xlim(0.5, settings["max_t"] + 0.5)
    _save(figure, path)
    return drawn


def numeric_axis(values: list[Any], spec: dict[str, Any]) -> tuple[np.ndarray, list[str], bool]:
    """A hyperparameter's values as numbers for plotting, tick labels for categories, and whether to use a log scale."""
    kind, choices = next(iter(spec.items()))
    if kind in ("choice", "grid") and not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices):
        labels = [str(c) for c in choices]
        return np.array([labels.index(str(v)) if str(v) in labels else np.nan for v in values], float), labels, False
    return np.array([v if v is not None else np.nan for v in values], float), [], kind == "loguniform"


def searched(summary: dict[str, Any]) -> tuple[list[dict], list[str], np.ndarray]:
    """The trials with a finite best metric, the searched hyperparameters, and the best metric of each trial."""
    key = f"best_{summary['settings']['metric']}"
    rows = [row for row in summary["trials"] if finite(row.get(key)) is not None]
    return rows, list(summary["space"]), np.array([row[key] for row in rows], float)


def plot_parallel(summary: dict[str, Any], path: Path) -> None:
    """Parallel coordinates: one axis per hyperparameter and one for the metric, a line per trial coloured by it."""
    rows, params, metric_values = searched(summary)
    figure, axes = plt.subplots(figsize=(max(6, 1.8 * (len(params) + 1)), 5))
    columns, labels = [], []
    for param in params:
        values, ticks, log = numeric_axis([row["config"].get(param) for row in rows], summary["space"][param])
        values = np.log10(values) if log else values
        finite = values[np.isfinite(values)]
        low, high = (finite.min(), finite.max()) if len(finite) else (0.0, 1.0)
        columns.append((values - low) / (high - low or 1))
        labels.append(ticks or [f"{10**low:.2g}" if log else f"{low:.3g}", f"{10**high:.2g}" if log else f"{high:.3g}"])
    low, high = (metric_values.min(), metric_values.max()) if len(metric_values) else (0, 1)
    columns.append((metric_values - low) / (high - low or 1))
    labels.append([f"{low:.4f}", f"{high:.4f}"])
    names = [*params, summary["settings"]["metric"]]
    colours = plt.get_cmap("viridis")((metric_values - low) / (high - low or 1))
    for i in np.argsort(metric_values):  # the best drawn last, on top
        axes.plot(range(len(names)), [column[i] for column in columns], color=colours[i], alpha=0.8)
    for x, ticks in enumerate(labels):
        axes.axvline(x, color="0.3", linewidth=0.8)
        positions = np.linspace(0, 1, len(ticks))
        for y, tick in zip(positions, ticks, strict=True):
            axes.annotate(tick, (x, y), xytext=(4, 0), textcoords="offset points", fontsize=8, va="center")
    axes.set_xticks(range(len(names)), names)
    axes.set_yticks([])
    axes.set_title(f"parallel coordinates of {len(rows)} trials, coloured by best {summary['settings']['metric']}")
    _save(figure, path)


def plot_scatter(summary: dict[str, Any], path: Path) -> None:
    """The best metric of each trial against each hyperparameter."""
    rows, params, metric_values = searched(summary)
    across = min(3, len(params))
    down = math.ceil(len(params) / across)
    figure, grid = plt.subplots(down, across, figsize=(4 * across, 3.2 * down), squeeze=False, sharey=True)
    for axes in grid.flat[len(params) :]:
        axes.set_visible(False)
    for axes, param in zip(grid.flat, params, strict=False):
        values, ticks, log = numeric_axis([row["config"].get(param) for row in rows], summary["space"][param])
        axes.scatter(values, metric_values, s=18, alpha=0.8)
        if log:
            axes.set_xscale("log")
        if ticks:
            axes.set_xticks(range(len(ticks)), ticks)
        axes.set_xlabel(param)
    for row in grid:
        row[0].set_ylabel(f"best {summary['settings']['metric']}")
    _save(figure, path)


def importance(summary: dict[str, Any]) -> dict[str, float]:
    """Each hyperparameter's eta²: the share of the variance of the best metric that its groups (its categories,
    or quantile bins of a number, at least 3 trials a bin) explain alone. 0 for nothing, 1 for everything; a
    rough, model-free estimate that few trials overstate."""
    rows, params, metric_values = searched(summary)
    bins = max(2, min(4, len(rows) // 3))
    total = float(np.var(metric_values)) if len(metric_values) > 1 else 0.0
    scores = {}
    for param in params:
        values, ticks, _ = numeric_axis([row["config"].get(param) for row in rows], summary["space"][param])
        if ticks or len(set(values.tolist())) <= bins:
            groups = values
        else:
            edges = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])
            groups = np.digitize(values, edges)
        between = sum(
            (groups == g).sum() * (metric_values[groups == g].mean() - metric_values.mean()) ** 2 for g in np.unique(groups)
        )
        scores[param] = float(between / len(metric_values) / total) if total else 0.0
    return scores


def plot_importance(scores: dict[str, float], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7, 0.5 * len(scores) + 2))
    ordered = sorted(scores, key=scores.get)
    axes.barh(ordered, [scores[p] for p in ordered], color="tab:blue")
    axes.set_xlim(0, 1)
    axes.set_title(f"parameter importance, {IMPORTANCE_METHOD}", fontsize=10)
    _save(figure, path)


def write_report(folder: Path, summary: dict[str, Any] | None = None, top: int = TOP) -> Path:
    """Write <folder>/report/report.html and its PNGs (from `summary`, else the folder's summary.json); returns the
    HTML's path."""
    summary = summary if summary is not None else load_summary(folder)
    curves = load_curves(folder, summary)
    page = folder / REPORT_PAGE
    out = page.parent
    out.mkdir(exist_ok=True)
    figures = {
        "curves.png": lambda p: plot_curves(summary, curves, p),
        "parallel_coordinates.png": lambda p: plot_parallel(summary, p),
        "metric_vs_hyperparameters.png": lambda p: plot_scatter(summary, p),
        "importance.png": lambda p: plot_importance(importance(summary), p),
    }
    if summary.get("confirm") and summary["confirm"]["configs"]:
        figures["confirm.png"] = lambda p: plot_confirm(summary["confirm"], p)
    if not summary["space"]:  # every hyperparameter fixed (a benchmark's one configuration): nothing to plot them against
        figures = {"curves.png": figures["curves.png"]}
    for name, draw in figures.items():
        draw(out / name)
    page.write_text(render(summary, {name: out / name for name in figures}, top))
    return page


def render(summary: dict[str, Any], images: dict[str, Path], top: int) -> str:
    """The page: headline, the best trial with its test accuracy, the top-k table, the figures (embedded)."""
    metric = summary["settings"]["metric"]
    key = f"best_{metric}"
    rows = ranked(summary)
    params = list(summary["space"])
    head = ["rank", "trial", key, "epochs", "status", *params]
    body = [
        [str(rank), row["trial_id"], f"{row[key]:.4f}", str(row["epochs"]), row["status"]]
        + [short(row["config"].get(p)) for p in params]
        for rank, row in enumerate(rows[:top], 1)
    ]
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body) + "</table>"
    best = summary.get("best")
    if best:
        test = best.get("test_acc")
        verdict = f"test_acc <b>{test:.4f}</b> (test_loss {best['test_loss']:.4f})" if test is not None else "not tested"
        winner = (
            f"<p>Best trial <b>{html.escape(best['trial_id'])}</b>: {metric} {best['value']:.4f} at epoch {best['epoch']}; "
            f"on the test split, evaluated once: {verdict}.</p><pre>{html.escape(best['replay'])}</pre>"
        )
    else:
        winner = "<p>No trial produced a finite metric.</p>"
    figures = "".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}" alt="{name}">'
        f"<figcaption>{name}</figcaption></figure>"
        for name, path in images.items()
    )
    counts = ", ".join(f"{n} {status}" for status, n in summary["statuses"].items())
    parts = summary.get("parts") or []
    grown = f"<p>Ran in {len(parts)} parts: {html.escape('; '.join(map(describe_part, parts)))}.</p>" if len(parts) > 1 else ""
    confirmed = render_confirm(summary.get("confirm"))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Search {html.escape(summary["name"])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} img{{max-width:100%}} pre{{white-space:pre-wrap}}</style>
</head><body>
<h1>Search {html.escape(summary["name"])}</h1>
<p>{summary["num_trials"]} trials ({html.escape(counts)}), {summary["total_epochs"]} epochs,
{summary["wall_seconds"]:.0f} s; metric {html.escape(metric)} ({summary["settings"]["mode"]}).</p>
{grown}
{winner}
{confirmed}
<h2>Top {min(top, len(rows))} trials</h2>{table}
{figures}
</body></html>
"""


def render_confirm(confirm: dict[str, Any] | None) -> str:
    """--confirm's table: mean ± std of each confirmed config's val metric and test accuracy over its new seeds."""
    if not confirm:
        return ""
    head = ["config of", "search", f"{confirm['metric']} mean ± std", "test_acc mean ± std", "seeds"]
    rows = [
        [
            entry["trial_id"],
            f"{entry['search_value']:.4f}",
            plus_minus(entry["val_mean"], entry["val_std"]),
            plus_minus(entry["test_acc_mean"], entry["test_acc_std"]),
            ", ".join(str(run["seed"]) for run in entry["runs"]),
        ]
        for entry in confirm["configs"]
    ]
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>"
    return (
        f"<h2>Confirmed: top {confirm['top_k']} configs, {confirm['seeds']} new seeds each</h2>"
        f"<p>The winner is the config with the best mean {html.escape(confirm['metric'])}: "
        f"<b>{html.escape(str(confirm['winner']))}</b>.</p>{table}"
    )


def plot_confirm(confirm: dict[str, Any], path: Path) -> None:
    """Each confirmed config's mean val metric and test accuracy over its seeds, with ± one std as error bars."""
    entries = confirm["configs"]
    figure, axes = plt.subplots(figsize=(max(4, 1.6 * len(entries)), 3.5))
    x = np.arange(len(entries))
    for offset, key, label in ((-0.1, "val", confirm["metric"]), (0.1, "test_acc", "test_acc")):
        means = [entry[f"{key}_mean"] if entry[f"{key}_mean"] is not None else np.nan for entry in entries]
        stds = [entry[f"{key}_std"] or 0.0 for entry in entries]
        axes.errorbar(x + offset, means, yerr=stds, fmt="o", capsize=4, label=label)
    axes.set_xticks(x, [entry["trial_id"] for entry in entries], rotation=20)
    axes.set_ylabel("mean ± std over seeds")
    axes.set_title(f"confirmed configs, {confirm['seeds']} seeds each")
    axes.legend()
    _save(figure, path)


def _save(figure: Any, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
