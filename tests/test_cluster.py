"""Many nodes: a real 2-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head and a worker node, 1 CPU
each), the package shipped to its workers, trials on both nodes, and a node lost mid-search; and how the driver's W&B
run of a trial fills an epoch that Tune never delivered."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from conftest import FIVE_EPOCHS, ROOT, TRIAL_PROCESSES, finish, results, runs_written_here, summary_of, wait_for

from text_recognizer.search.tracking.wandb_files import offline_runs
from text_recognizer.search.trial import forkserver

# the tests' five-epoch search with longer epochs: the worker node is removed while its trial is half-way
NODE_LOSS = FIVE_EPOCHS.replace("limit_train_batches: 60", "limit_train_batches: 150")
assert NODE_LOSS != FIVE_EPOCHS


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """(the cluster, its worker node): a head and a worker node, 1 CPU each, token authentication on; torn down after,
    not one of their processes left."""
    from ray._raylet import Config
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # for both nodes and for the search that joins them
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    Config.initialize("")  # this process read Ray's config already: read it again, as `ray start` does on turning tokens on
    # the dataset (~220 MB decoded) must fit each node's object store
    node = {"num_cpus": 1, "object_store_memory": 600 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    worker = cluster.add_node(**node)
    cluster.wait_for_nodes()
    nodes = list(cluster.list_all_nodes())
    try:
        yield cluster, worker
    finally:
        cluster.shutdown()
        assert not any(node.any_processes_alive() for node in nodes)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def check_complete(search_dir: Path, epochs: int | None = None) -> dict:
    """A finished search: each trial's Tune results and its W&B run hold every epoch once, in order."""
    summary = summary_of(search_dir)
    assert summary["num_trials"] == 4 and not summary["interrupted"]
    assert set(summary["statuses"]) <= {"completed", "stopped_early"}, summary["statuses"]
    runs = {run.id: run for run in offline_runs(search_dir) if run.job_type == "trial"}
    assert set(runs) == {f"{search_dir.name}-{row['trial_id']}" for row in summary["trials"]}
    for row in summary["trials"]:
        assert epochs is None or row["epochs"] == epochs
        delivered = sorted({r["training_iteration"] for r in results(search_dir)[row["trial_id"]]})
        run = runs[f"{search_dir.name}-{row['trial_id']}"]
        assert [h["epoch"] for h in run.history] == list(range(1, row["epochs"] + 1)), (row["trial_id"], delivered)
        assert run.summary["status"] == row["status"] and run.exit_code == 0
        # where it trained, in its row and its run: the node of its last epoch, its resources
        assert row["node_id"] and row["cpus"] == 1 and row["gpus"] == 0 and row["gpu_ids"] == ""
        where = {key: run.config[key] for key in ("node_id", "node_ip", "cpus", "gpus")}
        assert where == {key: row[key] for key in where}
    csv = pd.read_csv(search_dir / "trials.csv")
    nodes = {row["trial_id"]: row["node_id"] for row in summary["trials"]}
    assert dict(zip(csv["trial_id"], csv["node_id"], strict=True)) == nodes
    return summary


