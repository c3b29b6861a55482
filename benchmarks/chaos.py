"""The chaos benchmark: one search on a real 2-node Ray cluster while faults drawn from a seed hit it; then the
invariants a search promises, checked and printed as figures. Exits 1 if any fails.

    python benchmarks/chaos.py --schedule short            # minutes (CI's slow suite runs it)
    python benchmarks/chaos.py --schedule long             # >= 100 faults over >= 200 trials, on demand
    python benchmarks/chaos.py --schedule short --trial-process fork --seed 7

The search is the real `search/tune_mlp.py` (random search over the smoke space, W&B offline) run as a subprocess
that joins a `ray.cluster_utils.Cluster` (a head and a worker node, 1 CPU each, token auth on). The fault schedule
is drawn from --seed: rerun with the same seed to replay it. Faults, at random times:

- worker_kill: SIGKILL of a running trial's Tune actor (its worker process);
- fork_kill: SIGKILL of a running trial's fork-mode trial process (with --trial-process fork);
- node_replace: the worker node removed (not gracefully), then a new one added;
- driver_kill / driver_term: SIGKILL / SIGTERM of the driver, then `--resume`;
- checkpoint_truncate: the driver SIGKILLed, an unfinished trial's newest checkpoint cut to half its size (as a
  killed copy or a full disk leaves it), then `--resume` (the trial must fall back to an older one, or scratch).

- storage_readonly: the search's folder read-only for 1-4 s (a bind mount of it onto itself, remounted read-only,
  then unmounted: files already open stay writable, as on a real remount). Needs mount rights (root with
  CAP_SYS_ADMIN, as here); without them the kind is left out and the run says so. A chmod would not do: root
  writes through it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["RAY_AUTH_MODE"] = "token"  # before Ray is imported: the cluster and the searches use token auth
TOKEN_FILE = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()  # where Ray looks for one
if not os.environ.get("RAY_AUTH_TOKEN") and not TOKEN_FILE.is_file():
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # a fresh machine has no token: one for this run, its drivers too
os.environ.pop("RAY_ADDRESS", None)

import psutil  # noqa: E402

from text_recognizer.facts import CHECKPOINT_NAME, HISTORY_NAME, TrialStatus  # noqa: E402
from text_recognizer.search.trial import forkserver  # noqa: E402

NAME = "chaos"
# the smoke space (text_recognizer/search/configs/smoke.yaml), random: many small trials of up to 3 epochs
CONFIG = """
metric: val_acc
mode: max
search_alg: random
scheduler: {max_t: 3, grace_period: 1, reduction_factor: 2}
fixed: {data_class: FashionMNIST, limit_train_batches: 5, limit_val_batches: 2}
space:
  fc1: {choice: [16, 32]}
  fc2: {choice: [8, 16]}
  lr: {loguniform: [1.0e-3, 1.0e-2]}
