"""Search configs (YAML): the search space over run flags, ASHA settings and fixed run args, validated."""

from __future__ import annotations

import argparse
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from text_recognizer.flags import DATA_CLASS, DATA_FLAGS, MODEL_CLASS, MODEL_FLAGS, build_parser
from text_recognizer.util import UserError

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"  # shipped with the package; experiments/ links here
DEFAULT_CONFIG = CONFIGS_DIR / "mlp_asha.yaml"
SMOKE_CONFIG = CONFIGS_DIR / "smoke.yaml"  # --smoke-test: the one home of the smoke settings
METRICS = {"val_acc": "max", "val_loss": "min", "train_acc": "max", "train_loss": "min"}
SAMPLERS = ("choice", "uniform", "loguniform", "randint", "grid")
# how the next trial's values are picked: at random (Tune's BasicVariantGenerator), or by Optuna's TPE model of
# the results so far (Tune's OptunaSearch); both run under the same ASHA scheduler
SEARCH_ALGS = ("random", "optuna")
# what Optuna's TPE is told of a trial ASHA stopped: COMPLETE with its last value (Ray's OptunaSearch), or PRUNED at
# the epoch it reached, TPE's own handling of stopped trials (search/pruned.py; off until a benchmark says it is better)
ASHA_STOPS_AS = ("complete", "pruned")
NOT_MODELLED = {"optuna": ("grid",)}  # samplers a search_alg can't express: grid tries every value, a model picks one
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}
# Flags the search itself controls: a trial's epochs are ASHA's max_t, its device is the one Ray gave it.
NOT_SEARCHABLE = {
    "max_epochs",
    "gpus",
    "accelerator",
    "devices",
    "log_dir",
    "wandb",
    "wandb_project",
    "load_checkpoint",
    "fast_dev_run",
    "help",
}
CLASS_FLAGS = {"data_class", "model_class"}  # may be fixed, never sampled: they decide which flags exist


@dataclass(frozen=True)
class SearchConfig:
    """A validated search config: the YAML's keys, with the scheduler's (max_t, grace_period,
    reduction_factor) brought up to the top level, and `path`, the file it came from."""

    path: str = str(DEFAULT_CONFIG)
    metric: str = "val_acc"
    mode: str = "max"
    num_samples: int = 10
    seed: int = 0  # seeds the search_alg's sampler (not the trials: each trial's --seed is a run flag)
    search_alg: str = SEARCH_ALGS[0]
    asha_stops_as: str = ASHA_STOPS_AS[0]  # Optuna only
    time_budget: float | None = None  # seconds of search; None: until num_samples trials ended
    max_t: int = 10
    grace_period: int = 1
    reduction_factor: float = 3
    fixed: dict[str, Any] = field(default_factory=dict)
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""

    def param_space(self) -> dict[str, Any]:
        """The Tune param space: fixed run args, samplers for the searched ones, and max_epochs = max_t."""
        from ray import tune  # here only: checking a config (and refusing a bad one) needs no Ray

        samplers = {
            "choice": tune.choice,
            "grid": tune.grid_search,
            "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(*v),
        }
        space = {key: samplers[kind](value) for key, spec in self.space.items() for kind, value in spec.items()}
        return {**self.fixed, **space, "max_epochs": self.max_t}

    def settings(self) -> dict[str, Any]:
        """The search settings (no search space), for W&B configs and summary.json."""
        return {k: v for k, v in asdict(self).items() if k not in ("space", "fixed")}


SCHEDULER_KEYS = ("max_t", "grace_period", "reduction_factor")  # the YAML's `scheduler:` mapping, top level in SearchConfig


def _yaml_types(hint: Any) -> Any:
    """What YAML values a SearchConfig field of type `hint` accepts: a float field takes an int too."""
    origin = typing.get_origin(hint) or hint
    return (int, float) if origin is float else origin


_HINTS = typing.get_type_hints(SearchConfig)
# the YAML's keys and their types, from SearchConfig's fields: a field added there is a key here
TOP_LEVEL = {
    **{f.name: _yaml_types(_HINTS[f.name]) for f in fields(SearchConfig) if f.name not in ("path", *SCHEDULER_KEYS)},
    "time_budget": (int, float, str),  # seconds, or a duration such as 10m
    "scheduler": dict,
}
SCHEDULER = {key: _yaml_types(_HINTS[key]) for key in SCHEDULER_KEYS}
INT_TYPES = ("int", "positive_int")
FLOAT_TYPES = ("float", "positive_float", "non_negative_float", "probability")
SCHEDULER = {"max_t": int, "grace_period": int, "reduction_factor": (int, float)}


def _is(value: Any, types: Any) -> bool:
    return isinstance(value, types) and not isinstance(value, bool)  # YAML's true is not a number