@pytest.mark.slow
@pytest.mark.parametrize("mode", TRIAL_PROCESSES)
def test_trials_run_on_both_nodes_with_the_shipped_package(cluster, tmp_path: Path, launch_search, mode: str) -> None:
    cluster, worker = cluster
    head = cluster.head_node
    began = time.time()
    search = launch_search(tmp_path, "two", None, "--smoke-test", f"--address={cluster.address}", "--trial-process", mode)
    stdout = finish(search, timeout=600)
    wall = time.time() - began
    summary = check_complete(tmp_path / "two")
    per_node = {node["node_id"]: node["trials"] for node in summary["nodes"]}
    assert set(per_node) == {head.node_id, worker.node_id} and sum(per_node.values()) == 4  # both nodes trained
    counts = ", ".join(f"{node['node_ip']} ({node['node_id'][:8]}): {node['trials']}" for node in summary["nodes"])
    assert f"Trials per node: {counts}" in stdout
    reports = [r for rows in results(tmp_path / "two").values() for r in rows]
    # the package the trials ran came with the job (Ray's runtime_resources on each node), not from this checkout
    assert all("runtime_resources" in r["package_dir"] and not r["package_dir"].startswith(str(ROOT)) for r in reports)
    assert {r["node_id"] for r in reports} == {head.node_id, worker.node_id}
    pids = {r["pid"] for r in reports} | {r["trial_pid"] for r in reports}
    if mode == "fork":  # one fork server per node, and the dataset sent to each once
        for node in (head, worker):
            (log,) = forkserver.private_dir().glob(f"fs-{node.node_id[:16]}-*.log")
            servers = re.findall(r" fork server (\d+) on ", log.read_text())
            assert len(servers) == 1 and log.read_text().count(" dataset ") == 1, log.read_text()
            pids.add(int(servers[0]))
    print(f"\n2-node search ({mode}): trials per node {counts}; wall {wall:.1f} s (search {summary['wall_seconds']:.1f} s)")
    cluster.shutdown()
    # torn down: no trial's actor or process, nor a fork server, outlives its node
    wait_for(lambda: not any(alive(pid) for pid in pids), timeout=60)


