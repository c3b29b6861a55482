"""Every benchmark script still runs: each prints its --help, its imports of the package resolved (a benchmark
runs only by hand or in `make bench*`, so a renamed name in the package breaks it unseen otherwise)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPTS = ["run.py", "quality.py", "chaos.py", "scale.py", "gpu.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_benchmark_script_runs(script: str) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
