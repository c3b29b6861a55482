"""The search driver: check everything, start (or join) Ray, run ASHA over the trials, write the results."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from text_recognizer.data import DATA_CLASSES
from text_recognizer.search.config import DEFAULT_CONFIG, SearchConfig, load_config
from text_recognizer.search.results import TrialClock, print_report, write_results
from text_recognizer.training import DATA_CLASS, build_parser, default_wandb_mode
from text_recognizer.util import Parser, UserError

STORAGE_PATH = Path("logs") / "search"
WANDB_PROJECT = "text-recognizer"
TRIALS_PER_GPU = 4  # small models leave most of a GPU idle: pack four trials onto each one
MAX_FAILURES = 2  # retries of a trial whose worker died, each from its newest checkpoint
SEARCH_FILE = "search.json"  # the resolved config of a search, so --resume needs nothing else
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
SMOKE = {"num_samples": 4, "max_t": 2, "limit_train_batches": 5, "limit_val_batches": 2}


def build_search_parser() -> Parser:
    """The search's own flags; any other --flag=value is a run flag fixed for every trial."""
    parser = Parser(
        prog="tune_mlp.py",
        description="Random search with ASHA early stopping over run_experiment.py flags, on a Ray cluster, "
        "with every trial logged to W&B. Run flags given here (e.g. --data_class=FashionMNIST) are fixed "
        "for every trial and win over the config.",
    )
    add = parser.add_argument
    add("--num-samples", type=int, default=None, help="trials to sample (default: the config's num_samples)")
    add(
        "--config",
        type=Path,
        default=None,
        help="search config YAML (default experiments/mlp_asha.yaml)",
    )
    add(
        "--name",
        default=None,
        help="search name: its folder under --storage-path and its W&B group (default: config name + time)",
    )
    add(
        "--storage-path",
        type=Path,
        default=STORAGE_PATH,
        help=f"folder for searches; shared storage on a cluster (default {STORAGE_PATH})",
    )
    add(
        "--cpus-per-trial",
        type=float,
        default=None,
        help="CPUs per trial, also its torch threads (default 1, or CPUs/(GPUs*4) with GPUs)",
    )
    add(
        "--gpus-per-trial",
        type=float,
        default=None,
        help=f"GPUs per trial; fractions pack trials on a GPU (default 1/{TRIALS_PER_GPU} with GPUs, else 0)",
    )
    add("--max-concurrent", type=int, default=None, help="most trials running at once (default: as many as resources allow)")
    add(
        "--max-failures",
        type=int,
        default=MAX_FAILURES,
        help=f"retries of a failed trial from its checkpoint (default {MAX_FAILURES})",
    )
    add("--address", default=None, help="join this Ray cluster (default: $RAY_ADDRESS, else start a local one)")
    add("--resume", action="store_true", help="continue the search --name after a crash or Ctrl-C")
    add("--overwrite", action="store_true", help="delete an existing search of the same --name and start over")
    add("--wandb-project", default=WANDB_PROJECT, help=f"W&B project (default {WANDB_PROJECT})")
    add(
        "--wandb-mode",
        choices=("online", "offline", "disabled"),
        default=None,
        help="default: online with W&B credentials, else offline (runs land in the search folder)",
    )
    add("--smoke-test", action="store_true", help="a seconds-long search: 4 samples, 2 epochs, 5 batches each")
    add("--top", type=int, default=5, help="trials shown in the final table (default 5)")
    add("--quiet", action="store_true", help="no Tune progress tables")
    return parser


def parse_run_overrides(flags: list[str]) -> dict[str, Any]:
    """Run flags given on the search command line, as {flag: value} of exactly those given."""
    if not flags:
        return {}
    parser = build_parser(flags, prog="tune_mlp.py")
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # keep only what the user typed
    return vars(parser.parse_args(flags))


def _check_name(name: str) -> None:
    if not NAME_PATTERN.match(name) or ".." in name:
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only (no path separators or '..')")


def _check_storage(storage: Path) -> Path:
    """The resolved storage path; UserError unless it is, or can be made, a writable folder (made later)."""
    storage = storage.expanduser().resolve()
    existing = next(path for path in (storage, *storage.parents) if path.exists())
    if not existing.is_dir():
        raise UserError(f"--storage-path {storage}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--storage-path {storage}: {existing} is not writable")
    return storage