@pytest.mark.slow
def test_workers_get_the_package_and_settings_from_the_job(cluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """On each node, a task of a job that joined with ray_cluster sees the shipped package and the driver's settings,
    which the nodes' own environment (set when they started) doesn't have."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from text_recognizer.search.cluster import ray_cluster

    cluster, worker = cluster
    monkeypatch.setenv("TEXT_RECOGNIZER_DATA_DIR", str(tmp_path))  # set after the nodes started: only the job has it

    def where() -> tuple[str, str, str | None, str | None]:
        import text_recognizer

        env = os.environ
        return (
            ray.get_runtime_context().get_node_id(),
            text_recognizer.__file__,
            env["WANDB_MODE"],
            env.get("TEXT_RECOGNIZER_DATA_DIR"),
        )

    with ray_cluster(cluster.address):
        task = ray.remote(num_cpus=1)(where)
        on = [NodeAffinitySchedulingStrategy(node.node_id, soft=False) for node in (cluster.head_node, worker)]
        seen = ray.get([task.options(scheduling_strategy=strategy).remote() for strategy in on])
    assert [node for node, *_ in seen] == [cluster.head_node.node_id, worker.node_id]
    for _, module, wandb_mode, data_dir in seen:
        assert "runtime_resources" in module and not module.startswith(str(ROOT))
        assert wandb_mode == "disabled" and os.environ["WANDB_MODE"] == "offline"  # workers never write W&B
        assert data_dir == str(tmp_path)


def trial_on(search_dir: Path, node_id: str) -> tuple[str, list[dict]] | None:
    """A trial that is training on `node_id` and has checkpointed 2 to 4 of its 5 epochs."""
    for trial_id, rows in results(search_dir).items():
        if rows and rows[-1]["node_id"] == node_id and 2 <= len(rows) < 5:
            return trial_id, rows
    return None


@pytest.mark.slow
@pytest.mark.parametrize("mode", TRIAL_PROCESSES)
def test_a_lost_node_s_trial_resumes_on_the_other_node(cluster, tmp_path: Path, launch_search, mode: str) -> None:
    cluster, worker = cluster
    head = cluster.head_node
    search_dir = tmp_path / "lost"
    flags = ["--num-samples", "4", f"--address={cluster.address}", "--trial-process", mode]
    search = launch_search(tmp_path, "lost", NODE_LOSS, *flags)
    wait_for(lambda: trial_on(search_dir, worker.node_id) is not None, timeout=400, poll=0.05)
    trial_id, before = trial_on(search_dir, worker.node_id)
    cluster.remove_node(worker, allow_graceful=False)  # the node dies with its trial half-way
    finish(search, timeout=600)
    summary = check_complete(search_dir, epochs=5)
    assert summary["statuses"] == {"completed": 4} and summary["total_epochs"] == 20
    row = next(r for r in summary["trials"] if r["trial_id"] == trial_id)
    assert row["failures"] == 1 and row["node_id"] == head.node_id  # retried, and ended on the surviving node
    after = results(search_dir)[trial_id]
    retried = [r for r in after if r["node_id"] == head.node_id]
    resumed = retried[0]["training_iteration"]
    # epochs the worker delivered: those seen before the removal, and any that landed while the node went down
    on_worker = [r for r in after if r["node_id"] == worker.node_id]
    assert len(on_worker) >= len(before) >= 2
    # from its newest checkpoint, not from epoch 1: at most the epoch in flight when the node died is trained again
    assert resumed in (len(on_worker), len(on_worker) + 1), (len(before), len(on_worker), resumed)
    assert [h["epoch"] for h in retried[0]["restored_history"]] == list(range(1, resumed))
    assert [r["training_iteration"] for r in retried] == list(range(resumed, 6))
    run = next(run for run in offline_runs(search_dir) if run.id == f"lost-{trial_id}")
    assert run.config["node_id"] == head.node_id
    print(f"\nnode lost ({mode}): trial {trial_id} had {len(on_worker)} epochs on the worker, resumed at {resumed} on the head")


def test_an_epoch_tune_never_delivered_is_filled_from_the_checkpoint_history(tmp_path: Path) -> None:
    """A trial's worker died after Tune kept epoch 3's checkpoint but before its result (seen: results [1, 2, 4, 5]);
    another trial's died after epoch 3's result but before its checkpoint, so it trains epoch 3 again. The driver's
    W&B runs hold every epoch once, the missing one from the history the restored checkpoint carries."""
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    from text_recognizer.search.config import SMOKE_CONFIG, load_config
    from text_recognizer.search.spec import SearchSpec
    from text_recognizer.search.tracking.wandb_logging import WandbTrialCallback

    config = load_config(SMOKE_CONFIG)
    spec = SearchSpec("gap", tmp_path / "gap", config, "offline", "test", cpus_per_trial=None, gpus_per_trial=None)
    spec.folder.mkdir()
    callback = WandbTrialCallback(spec)

    def result(epoch: int, node: str, restored: list[int] = ()) -> dict:
        metrics = {"epoch": epoch, "val_acc": epoch / 10, "node_id": node, "node_ip": "10.0.0.1", "cpus": 1.0, "gpus": 0.0}
        return {**metrics, "training_iteration": epoch, "restored_history": [{"epoch": e, "val_acc": e / 10} for e in restored]}

    lost = [result(1, "a"), result(2, "a"), result(4, "b", [1, 2, 3]), result(5, "b")]
    repeated = [result(1, "a"), result(2, "a"), result(3, "a"), result(3, "b", [1, 2]), result(4, "b"), result(5, "b")]
    for trial_id, delivered in (("lost", lost), ("repeated", repeated)):
        storage = StorageContext(str(tmp_path), "gap", trial_dir_name=f"trial_{trial_id}")
        trial = Trial("train_in_actor", config={"fc1": 16}, trial_id=trial_id, storage=storage, stub=True)
        callback.on_trial_start(0, [], trial)
        for row in delivered:
            callback.on_trial_result(0, [], trial, dict(row))
            trial.update_last_result(row)
        trial.update_last_result({**delivered[-1], "done": True})
        callback.on_trial_complete(0, [], trial)
    runs = {run.id: run for run in runs_written_here(spec.folder)}
    for name in ("gap-lost", "gap-repeated"):
        assert [(h["epoch"], h["_step"], h["val_acc"]) for h in runs[name].history] == [(e, e, e / 10) for e in range(1, 6)]
        assert runs[name].config["node_id"] == "b" and runs[name].summary["epochs_trained"] == 5
        assert runs[name].summary["status"] == "completed" and runs[name].summary["best_val_acc"] == 0.5
