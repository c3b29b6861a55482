"""The chaos benchmark's short schedule (benchmarks/chaos.py): a search on a real 2-node cluster survives every fault
kind, once or more, and keeps every promise: trials, W&B runs, checkpoints, the winner's test, no process left."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_the_short_chaos_schedule_loses_nothing(tmp_path: Path) -> None:
    command = [sys.executable, "benchmarks/chaos.py", "--schedule", "short", "--seed", "0", "--folder", str(tmp_path)]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=3000
    )  # minutes on a quiet machine; far more on a loaded one
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "chaos: every invariant held" in done.stdout
    figures = json.loads((tmp_path / "chaos.json").read_text())
    kinds = {"worker_kill", "node_replace", "driver_kill", "driver_term", "checkpoint_truncate"}
    kinds |= set() if "no storage_readonly faults" in done.stdout else {"storage_readonly"}
    assert kinds <= {kind for kind, count in figures["injected"].items() if count > 0}, figures["injected"]
    assert figures["failed"] == [] and figures["trials_in_summary"] == figures["trials"] >= 70 and figures["wall_seconds"] > 0
