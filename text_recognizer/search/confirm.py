"""Runs in the driver: --confirm TOP_KxSEEDS, the search's last stage: its best configs trained again with new seeds.

A single val reading of a single seed ranks the top of a search by noise once the gap between configs is smaller than
the seed-to-seed spread of one config. Confirming trains each of the TOP_K best configs SEEDS more times (each with
its own --seed run flag, at the full max_t, no early stopping) as the trials of a second, small Tune experiment
in the search's folder, with the search's resources; the winner is the config with the best mean.

Here: which configs, the experiment's trial configs, and the per-config statistics. The fit is the driver's.
"""

from __future__ import annotations

import statistics
from typing import Any

from text_recognizer.facts import TrialStatus
from text_recognizer.flags import SEED
from text_recognizer.search.outputs.results import finite, ranked

ORIGIN_KEY = "confirm_of"  # a confirm run's W&B config: the search trial whose config it repeats


def candidates(summary: dict[str, Any], top_k: int) -> list[dict[str, Any]]:
    """The TOP_K best trials of the search (by their best metric; diverged and failed ones never count)."""
    return [row for row in ranked(summary) if row["status"] != TrialStatus.ERROR][:top_k]


def seeds_for(config: dict[str, Any], count: int) -> list[int]:
    """`count` seeds that the config's own trial did not use: the ones after its seed."""
    first = int(config.get("seed", SEED))
    return [first + offset for offset in range(1, count + 1)]


def trial_configs(rows: list[dict[str, Any]], seeds: int, max_t: int) -> list[dict[str, Any]]:
    """The confirm experiment's trials: each candidate's config with each new seed, trained for max_t epochs."""
    return [{**row["config"], "seed": seed, "max_epochs": max_t} for row in rows for seed in seeds_for(row["config"], seeds)]


def param_space(configs: list[dict[str, Any]]) -> dict[str, Any]:
    """A Tune param space that holds every one of `configs` (each replays as a point to evaluate): each key a
    choice of the values the configs give it."""
    from ray import tune

    keys = dict.fromkeys(key for config in configs for key in config)
    space = {}
    for key in keys:
        values = list(dict.fromkeys(config.get(key) for config in configs))
        space[key] = values[0] if len(values) == 1 else tune.choice(values)
    return space


def origin(config: dict[str, Any], rows: list[dict[str, Any]]) -> str | None:
    """The search trial whose config a confirm trial repeats (its config but for the seed and the epochs)."""
    bare = {key: value for key, value in config.items() if key not in ("seed", "max_epochs")}
    for row in rows:
        if {key: value for key, value in row["config"].items() if key not in ("seed", "max_epochs")} == bare:
            return row["trial_id"]
    return None


def spread(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for one value) of the finite values; None, None when there are none."""
    numbers = [value for value in values if finite(value) is not None]
    if not numbers:
        return None, None
    return statistics.fmean(numbers), statistics.stdev(numbers) if len(numbers) > 1 else 0.0


def aggregate(rows: list[dict[str, Any]], confirmed: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any]:
    """Per candidate config: its confirm trials' best val metric and test metrics with mean and std, best mean first;
    `confirmed`: one dict per confirm trial (trial_id, origin, seed, value, test_acc, test_loss, checkpoint ...)."""
    configs = []
    for row in rows:
        mine = sorted((trial for trial in confirmed if trial["origin"] == row["trial_id"]), key=lambda trial: trial["seed"])
        entry = {"trial_id": row["trial_id"], "config": row["config"], "search_value": row.get(f"best_{metric}"), "runs": mine}
        for key, values in (("val", [trial["value"] for trial in mine]), ("test_acc", [trial.get("test_acc") for trial in mine])):
            entry[f"{key}_mean"], entry[f"{key}_std"] = spread(values)
        configs.append(entry)
    sign = -1 if mode == "max" else 1
    configs.sort(key=lambda entry: (entry["val_mean"] is None, sign * (entry["val_mean"] or 0.0)))
    return {"metric": metric, "configs": configs, "winner": configs[0]["trial_id"] if configs else None}
