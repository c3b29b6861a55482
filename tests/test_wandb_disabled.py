"""--wandb-mode disabled: W&B is neither imported nor initialised, in the driver or in any Ray worker.

The GPU image this project is checked on has no wandb. These tests put first on PYTHONPATH a `wandb` package that
raises ImportError when imported, as there, and that also writes where it was imported from into a file: an import
that something catches (Ray's W&B integration catches ImportError) still shows up.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError
from pathlib import Path

import pytest
from conftest import ROOT, SCRIPT, TRIAL_PROCESSES

from text_recognizer import util
from text_recognizer.search.tracking.wandb_logging import check_installed
from text_recognizer.util import UserError

NO_WANDB = """import os, traceback
with open(os.environ["NO_WANDB_LOG"], "a") as log:
    log.write("".join(traceback.format_stack()) + "\\n")
raise ImportError("No module named 'wandb' (this test's stand-in for a machine without W&B)")
"""


def without_wandb(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment whose `import wandb` fails (in every process started with it) and logs who tried."""
    (tmp_path / "no_wandb" / "wandb").mkdir(parents=True)
    (tmp_path / "no_wandb" / "wandb" / "__init__.py").write_text(NO_WANDB)
    log = tmp_path / "wandb_imports.log"
    path = os.pathsep.join([str(tmp_path / "no_wandb"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path.rstrip(os.pathsep), "NO_WANDB_LOG": str(log)}
    env.pop("WANDB_MODE", None)
    return env, log


def test_the_stand_in_is_seen(tmp_path: Path) -> None:
    """The check itself works: a plain `import wandb` with that environment fails and is logged."""
    env, log = without_wandb(tmp_path)
    done = subprocess.run([sys.executable, "-c", "import wandb"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1 and "stand-in" in done.stderr
    assert log.is_file()


def test_search_modules_import_without_wandb(tmp_path: Path) -> None:
    """Every module a search imports, in the driver and in its workers, imports without trying W&B."""
    env, log = without_wandb(tmp_path)
    modules = [
        "cli",
        "search.driver",
        "search.trial.tune_actor",
        "search.trial.trial_process",
        "search.trial.forkserver",
        "training",
    ]
    code = "import importlib\n" + "".join(f"importlib.import_module('text_recognizer.{m}')\n" for m in modules)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not log.exists(), log.read_text()[-3000:]


def test_missing_wandb_is_optional_for_the_version_check(monkeypatch: pytest.MonkeyPatch) -> None:
    real = util.version

    def version(package: str) -> str:
        if package in missing:
            raise PackageNotFoundError(package)
        return real(package)

    monkeypatch.setattr(util, "version", version)
    missing = {"wandb"}
    util.check_versions()  # no error: a machine without W&B runs searches with --wandb-mode disabled
    missing = {"ray"}
    with pytest.raises(UserError, match="ray is not installed"):
        util.check_versions()


def test_a_search_that_logs_to_wandb_needs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    check_installed("disabled")
    for mode in ("offline", "online"):
        with pytest.raises(UserError, match=f"--wandb-mode {mode}: W&B .* not installed"):
            check_installed(mode)


@pytest.mark.slow
@pytest.mark.parametrize("trial_process", TRIAL_PROCESSES)
def test_disabled_search_never_imports_wandb(tmp_path: Path, fashion_dir: Path, trial_process: str) -> None:
    """A whole smoke search, with its workers (and fork server), on a machine where `import wandb` fails."""
    env, log = without_wandb(tmp_path)
    command = [sys.executable, str(SCRIPT), "--smoke-test", "--storage-path", str(tmp_path), "--name", "nowandb"]
    command += ["--wandb-mode", "disabled", "--quiet", "--trial-process", trial_process, f"--data_dir={fashion_dir}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not log.exists(), f"something imported wandb:\n{log.read_text()[-3000:]}"
    summary = json.loads((tmp_path / "nowandb" / "summary.json").read_text())
    assert summary["num_trials"] == 4 and summary["best"]["test_acc"] > 0.2
    assert not (tmp_path / "nowandb" / "wandb").exists()
