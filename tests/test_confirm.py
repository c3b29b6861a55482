"""confirm.py without Ray: which configs are confirmed, with which seeds, and how the winner is picked."""

from __future__ import annotations

import statistics

import pytest

from text_recognizer.search import confirm
from text_recognizer.search.spec import parse_confirm
from text_recognizer.util import UserError


def row(trial_id: str, value: float, status: str = "completed", **config) -> dict:
    return {"trial_id": trial_id, "status": status, "best_val_acc": value, "config": {"fc1": 16, **config}}


SUMMARY = {
    "settings": {"metric": "val_acc", "mode": "max"},
    "trials": [row("a", 0.90, lr=0.1), row("b", 0.91, lr=0.2), row("c", 0.95, "diverged", lr=0.3), row("d", 0.5, lr=0.4)],
}


def test_the_top_configs_are_the_best_ranked_and_never_a_diverged_one() -> None:
    assert [r["trial_id"] for r in confirm.candidates(SUMMARY, 2)] == ["b", "a"]


def test_each_config_gets_new_seeds_and_the_full_max_t() -> None:
    chosen = confirm.candidates(SUMMARY, 2)
    configs = confirm.trial_configs(chosen, 2, max_t=7)
    assert [(c["lr"], c["seed"], c["max_epochs"]) for c in configs] == [(0.2, 43, 7), (0.2, 44, 7), (0.1, 43, 7), (0.1, 44, 7)]
    assert confirm.origin(configs[2], chosen) == "a"
    space = confirm.param_space(configs)
    assert space["fc1"] == 16 and sorted(space["lr"].categories) == [0.1, 0.2] and sorted(space["seed"].categories) == [43, 44]


def test_the_winner_is_the_best_mean_not_the_best_single_run() -> None:
    chosen = confirm.candidates(SUMMARY, 2)
    runs = [
        {"origin": "b", "seed": 43, "value": 0.99, "test_acc": 0.9},  # b has the single best run ...
        {"origin": "b", "seed": 44, "value": 0.70, "test_acc": 0.7},
        {"origin": "a", "seed": 43, "value": 0.90, "test_acc": 0.88},  # ... a the best mean
        {"origin": "a", "seed": 44, "value": 0.92, "test_acc": 0.89},
    ]
    result = confirm.aggregate(chosen, runs, "val_acc", "max")
    assert result["winner"] == "a" and [e["trial_id"] for e in result["configs"]] == ["a", "b"]
    a = result["configs"][0]
    assert a["val_mean"] == pytest.approx(0.91) and a["val_std"] == pytest.approx(statistics.stdev([0.90, 0.92]))
    assert a["test_acc_mean"] == pytest.approx(0.885)
    assert confirm.aggregate(chosen, runs, "val_loss", "min")["winner"] == "b"


@pytest.mark.parametrize(("text", "expected"), [("3x3", (3, 3)), ("2", (2, 3)), ("1X5", (1, 5))])
def test_confirm_flag(text: str, expected: tuple[int, int]) -> None:
    assert parse_confirm(text) == expected


@pytest.mark.parametrize("text", ["0x3", "3x0", "x3", "3x", "three"])
def test_confirm_flag_refused(text: str) -> None:
    with pytest.raises(UserError):
        parse_confirm(text)