"""
# trials, faults and the seconds of training between two faults (drawn uniformly), per schedule: a tiny trial
# trains in about a second, two at a time, so the faults fall inside the search, not after its end. A driver
# restarted by a fault trains nothing for 20-90 s, and the search goes on some 9 trials a fault: 240 trials ended
# after 27 of 119 faults (2026-12-02), so the long schedule has 1,000 trials for its 120
# after 2026-12-03's cut of a driver's fixed cost (restarts are faster), the actor mode's 70-trial search ended
# before its checkpoint_truncate in 2 of 2 clean-clone runs (baseline 38 s, was 67 s): now 120
# the two long runs of 2026-12-03 landed 53 and 50 faults before their 1,000 trials ended (some 20 trials a fault),
# so the long schedule samples 2,200 for its 100 faults or more, and draws more than it can land
SCHEDULES = {"short": (120, 8, (2.0, 6.0)), "long": (2200, 160, (0.5, 2.5))}
# a fork-mode trial starts and trains faster: its 70-trial search ended before 2 of its 8 faults in 5 of 6 runs
# (2026-12-02), a 120-trial one (with forks found alive) in 1 of 2, so the short schedule samples more for it
FORK_SHORT_TRIALS = 180
RETRY_S = 1.0  # how soon a fault that could not be applied (no trial in reach) is tried again
KEEP = 3  # --keep-checkpoints
MAX_FAILURES = 6  # retries per trial: a trial may be hit by several faults in a row; none must end it in error
TRIAL_FAULTS = ("worker_kill", "fork_kill", "node_replace", "storage_readonly")
DRIVER_FAULTS = ("driver_kill", "driver_term", "checkpoint_truncate")
TUNE_RESTORE_FAILED = "Failed to restore the run state"  # Tune's log line (tune_controller.py) as it starts over
NODE = {"num_cpus": 1, "object_store_memory": 600 * 2**20}  # the dataset (~220 MB decoded) fits each object store


@dataclass
class Chaos:
    """The state of one run: its cluster, driver, folder and the faults done."""

    cluster: Any
    folder: Path
    args: argparse.Namespace
    data_dir: Path
    driver: subprocess.Popen | None = None
    launches: int = 0
    launched: float = 0.0  # when the driver now running started
    injected: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    log: list[str] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)  # every process of the search seen: none may outlive it
    nodes: list[Any] = field(default_factory=list)

    @property
    def search_dir(self) -> Path:
        return self.folder / NAME

    def note(self, line: str) -> None:
        self.log.append(line)
        print(f"  {time.strftime('%T')} {line}", flush=True)


def start_cluster() -> Any:
    from ray._raylet import Config
    from ray.cluster_utils import Cluster

    Config.initialize("")  # read Ray's config again with RAY_AUTH_MODE=token, as `ray start` does
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    return cluster


def worker_node(cluster: Any) -> Any:
    return next(iter(cluster.worker_nodes))


def launch(chaos: Chaos, resume: bool) -> None:
    """Start the driver, `search/tune_mlp.py`, as a user would (a new search or --resume); its output to a log file."""
    args = chaos.args
    common = ["--name", NAME, "--storage-path", str(chaos.folder), f"--address={chaos.cluster.address}", "--quiet"]
    common += ["--keep-checkpoints", str(KEEP), "--max-failures", str(MAX_FAILURES)]
    if resume:
        flags = ["--resume"]
    else:
        (chaos.folder / "chaos.yaml").write_text(f"{CONFIG}seed: {args.seed}\n")  # the sampler's seed
        flags = ["--config", str(chaos.folder / "chaos.yaml"), "--num-samples", str(args.trials), "--wandb-mode", "offline"]
        flags += ["--trial-process", args.trial_process, f"--data_dir={chaos.data_dir}"]
    chaos.launches, chaos.launched = chaos.launches + 1, time.time()
    out = open(chaos.folder / f"driver-{chaos.launches}.log", "w")  # closed with the process
    command = [sys.executable, str(ROOT / "search" / "tune_mlp.py"), *common, *flags]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    chaos.driver = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, text=True)
    chaos.pids.add(chaos.driver.pid)


def lines(path: Path) -> list[dict]:
    """A result.json's complete lines (the driver may be writing the last one)."""
    try:
        text = path.read_text()
    except OSError:
        return []
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


# result.json rows by path, with the size they were read at; a file is read again once it grows. The fault loop
# polls every trial 5 times a second: reading 1,000 trials' files took 68 ms a poll, a third of a core that the
# search needs (12 ms a poll this way)
_READ: dict[Path, tuple[int, list[dict]]] = {}
# when a trial's result.json last grew (its mtime). Once a node is replaced, Tune's actor reuse can keep one warm actor busy
# and start the other node's over and over: its trials train 3 epochs in under a second, their rows land together,
# and a row without `done` was seen in no poll for 8 minutes (the long run of 2026-12-03, no fault landed then)
_GREW = [0.0]
TRAINING_WINDOW_S = 2.0  # rows written this recently: the search is training
TRIAL_ACTOR = "ray::ResourceTrainable"  # the process title of Tune's trial actors (function trainables)