def resolve_config_path(text: str | Path) -> Path:
    """A config file: the path given, or the name of a config shipped with the package (e.g. fashion_mlp_asha)."""
    path = Path(text)
    shipped = CONFIGS_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
    if not path.is_file() and path.parent == Path(".") and shipped.is_file():
        return shipped
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
        raise UserError(f"search config {path}: no such file (shipped configs: {known})")
    return path


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: YAML syntax error{where}: {getattr(error, 'problem', error)}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    return raw


def _parse_top_level(raw: dict[str, Any], path: Path, bad: Any) -> SearchConfig:
    for key, value in raw.items():
        if key not in TOP_LEVEL:
            raise bad(key, f"unknown key (known: {', '.join(TOP_LEVEL)})")
        if not _is(value, TOP_LEVEL[key]):
            expected = getattr(TOP_LEVEL[key], "__name__", "a number or a duration such as 10m")
            raise bad(key, f"expected {expected}, got {type(value).__name__} {value!r}")
    scheduler = raw.get("scheduler", {})
    for key, value in scheduler.items():
        if key not in SCHEDULER:
            raise bad(f"scheduler.{key}", f"unknown key (known: {', '.join(SCHEDULER)})")
        if not _is(value, SCHEDULER[key]):
            raise bad(f"scheduler.{key}", f"expected a number, got {type(value).__name__} {value!r}")
    settings = {k: v for k, v in raw.items() if k != "scheduler"}
    if "time_budget" in settings:
        try:
            settings["time_budget"] = parse_duration(settings["time_budget"])
        except ValueError as error:
            raise bad("time_budget", str(error)) from None
    return SearchConfig(path=str(path), **settings, **scheduler)


def parse_duration(value: str | float) -> float:
    """Seconds from a number of seconds or a duration such as 90s, 10m, 1.5h; ValueError unless > 0."""
    text = str(value).strip()
    unit = DURATION_UNITS.get(text[-1:].lower())
    try:
        seconds = float(text[:-1] if unit else text) * (unit or 1)
    except ValueError:
        raise ValueError(f"{value!r} is not a duration: write seconds or e.g. 90s, 10m, 1.5h") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{value!r}: the time budget must be more than 0 seconds")
    return seconds


def _check_settings(config: SearchConfig, bad: Any) -> None:
    if config.metric not in METRICS:
        raise bad("metric", f"unknown metric {config.metric!r} (known: {', '.join(METRICS)})")
    if config.mode not in ("min", "max"):
        raise bad("mode", f"must be min or max, got {config.mode!r}")
    for key in ("num_samples", "max_t", "grace_period"):
        if getattr(config, key) < 1:
            raise bad(key if key == "num_samples" else f"scheduler.{key}", f"must be >= 1, got {getattr(config, key)}")
    if config.grace_period > config.max_t:
        raise bad("scheduler.grace_period", f"{config.grace_period} is more than max_t {config.max_t}")
    if config.reduction_factor <= 1:
        raise bad("scheduler.reduction_factor", f"must be > 1, got {config.reduction_factor}")
    if not config.space:
        raise bad("space", "the search space is empty")
    if config.search_alg not in SEARCH_ALGS:
        raise bad("search_alg", f"unknown search_alg {config.search_alg!r} (known: {', '.join(SEARCH_ALGS)})")
    if config.asha_stops_as not in ASHA_STOPS_AS:
        raise bad("asha_stops_as", f"unknown value {config.asha_stops_as!r} (known: {', '.join(ASHA_STOPS_AS)})")
    if config.asha_stops_as != ASHA_STOPS_AS[0] and config.search_alg != "optuna":
        raise bad("asha_stops_as", f"{config.asha_stops_as} needs search_alg optuna ({config.search_alg} has no model to tell)")


def check_search_alg(space: dict[str, dict[str, Any]], search_alg: str, bad: Any) -> None:
    """Raise unless every sampler of the space is one that `search_alg` can model."""
    for key, spec in space.items():
        kind = next(iter(spec))
        if kind in NOT_MODELLED.get(search_alg, ()):
            message = f"{kind} can't be searched by search_alg {search_alg}: use choice (it picks one value a trial)"
            raise bad(f"space.{key}", message)


def _run_flags(fixed: dict[str, Any], path: Path, bad: Any) -> dict[str, argparse.Action]:
    """The run flags of the data and model classes that `fixed` chooses, by name."""
    for key in fixed:
        if key in NOT_SEARCHABLE:
            raise bad(f"fixed.{key}", "is set by the search itself" + (" (scheduler.max_t)" if key == "max_epochs" else ""))
    for key, registry in (("data_class", DATA_FLAGS), ("model_class", MODEL_FLAGS)):
        if key in fixed and fixed[key] not in registry:
            raise bad(f"fixed.{key}", f"unknown class {fixed[key]!r} (known: {', '.join(sorted(registry))})")
    parser = build_parser(
        [f"--data_class={fixed.get('data_class', DATA_CLASS)}", f"--model_class={fixed.get('model_class', MODEL_CLASS)}"],
        prog=str(path),
    )
    return {action.dest: action for action in parser._actions}


