"""Runs in the driver at the end of a search, or on demand (`text-recognizer-search report FOLDER`): an offline
report anyone can open, `report.html` with its PNGs in `<search>/report/`, built from summary.json and Tune's
per-trial result.json files (no W&B needed)."""

from __future__ import annotations

import base64
import html
import json
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node or in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import optuna.visualization.matplotlib as vis  # noqa: E402

from text_recognizer.facts import REPORT_PAGE, SUMMARY_FILE, TRIAL_PREFIX, TrialStatus  # noqa: E402
from text_recognizer.search.outputs.results import describe_part, finite, plus_minus, ranked, short  # noqa: E402
from text_recognizer.util import UserError  # noqa: E402

TOP = 10  # rows of the report's table
IMPORTANCE_METHOD = "Optuna's fANOVA: each hyperparameter's share\nof the best metric's variance (a random forest's)"


def load_summary(folder: Path) -> dict[str, Any]:
    """A search folder's summary.json."""
    if not (folder / SUMMARY_FILE).is_file():
        raise UserError(f"{folder}: not a search folder (no {SUMMARY_FILE})")
    return json.loads((folder / SUMMARY_FILE).read_text())


def load_curves(folder: Path, summary: dict[str, Any]) -> dict[str, list[dict]]:
    """Each trial's results (one dict per epoch, from Tune's result.json), by trial id."""
    curves = {}
    for row in summary["trials"]:
        path = folder / f"{TRIAL_PREFIX}{row['trial_id']}" / "result.json"
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


def study(summary: dict[str, Any], curves: dict[str, list[dict]]) -> optuna.Study:
    """The search as an Optuna study, for Optuna's importance evaluators and plots: a trial per trial with a finite
    best metric, its searched values in their distributions, its best metric as its value, its epochs' metric as
    its intermediate values."""
    metric = summary["settings"]["metric"]
    distributions = {param: distribution(spec) for param, spec in summary["space"].items()}
    made = optuna.create_study(direction="maximize" if summary["settings"]["mode"] == "max" else "minimize")
    key = f"best_{metric}"
    for row in summary["trials"]:
        # a row with no config is one Tune holds no result of (results.own_metrics): it is no trial of the study
        if finite(row.get(key)) is None or not distributions.keys() <= row["config"].keys():
            continue
        epochs = {
            r["training_iteration"]: r[metric] for r in curves.get(row["trial_id"], []) if finite(r.get(metric)) is not None
        }
        params = {param: row["config"][param] for param in distributions}
        trial = optuna.trial.create_trial(
            params=params, distributions=distributions, value=row[key], intermediate_values=epochs, user_attrs=row
        )
        made.add_trial(trial)
    return made


def distribution(spec: dict[str, Any]) -> optuna.distributions.BaseDistribution:
    """One sampler of our YAML as Optuna's distribution (randint's high is exclusive, IntDistribution's not)."""
    ((kind, value),) = spec.items()
    if kind in ("choice", "grid"):
        return optuna.distributions.CategoricalDistribution(value)
    if kind == "randint":
        return optuna.distributions.IntDistribution(value[0], value[1] - 1)
    return optuna.distributions.FloatDistribution(value[0], value[1], log=kind == "loguniform")