def results(search_dir: Path) -> dict[str, list[dict]]:
    found = {}
    for folder in search_dir.glob("trial_*"):
        path = folder / "result.json"
        try:
            stat = path.stat()
        except OSError:
            continue
        if path not in _READ or _READ[path][0] != stat.st_size:
            _READ[path], _GREW[0] = (stat.st_size, lines(path)), max(_GREW[0], stat.st_mtime)
        found[path.parent.name.removeprefix("trial_")] = _READ[path][1]
    return found


def running_trials(chaos: Chaos, key: str = "pid") -> list[dict]:
    """The last result of each trial that is training now: its last epoch not done and its process alive, the
    actor's (key pid: in fork mode the trial's own process, trial_pid, lives a second or two and is long gone when
    storage has its rows; the actor may have been handed to the next trial since) or its fork's (trial_pid)."""
    found = []
    for rows in results(chaos.search_dir).values():
        if rows and not rows[-1].get("done"):
            chaos.pids.update(r for r in (rows[-1].get("pid"), rows[-1].get("trial_pid")) if r)
            if rows[-1].get(key) and psutil.pid_exists(rows[-1][key]):
                found.append(rows[-1])
    return found


def trial_actors() -> list[psutil.Process]:
    """Tune's live trial actors on the cluster's nodes (all on this machine), by process title."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if (process.info["cmdline"] or [""])[0].startswith(TRIAL_ACTOR):
            found.append(process)
    return sorted(found, key=lambda process: process.pid)


def kill_actor(chaos: Chaos, rng: random.Random) -> bool:
    """SIGKILL a live trial actor of the search: it trains a trial, or is starting or handed one."""
    if not (actors := trial_actors()):
        return False
    actor = rng.choice(actors)
    try:
        actor.kill()
    except psutil.NoSuchProcess:
        return False
    chaos.pids.add(actor.pid)
    chaos.note(f"SIGKILL trial actor {actor.pid} (no trial row in training seen)")
    return True


def kill_trial(chaos: Chaos, rng: random.Random, key: str) -> bool:
    """SIGKILL a running trial's actor (key pid) or its fork (trial_pid). With no row of a trial in training (its
    epochs come faster than the polls), a live trial actor instead (kill_actor)."""
    trials = running_trials(chaos, key)
    if not trials:
        return key == "pid" and kill_actor(chaos, rng)
    row = rng.choice(sorted(trials, key=lambda r: r["trial_id"]))
    try:
        os.kill(row[key], signal.SIGKILL)
    except ProcessLookupError:
        return False
    chaos.note(f"SIGKILL {key} {row[key]} of trial {row['trial_id']} at epoch {row['training_iteration']}")
    return True


FORK_SERVER = forkserver.__name__  # its command line: python -m FORK_SERVER socket ...


def kill_fork(chaos: Chaos, rng: random.Random, within: float = 15.0) -> bool:
    """SIGKILL a live fork-mode trial process, a child of a node's fork server, waiting up to `within` seconds for
    one: a tiny trial's fork lives a second or two, mostly gone by the time storage has its rows (kill_trial's way)."""
    deadline = time.time() + within
    while time.time() < deadline and chaos.driver.poll() is None:
        servers = [p for p in psutil.process_iter(["cmdline"]) if FORK_SERVER in (p.info["cmdline"] or [])]
        server_pids = {p.pid for p in servers}
        forks = sorted((p for p in servers if p.ppid() in server_pids), key=lambda p: p.pid)
        if forks:
            fork = rng.choice(forks)
            try:
                fork.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                continue
            chaos.pids.add(fork.pid)
            chaos.note(f"SIGKILL trial_pid {fork.pid}, a fork of the fork server {fork.ppid()}")
            return True
        time.sleep(0.05)
    return False


def replace_node(chaos: Chaos) -> bool:
    node = worker_node(chaos.cluster)
    chaos.cluster.remove_node(node, allow_graceful=False)
    chaos.cluster.add_node(**NODE)
    chaos.cluster.wait_for_nodes()
    chaos.nodes.append(worker_node(chaos.cluster))
    chaos.note(f"worker node {node.node_id[:8]} removed, {worker_node(chaos.cluster).node_id[:8]} added")
    return True


def stop_driver(chaos: Chaos, sig: int) -> None:
    driver = chaos.driver
    driver.send_signal(sig)
    code = driver.wait(timeout=300)
    chaos.note(f"driver {driver.pid} sent {signal.Signals(sig).name}: exit {code}")
    expected = {signal.SIGKILL: -signal.SIGKILL, signal.SIGTERM: 143}[sig]
    if code not in (expected, 0):  # 0: it had just finished
        raise SystemExit(f"the driver exited {code} on {signal.Signals(sig).name}; see {chaos.folder}")


def truncate_newest(chaos: Chaos, rng: random.Random) -> bool:
    """With the driver down: an unfinished trial's newest checkpoint, the one Tune restores it from, cut in half."""
    candidates = []
    for trial_id, rows in sorted(results(chaos.search_dir).items()):
        # its newest whole one on storage, also one newer than Tune's state knew of (checkpoints.repair_tracked)
        folders = sorted((chaos.search_dir / f"trial_{trial_id}").glob("checkpoint_*"))
        whole = [f / CHECKPOINT_NAME for f in folders if (f / CHECKPOINT_NAME).is_file() and (f / HISTORY_NAME).is_file()]
        if rows and not rows[-1].get("done") and whole:
            candidates.append(whole[-1])
    if not candidates:
        return False
    model = rng.choice(candidates)
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    chaos.note(f"truncated {model.relative_to(chaos.search_dir)}")
    return True


