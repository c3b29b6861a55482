"""load_config: every bad search config is a UserError naming the file and the key; the shipped configs load."""

from __future__ import annotations

import textwrap
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT
from ray import tune
from ray.tune.search.sample import Categorical, Domain, Float, Integer

from text_recognizer.facts import config_to_argv
from text_recognizer.search.config import CONFIGS_DIR, SearchConfig, load_config
from text_recognizer.search.spec import build_search_parser
from text_recognizer.training import build_parser, parse_args
from text_recognizer.util import UserError

SHIPPED = sorted(CONFIGS_DIR.glob("*.yaml"))
SPACE = "space:\n  fc1: {choice: [8, 16]}\n"  # a valid space, for cases about other keys


def write(tmp_path: Path, text: str, name: str = "search.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def assert_rejected(tmp_path: Path, text: str, *needles: str, overrides: dict | None = None) -> str:
    """load_config raises UserError whose message names the file and contains every needle."""
    path = write(tmp_path, text)
    with pytest.raises(UserError) as caught:
        load_config(path, overrides)
    message = str(caught.value)
    assert str(path) in message, message
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def space(key: str, spec: str) -> str:
    return f"space:\n  {key}: {spec}\n"


# (case id, YAML text, substrings the message must contain)
BAD_CONFIGS = [
    ("yaml-syntax", "metric: val_acc\nspace: {fc1: [1, 2\n", ("YAML syntax error", "line 3")),
    ("yaml-tab", "metric: val_acc\n\tmode: max\n", ("YAML syntax error", "line 2")),
    ("top-level-list", "- metric\n- mode\n", ("expected a mapping", "list")),
    ("top-level-scalar", "hello\n", ("expected a mapping", "str")),
    ("unknown-top-level", "metrc: val_acc\n" + SPACE, ("metrc", "unknown key")),
    ("unknown-scheduler-key", "scheduler: {max_tt: 3}\n" + SPACE, ("scheduler.max_tt", "unknown key")),
    ("scheduler-not-mapping", "scheduler: 3\n" + SPACE, ("scheduler", "expected dict")),
    ("scheduler-wrong-type", "scheduler: {max_t: ten}\n" + SPACE, ("scheduler.max_t", "ten")),
    ("num-samples-str", "num_samples: ten\n" + SPACE, ("num_samples", "expected int", "ten")),
    ("num-samples-float", "num_samples: 2.5\n" + SPACE, ("num_samples", "expected int")),
    ("num-samples-bool", "num_samples: true\n" + SPACE, ("num_samples", "expected int")),
    ("metric-int", "metric: 3\n" + SPACE, ("metric", "expected str")),
    ("space-not-mapping", "space: [fc1]\n", ("space", "expected dict")),
    ("fixed-not-mapping", "fixed: 3\n" + SPACE, ("fixed", "expected dict")),
    ("unknown-metric", "metric: val_f1\n" + SPACE, ("metric", "val_f1", "val_acc")),
    ("bad-mode", "mode: maximize\n" + SPACE, ("mode", "maximize")),
    ("num-samples-0", "num_samples: 0\n" + SPACE, ("num_samples", ">= 1")),
    ("max-t-0", "scheduler: {max_t: 0}\n" + SPACE, ("scheduler.max_t", ">= 1")),
    ("grace-period-0", "scheduler: {grace_period: 0}\n" + SPACE, ("scheduler.grace_period", ">= 1")),
    ("grace-over-max-t", "scheduler: {max_t: 3, grace_period: 4}\n" + SPACE, ("scheduler.grace_period", "max_t")),
    ("reduction-factor-1", "scheduler: {reduction_factor: 1}\n" + SPACE, ("scheduler.reduction_factor", "> 1")),
    ("reduction-factor-half", "scheduler: {reduction_factor: 0.5}\n" + SPACE, ("scheduler.reduction_factor", "> 1")),
    ("empty-file", "", ("space", "empty")),
    ("empty-space", "space: {}\n", ("space", "empty")),
    ("unknown-space-key", space("fc3", "{choice: [8]}"), ("space.fc3", "unknown run flag")),
    ("sampler-not-mapping", space("fc1", "8"), ("space.fc1", "one sampler")),
    ("sampler-two-keys", space("fc1", "{choice: [8], randint: [1, 9]}"), ("space.fc1", "one sampler")),
    ("sampler-empty", space("fc1", "{}"), ("space.fc1", "one sampler")),
    ("unknown-sampler", space("fc1", "{normal: [8, 2]}"), ("space.fc1", "unknown sampler", "normal")),
    ("choice-empty", space("fc1", "{choice: []}"), ("space.fc1", "non-empty list")),
    ("choice-not-list", space("fc1", "{choice: 8}"), ("space.fc1", "non-empty list")),
    ("grid-empty", space("fc1", "{grid: []}"), ("space.fc1", "non-empty list")),
    ("choice-str-in-ints", space("fc1", '{choice: [128, "big"]}'), ("space.fc1", "big")),
    ("choice-float-for-int", space("fc1", "{choice: [1.5]}"), ("space.fc1", "1.5")),
    ("choice-bool-for-int", space("fc1", "{choice: [true]}"), ("space.fc1", "True")),
    ("choice-list-value", space("fc1", "{choice: [[8]]}"), ("space.fc1", "wrong type")),
    ("choice-not-a-choice", space("optimizer", "{choice: [Adam, Nope]}"), ("space.optimizer", "Nope", "Adam")),
    ("choice-zero-layer", space("fc1", "{choice: [0]}"), ("space.fc1", "positive")),
    ("choice-negative-layer", space("fc2", "{choice: [-8]}"), ("space.fc2", "positive")),
    ("randint-negative-layer", space("fc1", "{randint: [-4, 8]}"), ("space.fc1", "positive")),
    ("grid-zero-layer", space("fc1", "{grid: [0, 8]}"), ("space.fc1", "positive")),
    ("uniform-inverted", space("dropout", "{uniform: [0.5, 0.1]}"), ("space.dropout", "empty or inverted range")),
    ("uniform-empty", space("dropout", "{uniform: [0.3, 0.3]}"), ("space.dropout", "empty or inverted range")),
    ("loguniform-inverted", space("lr", "{loguniform: [5, 1]}"), ("space.lr", "empty or inverted range")),
    ("loguniform-empty", space("lr", "{loguniform: [3, 3]}"), ("space.lr", "empty or inverted range")),
    ("randint-inverted", space("fc1", "{randint: [5, 1]}"), ("space.fc1", "empty or inverted range")),
    ("randint-empty", space("fc1", "{randint: [3, 3]}"), ("space.fc1", "empty or inverted range")),
    ("loguniform-zero-low", space("lr", "{loguniform: [0, 0.1]}"), ("space.lr", "low > 0")),
    ("loguniform-negative-low", space("lr", "{loguniform: [-1.0, 0.1]}"), ("space.lr", "low > 0")),
    ("uniform-out-of-range", space("dropout", "{uniform: [0.0, 1.5]}"), ("space.dropout", "1.5")),
    ("uniform-on-int-flag", space("fc1", "{uniform: [1, 8]}"), ("space.fc1", "randint")),
    ("loguniform-on-int-flag", space("batch_size", "{loguniform: [8, 64]}"), ("space.batch_size", "randint")),
    ("randint-float-bounds", space("fc1", "{randint: [1.0, 8.0]}"), ("space.fc1", "integer")),
    ("range-not-pair", space("lr", "{uniform: [0.1]}"), ("space.lr", "[low, high]")),
    ("range-not-list", space("lr", "{uniform: 0.1}"), ("space.lr", "[low, high]")),
    ("lr-string-choice", space("lr", "{choice: [1e-3]}"), ("space.lr", "1.0e-3")),
    ("lr-string-range", space("lr", "{loguniform: [1e-4, 1e-2]}"), ("space.lr", "1.0e-")),
    ("lr-string-fixed", "fixed: {lr: 1e-3}\n" + SPACE, ("fixed.lr", "1.0e-3")),
    ("max-epochs-in-space", space("max_epochs", "{choice: [3, 5]}"), ("space.max_epochs", "max_t")),
    ("max-epochs-fixed", "fixed: {max_epochs: 3}\n" + SPACE, ("fixed.max_epochs", "max_t")),
    ("gpus-in-space", space("gpus", "{choice: [0]}"), ("space.gpus", "cannot be searched")),
    ("log-dir-fixed", "fixed: {log_dir: /tmp}\n" + SPACE, ("fixed.log_dir", "set by the search")),
    ("data-class-in-space", space("data_class", "{choice: [MNIST, FashionMNIST]}"), ("space.data_class", "cannot be searched")),
    ("model-class-in-space", space("model_class", "{choice: [MLP]}"), ("space.model_class", "cannot be searched")),
    ("fixed-unknown-key", "fixed: {fc3: 8}\n" + SPACE, ("fixed.fc3", "unknown run flag")),
    ("fixed-wrong-type", "fixed: {batch_size: big}\n" + SPACE, ("fixed.batch_size", "big")),
    ("fixed-float-for-int", "fixed: {batch_size: 12.5}\n" + SPACE, ("fixed.batch_size", "12.5")),
    ("fixed-zero-layer", "fixed: {fc2: 0}\n" + SPACE, ("fixed.fc2", "positive")),
    ("fixed-list", "fixed: {lr: [0.1]}\n" + SPACE, ("fixed.lr", "wrong type")),
    ("fixed-flag-not-bool", "fixed: {deterministic: 1}\n" + SPACE, ("fixed.deterministic", "true or false")),
    ("fixed-not-a-choice", "fixed: {optimizer: Nope}\n" + SPACE, ("fixed.optimizer", "Nope")),
    ("fixed-data-class-nope", "fixed: {data_class: Nope}\n" + SPACE, ("fixed.data_class", "Nope", "MNIST")),
    ("fixed-model-class-nope", "fixed: {model_class: Nope}\n" + SPACE, ("fixed.model_class", "Nope", "MLP")),
    ("unknown-search-alg", "search_alg: hyperopt\n" + SPACE, ("search_alg", "hyperopt", "optuna")),
    ("grid-under-optuna", "search_alg: optuna\n" + space("fc1", "{grid: [8, 16]}"), ("space.fc1", "grid", "optuna", "choice")),
    ("time-budget-text", "time_budget: soon\n" + SPACE, ("time_budget", "soon", "10m")),
    ("time-budget-zero", "time_budget: 0\n" + SPACE, ("time_budget", "more than 0")),
    ("time-budget-negative", "time_budget: -5m\n" + SPACE, ("time_budget", "more than 0")),
    ("time-budget-list", "time_budget: [5]\n" + SPACE, ("time_budget", "duration")),
]


@pytest.mark.parametrize(("text", "needles"), [case[1:] for case in BAD_CONFIGS], ids=[case[0] for case in BAD_CONFIGS])
def test_bad_config(tmp_path: Path, text: str, needles: tuple[str, ...]) -> None:
    assert_rejected(tmp_path, text, *needles)


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        ({"fc1": 0}, ("fixed.fc1", "positive")),
        ({"max_epochs": 3}, ("fixed.max_epochs", "max_t")),
        ({"data_class": "Nope"}, ("fixed.data_class", "Nope")),
    ],
    ids=["zero-layer", "max-epochs", "data-class"],
)
def test_bad_override(tmp_path: Path, overrides: dict, needles: tuple[str, ...]) -> None:
    assert_rejected(tmp_path, SPACE, *needles, overrides=overrides)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_error_is_one_line_with_position(tmp_path: Path) -> None:
    message = assert_rejected(tmp_path, "space:\n  fc1: {choice: [8]\n  fc2: x\n", "YAML syntax error", "line")
    assert "column" in message