def _check_space(space: dict[str, Any], actions: dict[str, argparse.Action], bad: Any) -> None:
    for key, spec in space.items():
        name = f"space.{key}"
        if key in NOT_SEARCHABLE or key in CLASS_FLAGS:
            raise bad(name, "cannot be searched" + (": it is scheduler.max_t" if key == "max_epochs" else ""))
        if not isinstance(spec, dict) or len(spec) != 1:
            raise bad(name, f"expected one sampler, e.g. {{choice: [...]}} (samplers: {', '.join(SAMPLERS)})")
        ((kind, value),) = spec.items()
        if kind not in SAMPLERS:
            raise bad(name, f"unknown sampler {kind!r} (known: {', '.join(SAMPLERS)})")
        if kind in ("choice", "grid"):
            if not isinstance(value, list) or not value:
                raise bad(name, f"{kind} needs a non-empty list of values")
            for item in value:
                _check_value(actions, key, item, bad, name)
        else:
            _check_range(actions, key, kind, value, bad, name)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SearchConfig:
    """Read and validate a search config; `overrides` are run args from the command line, fixed for every trial.

    Raises UserError naming the file and the key for every problem.
    """
    path = resolve_config_path(path)

    def bad(key: str, message: str) -> UserError:
        return UserError(f"{path}: {key}: {message}")

    config = _parse_top_level(_read_yaml(path), path, bad)
    _check_settings(config, bad)
    fixed = {**config.fixed, **(overrides or {})}
    actions = _run_flags(fixed, path, bad)
    for key, value in fixed.items():
        _check_value(actions, key, value, bad, f"fixed.{key}")
    _check_space(config.space, actions, bad)
    check_search_alg(config.space, config.search_alg, bad)
    space = {key: spec for key, spec in config.space.items() if key not in (overrides or {})}  # the command line wins
    return replace(config, fixed=fixed, space=space)


def _check_value(actions: dict[str, argparse.Action], key: str, value: Any, bad: Any, name: str) -> None:
    """Raise unless `value` is what run flag `key` accepts (its type, range and choices)."""
    action = actions.get(key)
    if action is None:
        raise bad(name, f"unknown run flag {key!r} (see run_experiment.py --help)")
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise bad(name, f"expected true or false, got {value!r}")
        return
    if isinstance(value, (dict, list)) or value is None and action.default is not None:
        raise bad(name, f"wrong type: {type(value).__name__} {value!r}")
    if value is None:
        return
    flag_type = getattr(action.type, "__name__", "str")
    if flag_type in INT_TYPES and not _is(value, int) or flag_type in FLOAT_TYPES and not _is(value, (int, float)):
        hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(value, str) else ""
        raise bad(name, f"wrong type: {key} takes {flag_type.replace('_', ' ')} values, got {value!r}{hint}")
    try:
        converted = action.type(str(value)) if action.type else str(value)
    except (ValueError, argparse.ArgumentTypeError) as error:
        raise bad(name, f"wrong type or value {value!r}: {error}") from None
    if action.choices is not None and converted not in action.choices:
        raise bad(name, f"{value!r} is not one of {', '.join(map(str, action.choices))}")


def _check_range(actions: dict[str, argparse.Action], key: str, kind: str, value: Any, bad: Any, name: str) -> None:
    """Raise unless `value` is a [low, high] range of the right type for a uniform/loguniform/randint sampler."""
    if not isinstance(value, list) or len(value) != 2:
        raise bad(name, f"{kind} needs [low, high], got {value!r}")
    low, high = value
    number = int if kind == "randint" else (int, float)
    if not (_is(low, number) and _is(high, number)):
        hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(low, str) or isinstance(high, str) else ""
        raise bad(name, f"{kind} needs {'integer' if kind == 'randint' else 'numeric'} bounds, got {value!r}{hint}")
    if not low < high:
        raise bad(name, f"empty or inverted range [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise bad(name, f"loguniform needs low > 0, got {low}")
    action = actions.get(key)
    if action is not None and kind != "randint" and getattr(action.type, "__name__", "") in INT_TYPES:
        raise bad(name, f"{key} takes integers: use randint or choice, not {kind}")
    # randint's high is exclusive
    for bound in (low, high - 1 if kind == "randint" else high):
        _check_value(actions, key, bound, bad, name)