def ready(chaos: Chaos) -> bool:
    """The driver has trials running, or wrote a trial's row within TRAINING_WINDOW_S since it started: a fault now
    hits a search in progress, not a driver still starting (a read-only folder then stops it: see docs)."""
    recent = _GREW[0] > chaos.launched and time.time() - _GREW[0] < TRAINING_WINDOW_S
    return bool(running_trials(chaos)) or recent


def inject(chaos: Chaos, rng: random.Random, kind: str) -> bool:
    """Apply one fault; False when it can't be applied now (no trial running, say)."""
    if kind == "worker_kill":
        return kill_trial(chaos, rng, "pid")
    if kind == "fork_kill":
        return kill_trial(chaos, rng, "trial_pid") or kill_fork(chaos, rng)
    if kind == "node_replace":
        return replace_node(chaos)
    if kind == "storage_readonly":
        return storage_readonly(chaos, rng)
    if kind == "checkpoint_truncate" and not any(
        rows and not rows[-1].get("done") and any(r.get("checkpoint_dir_name") for r in rows)
        for rows in results(chaos.search_dir).values()
    ):
        return False
    stop_driver(chaos, signal.SIGTERM if kind == "driver_term" else signal.SIGKILL)
    if kind == "checkpoint_truncate" and not truncate_newest(chaos, rng):
        chaos.note("no unfinished trial with a checkpoint once the driver stopped: a plain driver kill")
        chaos.injected["driver_kill"] += 1
        launch(chaos, resume=True)
        return False
    launch(chaos, resume=True)
    return True


def can_mount() -> bool:
    """Whether this process may bind-mount a folder and remount it read-only (and undo it)."""
    folder = Path(tempfile.mkdtemp(prefix="chaos-mount-"))
    try:
        return mount_readonly(folder) and unmount(folder)
    finally:
        folder.rmdir()


def mount_readonly(folder: Path) -> bool:
    done = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if done.returncode != 0:
        return False
    if subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True).returncode != 0:
        unmount(folder)
        return False
    return True