def plot_curves(summary: dict[str, Any], curves: dict[str, list[dict]], path: Path) -> int:
    """The metric per epoch, one line per trial (Optuna's intermediate-values plot), with ASHA's marks drawn on its
    axes: dashed lines at the rungs, a cross where ASHA stopped a trial. Returns the number of curves drawn."""
    metric, settings = summary["settings"]["metric"], summary["settings"]
    searched = study(summary, curves)
    with_curves = [trial for trial in searched.trials if trial.intermediate_values]
    axes = vis.plot_intermediate_values(searched)
    for rung in rungs(settings):
        axes.axvline(rung, color="0.35", linestyle="--", linewidth=1, zorder=1)  # seen on Optuna's grey (ggplot) axes
    for trial in with_curves:
        if trial.user_attrs["status"] == TrialStatus.STOPPED_EARLY:
            epoch = max(trial.intermediate_values)
            axes.plot(epoch, trial.intermediate_values[epoch], marker="x", markersize=9, color="black", zorder=3)
    if axes.get_legend():
        axes.get_legend().remove()  # a trial number a line: unreadable past a few trials, and the table names them
    axes.set(
        xlabel="epoch", ylabel=metric, title=f"{metric} per epoch, {len(with_curves)} trials (x: stopped by ASHA; dashed: rungs)"
    )
    axes.set_xlim(0.5, settings["max_t"] + 0.5)
    _save(axes.figure, path)
    return len(with_curves)


def importance(summary: dict[str, Any], curves: dict[str, list[dict]] | None = None) -> dict[str, float]:
    """Each hyperparameter's share of the best metric's variance, by Optuna's fANOVA evaluator (a random forest
    fitted to the trials; the shares sum to 1). fANOVA, not PED-ANOVA: PED-ANOVA compares the top 10% of trials
    with the rest, which is one trial in a small search (it ranked a decisive optimizer last on 7 trials), and
    fANOVA is Optuna's default; MeanDecreaseImpurity is its cruder cousin on the same forest."""
    searched = study(summary, curves or {})
    if len(searched.trials) < 2 or len(summary["space"]) < 2:  # one parameter explains all there is
        return {param: float(len(searched.trials) >= 2) for param in summary["space"]}
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    scores = optuna.importance.get_param_importances(searched, evaluator=evaluator)
    return {param: float(scores.get(param, 0.0)) for param in summary["space"]}


def plot_importance(summary: dict[str, Any], path: Path) -> None:
    scores = importance(summary)
    figure, axes = plt.subplots(figsize=(7, 0.5 * len(scores) + 2))
    ordered = sorted(scores, key=scores.get)
    axes.barh(ordered, [scores[p] for p in ordered], color="tab:blue")
    axes.set_xlim(0, 1)
    axes.set_title(f"parameter importance, {IMPORTANCE_METHOD}", fontsize=10)
    _save(figure, path)


def plot_optuna(draw: Any, summary: dict[str, Any], path: Path) -> None:
    """One of Optuna's matplotlib plots of the search's study (parallel coordinates, slices), saved to `path`."""
    drawn = draw(study(summary, {}))
    axes = drawn.flat[0] if isinstance(drawn, np.ndarray) else drawn
    if isinstance(drawn, np.ndarray):  # the slices' colour bar (trial numbers) lands on the last slice: drop it
        for extra in set(axes.figure.axes) - set(drawn.flat):
            extra.remove()
    # Optuna sizes them for a notebook: room for an axis (or a slice) a parameter, and for the colour bar beside them
    axes.figure.set_size_inches(
        max(8, 2.2 * (len(summary["space"]) + 1)) if draw is vis.plot_parallel_coordinate else 4 * len(summary["space"]) + 2, 5
    )
    _save(axes.figure, path)


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
        "parallel_coordinates.png": lambda p: plot_optuna(vis.plot_parallel_coordinate, summary, p),
        "metric_vs_hyperparameters.png": lambda p: plot_optuna(vis.plot_slice, summary, p),
        "importance.png": lambda p: plot_importance(summary, p),
    }
    if summary.get("confirm") and summary["confirm"]["configs"]:
        figures["confirm.png"] = lambda p: plot_confirm(summary["confirm"], p)
    if not summary["space"]:  # every hyperparameter fixed (a benchmark's one configuration): nothing to plot them against
        figures = {"curves.png": figures["curves.png"]}
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no line per study the report builds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # Optuna's matplotlib plots, since 2.2
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a colour bar's axes (Optuna's plots) don't take tight_layout
        figure.tight_layout()
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