def prepare(argv: Sequence[str] | None) -> tuple[argparse.Namespace, SearchConfig, Path]:
    """Every check that needs no Ray and no data: flags, names, folders, the config. Raises UserError."""
    args, rest = build_search_parser().parse_known_args(argv)
    unknown = [flag for flag in rest if not flag.startswith("--")]
    if unknown:
        raise UserError(f"unexpected argument {unknown[0]!r}")
    overrides = parse_run_overrides(rest)
    if args.num_samples is not None and args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    for flag in ("cpus_per_trial", "gpus_per_trial"):
        value = getattr(args, flag)
        if value is not None and (value < 0 or flag == "cpus_per_trial" and value == 0):
            raise UserError(f"--{flag.replace('_', '-')} must be {'> 0' if flag == 'cpus_per_trial' else '>= 0'}, got {value}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise UserError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    address = args.address or os.environ.get("RAY_ADDRESS")
    local_cluster = not address
    if local_cluster and os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        raise UserError("RAY_AUTH_MODE=disabled: the local Ray cluster always keeps token authentication on; unset it")
    if address and address != "auto" and "://" not in address:
        _check_reachable(address)
    if local_cluster and not _ray_running():
        check_trial_fits(args, local_resources())  # refuse before the data is read and Ray starts
    storage = _check_storage(args.storage_path)

    if args.resume:
        if not args.name:
            raise UserError("--resume needs the --name of the search to continue")
        _check_name(args.name)
        given = {
            "--config": args.config,
            "--num-samples": args.num_samples is not None,
            "--smoke-test": args.smoke_test,
            "--overwrite": args.overwrite,
            "--wandb-mode": args.wandb_mode,
            "--wandb-project": args.wandb_project != WANDB_PROJECT,
        }
        changes = [flag for flag, value in given.items() if value] + [f"--{key}" for key in overrides]
        if changes:
            raise UserError(
                f"--resume continues the search as it was saved and can't change {', '.join(changes)}: "
                "drop them, or start a new search under another --name"
            )
        search_dir = storage / args.name
        if not (search_dir / SEARCH_FILE).is_file() or not (search_dir / "tuner.pkl").is_file():
            raise UserError(f"--resume: no search named {args.name!r} in {storage}")
        saved = json.loads((search_dir / SEARCH_FILE).read_text())
        config = SearchConfig(**saved["config"])
        args.wandb_mode, args.wandb_project = saved["wandb_mode"], saved["wandb_project"]
        return args, config, search_dir

    config = load_config(args.config or DEFAULT_CONFIG, overrides)
    if args.smoke_test:
        config.num_samples, config.max_t = SMOKE["num_samples"], min(config.max_t, SMOKE["max_t"])
        config.grace_period = min(config.grace_period, config.max_t)
        for key in ("limit_train_batches", "limit_val_batches"):
            config.fixed.setdefault(key, SMOKE[key])
    if args.num_samples is not None:
        config.num_samples = args.num_samples
    args.name = args.name or f"{Path(config.path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    _check_name(args.name)
    search_dir = storage / args.name
    if search_dir.exists():
        if not args.overwrite:
            raise UserError(
                f"a search named {args.name!r} exists in {storage}: continue it with --resume, "
                "pick another --name, or start over with --overwrite"
            )
    args.wandb_mode = args.wandb_mode or default_wandb_mode()
    return args, config, search_dir


def _ray_running() -> bool:
    """Whether this process is already connected to Ray (e.g. a test or notebook started it)."""
    import ray

    return ray.is_initialized()


def _check_reachable(address: str) -> None:
    """UserError unless something listens at host:port (ray.init would retry a dead address for minutes)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except (OSError, ValueError) as error:
        raise UserError(f"--address {address}: no Ray cluster answers there ({error})") from None


def start_ray(address: str | None) -> bool:
    """Join the cluster at `address` / $RAY_ADDRESS, or start a quiet local one without a dashboard.

    Returns whether this call started Ray (and so should shut it down).
    """
    import ray

    if ray.is_initialized():
        return False
    # Ray's token authentication stays on: we never pass anything that turns it off. ray.init says at
    # every start that it is on, one line of noise in every search: keep that logger quiet.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    address = address or os.environ.get("RAY_ADDRESS")
    if address and "RAY_AUTH_MODE" not in os.environ:
        # a cluster started with `ray start` has a token in ~/.ray/auth_token: present it when joining
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise UserError(f"cannot join the Ray cluster at {address}: {str(error).splitlines()[0]}") from None
    return True


def trial_resources(args: argparse.Namespace) -> tuple[float, float]:
    """CPUs and GPUs per trial on the running cluster: the flags, else the default."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    return check_trial_fits(args, nodes)


def local_resources() -> list[dict[str, float]]:
    """The one node a local cluster will have: this machine's CPUs and GPUs."""
    import torch

    return [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]


def check_trial_fits(args: argparse.Namespace, nodes: list[dict[str, float]]) -> tuple[float, float]:
    """CPUs and GPUs per trial (flags, else defaults); UserError when no node can hold one trial."""
    total_cpus = sum(node.get("CPU", 0) for node in nodes)
    total_gpus = sum(node.get("GPU", 0) for node in nodes)
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else (1 / TRIALS_PER_GPU if total_gpus else 0.0)
    cpus = args.cpus_per_trial
    if cpus is None:
        cpus = max(1.0, float(int(total_cpus // (total_gpus * TRIALS_PER_GPU)))) if gpus and total_gpus else 1.0
    if not any(node.get("CPU", 0) >= cpus and node.get("GPU", 0) >= gpus for node in nodes):
        most_cpus = max(node.get("CPU", 0) for node in nodes)
        most_gpus = max(node.get("GPU", 0) for node in nodes)
        raise UserError(
            f"a trial asks for {cpus:g} CPUs and {gpus:g} GPUs, but the largest node of the cluster "
            f"has {most_cpus:g} CPUs and {most_gpus:g} GPUs: lower --cpus-per-trial/--gpus-per-trial"
        )
    return cpus, gpus


def run_search(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run or resume a search; writes summary.json and trials.csv and returns the summary."""
    args, config, search_dir = prepare(argv)
    data_class = config.fixed.get("data_class", DATA_CLASS)
    data_dir = config.fixed.get("data_dir")
    # decode the data once, here, before Ray starts: a missing or corrupt file is a one-line error
    arrays = DATA_CLASSES[data_class].load_arrays(Path(data_dir) if data_dir else DATA_CLASSES[data_class](None).data_dir)

    import ray
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from text_recognizer.search.trial import train_trial
    from text_recognizer.search.wandb_logging import WandbTrialCallback

    started_ray = start_ray(args.address)
    try:
        cpus, gpus = trial_resources(args)
        if args.overwrite and not args.resume and search_dir.exists():
            shutil.rmtree(search_dir)  # only now: every check passed, the data loaded and Ray started
        search_dir.mkdir(parents=True, exist_ok=True)
        previous = json.loads((search_dir / SEARCH_FILE).read_text()) if args.resume else {}
        record = {
            "config": config.to_dict(),
            "wandb_mode": args.wandb_mode,
            "wandb_project": args.wandb_project,
            "wall_seconds": previous.get("wall_seconds", 0.0),
        }
        (search_dir / SEARCH_FILE).write_text(json.dumps(record, indent=2))

        # the dataset goes into the object store once; the first trial on a node hands it to the node's fork
        # server, whose trial processes all share it (a new key per run: a server never serves stale data)
        trainable = tune.with_resources(
            tune.with_parameters(train_trial, arrays=arrays, data_key=uuid.uuid4().hex), {"CPU": cpus, "GPU": gpus}
        )
        wandb_callback = WandbTrialCallback(
            search_dir,
            args.name,
            args.wandb_project,
            args.wandb_mode,
            config.settings(),
            config.max_t,
            config.metric,
            config.mode,
        )
        clock = TrialClock()
        callbacks = [JsonLoggerCallback(), CSVLoggerCallback(), clock, wandb_callback]
        run_config = tune.RunConfig(
            name=args.name,
            storage_path=str(search_dir.parent),
            callbacks=callbacks,
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=config.metric, checkpoint_score_order=config.mode
            ),
            failure_config=tune.FailureConfig(max_failures=args.max_failures),
            verbose=0 if args.quiet else 1,
        )
        began = time.time()
        if args.resume:
            tuner = tune.Tuner.restore(str(search_dir), trainable, resume_unfinished=True, resume_errored=True)
            # Tune unpickles the callbacks of the first run; use fresh ones (this storage path, these objects)
            tuner._local_tuner.get_run_config().callbacks = callbacks
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=config.param_space(),
                tune_config=tune.TuneConfig(
                    metric=config.metric,
                    mode=config.mode,
                    num_samples=config.num_samples,
                    scheduler=ASHAScheduler(
                        time_attr="training_iteration",
                        max_t=config.max_t,
                        grace_period=config.grace_period,
                        reduction_factor=config.reduction_factor,
                    ),
                    search_alg=BasicVariantGenerator(random_state=config.seed, max_concurrent=args.max_concurrent or 0),
                    reuse_actors=True,  # a trial starts in a running actor, which forks the node's server
                    trial_name_creator=lambda trial: f"trial_{trial.trial_id}",
                    trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
                ),
                run_config=run_config,
            )
        with tune_environment():
            tuner.fit()
        record["wall_seconds"] += time.time() - began
        (search_dir / SEARCH_FILE).write_text(json.dumps(record, indent=2))
        summary = write_results(
            search_dir,
            args.name,
            config,
            record["wall_seconds"],
            args.wandb_mode,
            args.wandb_project,
            clock.ready,
        )
        if summary["interrupted"]:
            wandb_callback.finish_all(tune.ExperimentAnalysis(str(search_dir)).trials)
    finally:
        if started_ray:
            ray.shutdown()
    print_report(summary, args.top, file=sys.stdout)
    if summary["interrupted"]:
        print(f"\nThe search was interrupted; its state is saved. Continue it with:\n  {summary['resume_command']}")
    return summary


@contextmanager
def tune_environment() -> Iterator[None]:
    """Tune settings that only exist as environment variables, for the duration of one search."""
    values = {
        "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # JSON and CSV are given explicitly: no TensorBoard files per trial
        # a snapshot per checkpoint is what makes --resume lose nothing; don't warn about its cost
        "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    }
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def replay_command(config: dict[str, Any], epochs: int | None = None) -> str:
    """The run_experiment.py command line that trains a trial's config as a single run."""
    from text_recognizer.search.trial import config_to_argv

    run_args = {**config, **({"max_epochs": epochs} if epochs else {})}
    return shlex.join(["python", "training/run_experiment.py", *config_to_argv(run_args)])