def unmount(folder: Path) -> bool:
    """Undo the bind mount; lazily when a process still has a file open under it ("target is busy"). A test run's
    folder was found still bind-mounted over itself (read-write) after it ended; the cause was not seen."""
    for command in (["umount", str(folder)], ["umount", "--lazy", str(folder)]):
        if subprocess.run(command, capture_output=True).returncode == 0:
            return True
    return False


def storage_readonly(chaos: Chaos, rng: random.Random) -> bool:
    seconds = rng.uniform(1.0, 4.0)
    if not mount_readonly(chaos.search_dir):
        return False
    try:
        time.sleep(seconds)
    finally:
        if not unmount(chaos.search_dir):
            raise SystemExit(f"could not unmount the read-only {chaos.search_dir}: umount it by hand")
    chaos.note(f"storage read-only for {seconds:.1f} s")
    return True


def fault_kinds(mode: str, mount: bool) -> list[str]:
    kinds = [k for k in (*TRIAL_FAULTS, *DRIVER_FAULTS) if mode == "fork" or k != "fork_kill"]
    return [k for k in kinds if mount or k != "storage_readonly"]


def schedule(seed: int, faults: int, kinds: list[str], gaps: tuple[float, float]) -> list[tuple[float, str]]:
    """The faults, each with its delay in seconds after the one before; the same seed gives the same schedule.
    Every kind comes once, in a random order, before any comes again: a schedule of that many faults has them all."""
    rng = random.Random(seed)
    first = rng.sample(kinds, len(kinds))[:faults]
    drawn = first + [rng.choice(kinds) for _ in range(faults - len(first))]
    return [(rng.uniform(*gaps), kind) for kind in drawn]


def land(chaos: Chaos, rng: random.Random, kind: str, deadline: float) -> bool:
    """Inject the fault once its delay is over and the search trains (a fault hits a search in progress). One that
    can't be applied then is tried again RETRY_S later, until the search ends (seen in CI: the short schedule's
    only checkpoint_truncate found no unfinished trial with a checkpoint, and the run failed for it)."""
    while chaos.driver.poll() is None:
        if time.time() >= deadline and ready(chaos):
            if inject(chaos, rng, kind):
                return True
            deadline = time.time() + RETRY_S
        time.sleep(0.2)
    return False


def run_search(chaos: Chaos, faults: list[tuple[float, str]]) -> float:
    """The search from its first launch to its last driver's exit, with the faults; returns the wall seconds."""
    rng = random.Random(chaos.args.seed + 1)
    began = time.time()
    launch(chaos, resume=False)
    for delay, kind in faults:
        if land(chaos, rng, kind, time.time() + delay):
            chaos.injected[kind] += 1
        else:  # the search ended first
            chaos.skipped[kind] += 1
    code = chaos.driver.wait(timeout=3600)
    wall = time.time() - began
    if code != 0:
        raise SystemExit(f"the last driver exited {code}; its log: {chaos.folder / f'driver-{chaos.launches}.log'}")
    return wall


# --- the invariants -------------------------------------------------------------------------------------------------


class Checks:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, ok: bool, figure: str) -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {figure}", flush=True)
        if not ok:
            self.failed.append(figure)


