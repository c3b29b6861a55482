"""The offline report of a search folder: what its figures and table hold, and its command."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from text_recognizer.cli import tune_mlp
from text_recognizer.search.outputs.report import importance, load_curves, load_summary, plot_curves, write_report

SPACE = {"fc1": {"choice": [16, 64]}, "lr": {"loguniform": [0.0001, 0.01]}, "optimizer": {"choice": ["Adam", "SGD"]}}


def write_search(folder: Path, trials: int = 8) -> dict:
    """A search folder as a finished search leaves it: summary.json and one result.json per trial (7 with results).

    val_acc depends on the optimizer only (Adam 0.8, SGD 0.5, plus a little per trial); the last trial never ran.
    """
    rows = []
    for i in range(trials):
        trial_id = f"t{i:02d}"
        config = {"fc1": [16, 64][i % 2], "lr": 10 ** (-4 + 2 * i / trials), "optimizer": ["Adam", "SGD"][(i // 2) % 2]}
        final = (0.8 if config["optimizer"] == "Adam" else 0.5) + 0.001 * i
        epochs = 0 if i == trials - 1 else (4 if i % 3 else 1)
        folder.joinpath(f"trial_{trial_id}").mkdir(parents=True)
        lines = [json.dumps({"training_iteration": e, "val_acc": final - 0.05 * (epochs - e)}) for e in range(1, epochs + 1)]
        if epochs:
            (folder / f"trial_{trial_id}" / "result.json").write_text("\n".join(lines) + "\n")
        status = "pending" if not epochs else "completed" if epochs == 4 else "stopped_early"
        rows.append(
            {
                "trial_id": trial_id,
                "status": status,
                "epochs": epochs,
                "config": config,
                "best_val_acc": final if epochs else None,
            }
        )
    summary = {
        "name": "r",
        "settings": {"metric": "val_acc", "mode": "max", "max_t": 4, "grace_period": 1, "reduction_factor": 2},
        "space": SPACE,
        "trials": rows,
        "num_trials": trials,
        "statuses": {},
        "total_epochs": sum(row["epochs"] for row in rows),
        "wall_seconds": 1.0,
        "best": {
            "trial_id": "t05",
            "value": 0.805,
            "epoch": 4,
            "replay": "python training/run_experiment.py",
            "test_acc": 0.79,
            "test_loss": 0.6,
        },
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return summary


def test_one_curve_per_trial_that_reported(tmp_path: Path) -> None:
    write_search(tmp_path / "r")
    summary = load_summary(tmp_path / "r")
    curves = load_curves(tmp_path / "r", summary)
    assert plot_curves(summary, curves, tmp_path / "curves.png") == 7  # the trial that never started has none
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_importance_finds_the_hyperparameter_that_decides(tmp_path: Path) -> None:
    summary = write_search(tmp_path / "r")
    scores = importance(summary)
    assert max(scores, key=scores.get) == "optimizer" and scores["optimizer"] > 0.8  # Optuna's fANOVA, seeded
    assert scores["fc1"] < 0.1 and scores["lr"] < 0.2 and sum(scores.values()) == pytest.approx(1)


def test_the_page_ranks_the_trials_and_shows_the_winners_test_accuracy(tmp_path: Path) -> None:
    write_search(tmp_path / "r")
    text = write_report(tmp_path / "r", top=5).read_text()
    assert text.count("<tr>") == 1 + 5  # the header and the top 5 of the 7 trials with a metric
    assert "test_acc <b>0.7900</b>" in text and text.count("data:image/png;base64,") == 4


def test_a_search_that_varied_nothing_gets_its_curves(tmp_path: Path) -> None:
    """Every hyperparameter fixed (e.g. benchmarks/gpu.py's one-configuration searches): the curves, no error."""
    summary = write_search(tmp_path / "r")
    (tmp_path / "r" / "summary.json").write_text(json.dumps({**summary, "space": {}}))
    text = write_report(tmp_path / "r").read_text()
    assert text.count("data:image/png;base64,") == 1 and "curves.png" in text


def test_the_report_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_search(tmp_path / "r")
    assert tune_mlp(["report", str(tmp_path / "r")])["report"] == str(tmp_path / "r" / "report" / "report.html")
    with pytest.raises(SystemExit) as exit_:
        tune_mlp(["report", str(tmp_path / "nothing")])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip().endswith("not a search folder (no summary.json)")


def test_the_console_script_exits_zero_on_success(tmp_path: Path) -> None:
    """Console scripts exit with their function's return value: a returned summary used to make it exit 1."""
    write_search(tmp_path / "r")
    done = subprocess.run(["text-recognizer-search", "report", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(tmp_path / "r" / "report" / "report.html")
