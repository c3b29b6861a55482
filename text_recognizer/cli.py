"""Entry points: `run_experiment.py` / text-recognizer-train and `tune_mlp.py` / text-recognizer-search."""

from __future__ import annotations

import atexit
import gc
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from text_recognizer.facts import SEARCH_FILE
from text_recognizer.util import UserError, check_versions, fail

# Registered before W&B, Ray or torch register theirs, so it runs after them, last: the objects left are then never
# collected while the interpreter tears down (with torch and Lightning loaded, that collection took 1.9-2.7 s of each
# search's and run's exit; 0.3 s frozen). Nothing of ours needs a collection at exit: every file is closed by then.
atexit.register(gc.freeze)


def run_experiment(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse run flags, train, test; print test_acc and the best checkpoint. Returns the metrics."""
    from text_recognizer.training import fit_and_test, parse_args

    try:
        check_versions()
        args = parse_args(argv)
        metrics = fit_and_test(args)
    except UserError as error:
        fail(f"run_experiment.py: error: {error}")
    print(f"test_acc={metrics['test_acc']:.4f}")
    print(f"best checkpoint: {metrics['best_model_path']}")
    return metrics


def tune_mlp(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run (or resume) a search, returning the summary written to summary.json; or run one of its commands on a
    search folder (`report FOLDER`, `sync FOLDER`: spec.add_commands)."""
    from text_recognizer.search.spec import build_search_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = build_search_parser().parse_known_args(argv)
    if args.command:
        if rest:
            fail(f"tune_mlp.py {args.command}: error: unrecognized arguments: {' '.join(rest)}")
        return COMMANDS[args.command](args.folder)
    from text_recognizer.search.driver import run_search
    from text_recognizer.search.failfast import EXIT_STATUS, SearchCannotTrain, check_some_trained

    try:
        check_versions()
        summary = run_search(argv)
        check_some_trained(summary)
    except UserError as error:
        fail(f"tune_mlp.py: error: {error}")
    except SearchCannotTrain as error:  # no trial trained: no result, exit 1
        fail(f"tune_mlp.py: error: {error}", status=EXIT_STATUS)
    if summary["interrupted"]:  # the state is saved for --resume
        from text_recognizer.search.preemption import CTRL_C_STATUS, EXIT_STATUS

        raise SystemExit(EXIT_STATUS if summary.get("preempted") else CTRL_C_STATUS)
    return summary


def report(folder: Path) -> dict[str, Any]:
    """`tune_mlp.py report FOLDER`: (re)write FOLDER/report/report.html and its PNGs; prints the page's path."""
    from text_recognizer.search.outputs.report import write_report

    try:
        page = write_report(folder)
    except UserError as error:
        fail(f"tune_mlp.py report: error: {error}")
    print(page)
    return {"report": str(page)}


def sync(folder: Path) -> dict[str, Any]:
    """`tune_mlp.py sync FOLDER`: upload an offline search's W&B runs, then create its W&B sweep from them."""
    from text_recognizer.search.config import SearchConfig
    from text_recognizer.search.tracking.sweep import sync as sync_search

    saved_file = folder / SEARCH_FILE
    if not saved_file.is_file() or not list(folder.glob("wandb/offline-run-*")):
        fail(f"tune_mlp.py sync: error: {folder}: no search with offline W&B runs there")
    saved = json.loads(saved_file.read_text())
    try:
        check_versions()
        sweep_id = sync_search(folder, folder.name, SearchConfig(**saved["config"]), saved["wandb_project"])
    except UserError as error:
        fail(f"tune_mlp.py sync: error: {error}")
    return {"sweep_id": sweep_id}


COMMANDS = {"report": report, "sync": sync}


# Console scripts exit with what their function returns: these return nothing, so success is exit status 0
# (the functions above return their results, for callers in Python).
def train_command() -> None:
    run_experiment()


def search_command() -> None:
    tune_mlp()