def check_trials(checks: Checks, search_dir: Path, trials: int, baseline: list[dict] | None) -> dict:
    import pandas as pd

    summary = json.loads((search_dir / "summary.json").read_text())
    rows = summary["trials"]
    ids = [row["trial_id"] for row in rows]
    statuses = Counter(row["status"] for row in rows)
    folders = sorted(p.name.removeprefix("trial_") for p in search_dir.glob("trial_*") if p.is_dir())
    csv = pd.read_csv(search_dir / "trials.csv")
    checks.check(
        len(rows) == trials and len(set(ids)) == trials and sorted(ids) == folders,
        f"trials: {len(rows)} in summary.json of {trials} sampled, {len(set(ids))} distinct ids, {len(folders)} trial folders",
    )
    checks.check(sorted(csv["trial_id"].astype(str)) == sorted(ids), f"trials.csv: {len(csv)} rows, the same ids")
    checks.check(
        not summary["interrupted"] and set(statuses) <= TrialStatus.FINAL - {TrialStatus.ERROR},
        f"final statuses {dict(statuses)} (none error, interrupted or pending)",
    )
    if baseline is not None:  # the same seed samples the same configs: each once, none lost, none sampled again
        key = lambda config: json.dumps(config, sort_keys=True)  # noqa: E731
        same = Counter(key(row["config"]) for row in rows) == Counter(key(row["config"]) for row in baseline)
        checks.check(same, "configs: the fault-free run's sampled configs, each exactly once")
    return summary


def check_restores(checks: Checks, chaos: Chaos) -> None:
    """Every --resume restored Tune's saved state: when Tune can't read it, it logs this line and starts the search
    again from nothing under the same name (seen: a set of state files cut short by a driver killed as it copied)."""
    failed = [log.name for log in sorted(chaos.folder.glob("driver-*.log")) if TUNE_RESTORE_FAILED in log.read_text()]
    checks.check(not failed, f"every resumed driver restored the saved state: {len(failed)} started over {failed[:3]}")


def check_wandb(checks: Checks, search_dir: Path, summary: dict) -> None:
    from text_recognizer.search.tracking.wandb_files import offline_runs

    runs = [run for run in offline_runs(search_dir) if run.job_type == "trial"]
    by_id = Counter(run.id for run in runs)
    rows = {f"{NAME}-{row['trial_id']}": row for row in summary["trials"]}
    checks.check(
        set(by_id) == set(rows) and max(by_id.values()) == 1,
        f"W&B: {len(runs)} trial runs for {len(rows)} trials, {sum(n > 1 for n in by_id.values())} ids twice",
    )
    gaps = [run.id for run in runs if [h["epoch"] for h in run.history] != list(range(1, len(run.history) + 1))]
    short = [run.id for run in runs if run.id in rows and len(run.history) != rows[run.id]["epochs"]]
    checks.check(
        not gaps and not short,
        f"W&B: epochs contiguous from 1, once each: {len(gaps)} runs with a gap or repeat, "
        f"{len(short)} with other epochs than the trial's",
    )
    unended = [run.id for run in runs if run.exit_code is None]
    wrong = [run.id for run in runs if run.id in rows and run.summary.get("status") != rows[run.id]["status"]]
    checks.check(not unended and not wrong, f"W&B: {len(unended)} runs without an exit record, {len(wrong)} with another status")
    superseded = len(list((search_dir / "wandb" / "superseded").glob("offline-run-*")))
    print(f"  W&B: {superseded} runs of killed drivers kept aside in wandb/superseded/ (never synced)")


def check_checkpoints(checks: Checks, search_dir: Path, summary: dict) -> None:
    import torch

    from text_recognizer.predict import load_model

    kept, best = summary["checkpoints_kept"] or [], summary["best"]
    ended = [row for row in summary["trials"] if row["status"] in {TrialStatus.COMPLETED, TrialStatus.STOPPED_EARLY}]
    folders = {row["trial_id"]: sorted((search_dir / f"trial_{row['trial_id']}").glob("checkpoint_*")) for row in ended}
    extra = [t for t, found in folders.items() if t not in kept and found]
    bad = [t for t in kept if len(folders.get(t, [])) != 1]
    checks.check(
        len(kept) == min(KEEP, len(ended)) and best and best["trial_id"] in kept and not extra and not bad,
        f"checkpoints: {len(kept)} trials kept (--keep-checkpoints {KEEP}), winner among them; "
        f"{len(extra)} other ended trials with a checkpoint left, {len(bad)} kept ones not exactly one folder",
    )
    try:
        state = torch.load(best["checkpoint"], weights_only=True)
        model, _ = load_model(Path(best["checkpoint"]))
        loads = sum(p.numel() for p in model.parameters()) > 0 and "optimizer_states" not in state
    except Exception as error:  # reported as the invariant's failure
        print(f"  the winner's checkpoint does not load: {error}")
        loads = False
    checks.check(loads, f"the winner's checkpoint loads, weights only: {best['checkpoint']}")


