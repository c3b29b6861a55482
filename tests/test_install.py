"""The package as users install it: a built wheel, run outside the repository, finds its shipped configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow  # builds a wheel and runs a smoke search


def test_the_default_search_runs_from_a_wheel_outside_the_repo(tmp_path: Path, fashion_dir: Path) -> None:
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "wheel"),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("text_recognizer-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert {p.name for p in (site / "text_recognizer" / "search" / "configs").glob("*.yaml")} >= {"mlp_asha.yaml", "smoke.yaml"}
    work = tmp_path / "elsewhere"
    work.mkdir()
    code = (
        "import sys, text_recognizer, text_recognizer.facts as facts\n"
        "print('from', text_recognizer.__file__, 'checkout', facts.CHECKOUT)\n"
        "from text_recognizer.cli import tune_mlp\n"
        "tune_mlp(sys.argv[1:])\n"
    )
    flags = ["--smoke-test", f"--data_dir={fashion_dir}", "--name", "s", "--wandb-mode", "disabled", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", code, *flags], cwd=work, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"from {site}" in result.stdout and "checkout None" in result.stdout  # the wheel's code, not the checkout's
    summary = json.loads((work / "logs" / "search" / "s" / "summary.json").read_text())
    assert summary["num_trials"] == 4 and summary["settings"]["path"].startswith(str(site))
    # with no --config, the default is the shipped one: --help names it
    help_text = subprocess.run([sys.executable, "-c", code, "--help"], cwd=work, capture_output=True, text=True, env=env)
    assert "mlp_asha" in help_text.stdout