@pytest.mark.parametrize("path", SHIPPED, ids=[path.stem for path in SHIPPED])
def test_shipped_config_loads(path: Path) -> None:
    config = load_config(path)
    assert config.path == str(path)
    assert config.space and config.num_samples >= 1
    assert 1 <= config.grace_period <= config.max_t
    params = config.param_space()
    assert params["max_epochs"] == config.max_t
    for key in config.space:
        assert isinstance(params[key], Domain), key
    for key, value in config.fixed.items():
        assert params[key] == value


def test_param_space_samplers(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        scheduler: {max_t: 4, grace_period: 2, reduction_factor: 2}
        fixed: {data_class: FashionMNIST, limit_train_batches: 5}
        space:
          fc1: {choice: [8, 16]}
          fc2: {randint: [4, 9]}
          dropout: {uniform: [0.0, 0.5]}
          lr: {loguniform: [1.0e-4, 1.0e-2]}
          batch_size: {grid: [32, 64]}
        """,
    )
    config = load_config(path)
    assert (config.max_t, config.grace_period, config.reduction_factor) == (4, 2, 2)
    params = config.param_space()
    assert params["max_epochs"] == 4
    assert params["data_class"] == "FashionMNIST" and params["limit_train_batches"] == 5
    assert isinstance(params["fc1"], Categorical) and params["fc1"].categories == [8, 16]
    assert isinstance(params["fc2"], Integer) and (params["fc2"].lower, params["fc2"].upper) == (4, 9)
    assert isinstance(params["dropout"], Float) and (params["dropout"].lower, params["dropout"].upper) == (0.0, 0.5)
    assert isinstance(params["lr"], Float) and params["lr"].lower == pytest.approx(1e-4)
    assert params["batch_size"] == tune.grid_search([32, 64])


def test_overrides_win_and_leave_the_space(tmp_path: Path) -> None:
    path = write(tmp_path, "fixed: {data_class: MNIST, fc2: 16}\nspace:\n  fc1: {choice: [64, 128]}\n  lr: {choice: [0.01]}\n")
    config = load_config(path, {"fc1": 8, "data_class": "FashionMNIST"})
    assert "fc1" not in config.space and "lr" in config.space
    assert config.fixed == {"data_class": "FashionMNIST", "fc2": 16, "fc1": 8}
    params = config.param_space()
    assert params["fc1"] == 8 and params["data_class"] == "FashionMNIST"
    assert isinstance(params["lr"], Categorical)


def test_override_of_a_shipped_config() -> None:
    config = load_config("mlp_asha", {"fc1": 8, "data_class": "FashionMNIST"})
    params = config.param_space()
    assert params["fc1"] == 8 and params["data_class"] == "FashionMNIST"
    assert "fc1" not in config.space and "fc2" in config.space


@pytest.mark.parametrize("path", SHIPPED, ids=[path.stem for path in SHIPPED])
def test_shipped_trials_are_valid_runs(path: Path) -> None:
    """Every space key is a run flag, and sampled trials parse exactly as run_experiment.py would."""
    config = load_config(path)
    fixed = config.fixed
    parser = build_parser(
        [f"--data_class={fixed.get('data_class', 'MNIST')}", f"--model_class={fixed.get('model_class', 'MLP')}"]
    )
    flags = {action.dest for action in parser._actions}
    assert set(config.space) <= flags
    assert set(config.fixed) <= flags
    rng = np.random.default_rng(0)
    params = config.param_space()
    for _ in range(5):
        trial = {key: value.sample(random_state=rng) if isinstance(value, Domain) else value for key, value in params.items()}
        args = parse_args(config_to_argv(trial), prog="trial")
        assert args.max_epochs == config.max_t
        for key, value in trial.items():
            assert getattr(args, key) == pytest.approx(value) if isinstance(value, float) else getattr(args, key) == value


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), (45.5, 45.5), ("90s", 90), ("10m", 600), ("1.5h", 5400), ("2M", 120)])
def test_time_budget_units(tmp_path: Path, text: str | float, seconds: float) -> None:
    path = tmp_path / "budget.yaml"
    path.write_text(f"time_budget: {text}\n" + SPACE)
    assert load_config(path).time_budget == seconds


def test_optuna_maps_every_other_sampler(tmp_path: Path) -> None:
    """Every sampler but grid becomes an Optuna distribution: Tune's own conversion accepts the whole space."""
    from ray.tune.search.optuna import OptunaSearch

    path = tmp_path / "optuna.yaml"
    path.write_text(
        "search_alg: optuna\nspace:\n  fc1: {choice: [8, 16]}\n  dropout: {uniform: [0.0, 0.5]}\n"
        "  lr: {loguniform: [1.0e-4, 1.0e-2]}\n  fc2: {randint: [4, 9]}\n"
    )
    config = load_config(path)
    space = {key: value for key, value in config.param_space().items() if key in config.space}
    distributions = OptunaSearch.convert_search_space(space)
    assert sorted(distributions) == ["dropout", "fc1", "fc2", "lr"]
    assert distributions["lr"].log and distributions["fc2"].high == 8  # randint's high is exclusive


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_configs_hold_only_what_differs_from_the_defaults(path: Path) -> None:
    """A shipped config that restates a default hides what it chose: every setting it writes differs from
    SearchConfig's default, and every fixed run flag from run_experiment.py's."""
    raw = yaml.safe_load(path.read_text())
    defaults = {field.name: field.default for field in fields(SearchConfig)}
    written = {**{k: v for k, v in raw.items() if k not in ("scheduler", "fixed", "space")}, **raw.get("scheduler", {})}
    assert [key for key, value in written.items() if value == defaults[key]] == []
    chosen = [f"--{key}={raw['fixed'][key]}" for key in ("data_class", "model_class") if key in raw.get("fixed", {})]
    run_defaults = {**vars(parse_args(chosen)), **vars(parse_args([]))}  # the chosen classes' flags, the classes' defaults
    assert [key for key, value in raw.get("fixed", {}).items() if value == run_defaults[key]] == []


@pytest.mark.parametrize("path", [*SHIPPED, ROOT / "benchmarks" / "speed_config.yaml"], ids=lambda p: p.stem)
def test_every_flag_a_shipped_config_uses_is_in_help(path: Path) -> None:
    """Flags are documented once, by --help: every run flag a shipped config fixes or searches is in
    run_experiment.py --help (for the classes it chooses), and every setting that has a search flag in tune_mlp.py's."""
    raw = yaml.safe_load(path.read_text())
    chosen = [f"--{key}={raw['fixed'][key]}" for key in ("data_class", "model_class") if key in raw.get("fixed", {})]
    run_help, search_help = build_parser(chosen).format_help(), build_search_parser().format_help()
    missing = [key for key in [*raw.get("fixed", {}), *raw["space"]] if f"--{key} " not in run_help]
    settings = [key for key in ("num_samples", "search_alg", "time_budget") if key in raw]  # those with a search flag
    missing += [key for key in settings if f"--{key.replace('_', '-')} " not in search_help]
    assert missing == []