def check_winner_test(checks: Checks, summary: dict, folder: Path) -> None:
    best = summary["best"]
    replay = shlex.split(best["replay"])[2:]
    command = [sys.executable, "training/run_experiment.py", *replay, f"--load_checkpoint={best['checkpoint']}"]
    command += ["--limit_train_batches=0", f"--log_dir={folder / 'replay'}"]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "offline"}
    )
    found = re.search(r"test_acc=([0-9.]+)", done.stdout)
    again = float(found.group(1)) if found else None
    checks.check(
        again is not None and f"{again:.4f}" == f"{best['test_acc']:.4f}",
        f"winner {best['trial_id']}: test_acc {best['test_acc']:.4f} in the search, {again} by run_experiment.py",
    )


def fork_server_pids(node_ids: list[str]) -> set[int]:
    from text_recognizer.search.trial import forkserver

    pids = set()
    for node_id in node_ids:
        for log in forkserver.private_dir().glob(f"fs-{node_id[:16]}-*.log"):
            pids.update(int(pid) for pid in re.findall(r" fork server (\d+) on ", log.read_text()))
    return pids


def search_pids(chaos: Chaos, began: float) -> set[int]:
    """Every process the search had: drivers, nodes, actors, trial processes, fork servers (started after `began`)."""
    pids = set(chaos.pids)
    for rows in results(chaos.search_dir).values():
        pids.update(p for r in rows for p in (r.get("pid"), r.get("trial_pid")) if p)
    for node in chaos.nodes:
        pids.update(p.process.pid for procs in node.all_processes.values() for p in procs)
    pids |= fork_server_pids([node.node_id for node in chaos.nodes])
    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).create_time() >= began - 1:  # not a newer process that reuses the id
                alive.add(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def check_processes(checks: Checks, chaos: Chaos, began: float) -> None:
    chaos.cluster.shutdown()
    deadline = time.time() + 60
    while (
        left := search_pids(chaos, began) | {c.pid for c in psutil.Process().children(recursive=True)}
    ) and time.time() < deadline:
        time.sleep(1)
    names = []
    for pid in sorted(left):
        try:
            names.append(f"{pid} {' '.join(psutil.Process(pid).cmdline())[:80]}")
        except psutil.NoSuchProcess:
            pass
    checks.check(not names, f"processes left after the cluster's shutdown: {len(names)} {names[:5]}")


# --- the run --------------------------------------------------------------------------------------------------------


def one_search(args: argparse.Namespace, folder: Path, data_dir: Path, faults: list[tuple[float, str]]) -> tuple[Chaos, float]:
    cluster = start_cluster()
    chaos = Chaos(cluster, folder, args, data_dir, nodes=[cluster.head_node, worker_node(cluster)])
    try:
        wall = run_search(chaos, faults)
    except BaseException:
        if chaos.driver and chaos.driver.poll() is None:
            chaos.driver.kill()
        cluster.shutdown()
        raise
    return chaos, wall


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedule", choices=SCHEDULES, default="short")
    parser.add_argument("--seed", type=int, default=0, help="draws the configs and the fault schedule: replay with it")
    parser.add_argument("--trial-process", choices=("actor", "fork"), default="actor")
    parser.add_argument("--trials", type=int, default=None, help="trials to sample (default: the schedule's)")
    parser.add_argument("--faults", type=int, default=None, help="faults to inject (default: the schedule's)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the fault-free run of the same seed")
    parser.add_argument("--folder", type=Path, default=None, help="where the searches go (default: a temporary folder)")
    args = parser.parse_args(argv)
    trials, faults, args.gaps = SCHEDULES[args.schedule]
    trials = FORK_SHORT_TRIALS if args.schedule == "short" and args.trial_process == "fork" else trials
    args.trials, args.faults = args.trials or trials, args.faults if args.faults is not None else faults
    args.faults -= args.trial_process == "actor" and args.faults == faults  # no fork_kill without forks
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from text_recognizer.data.raw_files import FashionMNISTFiles

    root = args.folder or Path(tempfile.mkdtemp(prefix="chaos-"))
    data_dir = root / "data"
    FashionMNISTFiles.ensure_raw_files(data_dir)
    mount = can_mount()
    if not mount:
        print("chaos: no storage_readonly faults: this process can't bind-mount a folder read-only (needs CAP_SYS_ADMIN)")
    faults = schedule(args.seed, args.faults, fault_kinds(args.trial_process, mount), args.gaps)
    print(
        f"chaos: seed {args.seed}, {args.trials} trials, {len(faults)} faults "
        f"({dict(Counter(k for _, k in faults))}), --trial-process {args.trial_process}, in {root}",
        flush=True,
    )
    baseline_rows, baseline_wall, checks = None, None, Checks()
    if not args.no_baseline:
        print("fault-free run of the same seed:", flush=True)
        (root / "baseline").mkdir(parents=True, exist_ok=True)
        quiet, baseline_wall = one_search(args, root / "baseline", data_dir, [])
        quiet.cluster.shutdown()
        baseline_rows = json.loads((quiet.search_dir / "summary.json").read_text())["trials"]
        print(f"  {len(baseline_rows)} trials in {baseline_wall:.0f} s", flush=True)
    print("the run with faults:", flush=True)
    (root / "chaos").mkdir(parents=True, exist_ok=True)
    began = time.time()
    chaos, wall = one_search(args, root / "chaos", data_dir, faults)
    print("invariants:", flush=True)
    injected = ", ".join(f"{k} {chaos.injected[k]}" for k in (*TRIAL_FAULTS, *DRIVER_FAULTS) if chaos.injected[k])
    skipped = sum(chaos.skipped.values())
    print(f"  faults injected: {sum(chaos.injected.values())} ({injected}); {skipped} not injected {dict(chaos.skipped)}")
    missing = [kind for kind in dict.fromkeys(kind for _, kind in faults) if not chaos.injected[kind]]
    checks.check(not missing, f"every kind scheduled was injected ({missing or 'none'} missing); {chaos.launches} drivers")
    check_restores(checks, chaos)
    summary = check_trials(checks, chaos.search_dir, args.trials, baseline_rows)
    check_wandb(checks, chaos.search_dir, summary)
    check_checkpoints(checks, chaos.search_dir, summary)
    check_winner_test(checks, summary, root)
    check_processes(checks, chaos, began)
    ratio = f", {wall / baseline_wall:.2f}x the fault-free run's {baseline_wall:.0f} s" if baseline_wall else ""
    print(f"  driver wall: {wall:.0f} s with {sum(chaos.injected.values())} faults{ratio}")
    epochs = summary["total_epochs"]
    print(f"  {summary['num_trials']} trials, {epochs} epochs, statuses {summary['statuses']}")
    (root / "chaos.json").write_text(
        json.dumps(
            {
                "seed": args.seed,
                "schedule": args.schedule,
                "trial_process": args.trial_process,
                "trials": args.trials,
                "trials_in_summary": summary["num_trials"],
                "injected": dict(chaos.injected),
                "skipped": dict(chaos.skipped),
                "wall_seconds": wall,
                "baseline_wall_seconds": baseline_wall,
                "failed": checks.failed,
                "log": chaos.log,
            },
            indent=2,
        )
    )
    print(f"chaos: {'FAILED: ' + '; '.join(checks.failed) if checks.failed else 'every invariant held'} ({root / 'chaos.json'})")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
