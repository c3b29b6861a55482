"""Runs in the driver: the search's flags and config, checked into one frozen description (SearchSpec).

Every check that needs neither Ray nor the data happens here, so bad input is one line and exit 2 before
anything expensive starts or anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from text_recognizer.facts import SEARCH_FILE, TUNE_STATE_FILE, WANDB_PROJECT
from text_recognizer.flags import build_parser, default_wandb_mode
from text_recognizer.search import storage as stored
from text_recognizer.search.config import (
    DEFAULT_CONFIG,
    SEARCH_ALGS,
    SMOKE_CONFIG,
    SearchConfig,
    check_search_alg,
    load_config,
    parse_duration,
)
from text_recognizer.util import Parser, UserError

STORAGE_PATH = Path("logs") / "search"
TRIALS_PER_GPU = 4  # small models leave most of a GPU idle: pack four trials onto each one
# a finished search keeps the checkpoints of its best trials only (replay needs flags, the report metrics); each is
# weights only (their sizes: docs/benchmarks.md)
KEEP_CHECKPOINTS = 3
CONFIRM_SEEDS = 3  # --confirm TOP_K: new seeds per config
MAX_FAILURES = 2  # retries of a trial whose worker died, each from its newest checkpoint
TRIAL_PROCESSES = ("actor", "fork")  # where a trial trains: its Tune actor (Ray's way), or a fork server's child
TOP_TRIALS = 5  # rows of the final table
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class SearchSpec:
    """One search, as checked: who it is, where it lives, what it searches, what each trial gets, where it logs."""

    name: str
    folder: Path  # <storage>/<name>; with a URI storage, the driver's local folder logs/search/<name>
    config: SearchConfig
    wandb_mode: str  # online | offline | disabled
    wandb_project: str
    cpus_per_trial: float | None  # as asked; None: the default for the cluster
    gpus_per_trial: float | None
    resources: tuple[float, float] | None = None  # CPUs and GPUs per trial, once checked against the cluster
    trial_process: str = "actor"
    address: str | None = None  # a cluster to join; None: start a local one
    storage: str | None = None  # a URI (s3://bucket/prefix) where Tune keeps state and checkpoints; None: folder.parent
    resume: bool = False
    grow: bool = False  # --resume with --num-samples or --time-budget: a new part of the search
    overwrite: bool = False
    max_failures: int = MAX_FAILURES
    keep_checkpoints: int = KEEP_CHECKPOINTS
    max_concurrent: int | None = None
    top: int = TOP_TRIALS
    confirm: tuple[int, int] | None = None  # --confirm TOP_KxSEEDS: retrain the best configs with new seeds
    warm_start: Path | None = None  # --warm-start FOLDER: an earlier search whose trials seed the study
    output: str = "progress"  # progress (a line per finished trial, a status line), tune (Tune's own), quiet

    @property
    def where(self) -> str:
        """The --storage-path that holds the search (what --resume takes): its URI, or the folder's parent."""
        return self.storage or str(self.folder.parent)

    def saved(self) -> dict[str, Any]:
        """What --resume needs again, written to the search folder's SEARCH_FILE."""
        return {
            "config": asdict(self.config),
            "wandb_mode": self.wandb_mode,
            "wandb_project": self.wandb_project,
            "trial_process": self.trial_process,  # Tune resumes a search with the trainable it began with
        }

    def fitted_to(self, nodes: list[dict[str, float]]) -> SearchSpec:
        """This spec with the CPUs and GPUs per trial (as asked, else the default) that fit `nodes` (Ray's
        resource dicts); UserError when no node can hold one trial."""
        return replace(self, resources=trial_resources(self.cpus_per_trial, self.gpus_per_trial, nodes))


def trial_resources(cpus: float | None, gpus: float | None, nodes: list[dict[str, float]]) -> tuple[float, float]:
    """CPUs and GPUs per trial: as asked, else 1 CPU and no GPU, or with GPUs TRIALS_PER_GPU trials a GPU
    sharing the CPUs."""
    total_cpus = sum(node.get("CPU", 0) for node in nodes)
    total_gpus = sum(node.get("GPU", 0) for node in nodes)
    gpus = gpus if gpus is not None else (1 / TRIALS_PER_GPU if total_gpus else 0.0)
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


def local_nodes() -> list[dict[str, float]]:
    """The one node a local cluster will have: this machine's CPUs, and its GPUs counted as ray.init counts them
    (NVML, within CUDA_VISIBLE_DEVICES; resource_and_label_spec.py). Ray's count, not torch's: the driver never
    imports torch before its trials run."""
    from ray._private import accelerators

    manager = accelerators.get_accelerator_manager_for_resource("GPU")
    gpus = manager.get_current_node_num_accelerators()
    visible = manager.get_current_process_visible_accelerator_ids()
    gpus = min(gpus, len(visible)) if visible is not None else gpus
    return [{"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}]


def ray_running() -> bool:
    """Whether this process is connected to Ray already (a test or a notebook started it); never imports Ray."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def build_search_parser() -> Parser:
    """The search's own flags; any other --flag=value is a run flag fixed for every trial."""
    parser = Parser(
        prog="tune_mlp.py",
        description="A search (random, or Optuna's TPE: the config's search_alg) with ASHA early stopping over "
        "run_experiment.py flags, on a Ray cluster, "
        "with every trial logged to W&B. Run flags given here (e.g. --data_class=FashionMNIST) are fixed "
        "for every trial and win over the config.",
    )
    add = parser.add_argument
    add("--num-samples", type=int, default=None, help="trials to sample (default: the config's num_samples)")
    add("--search-alg", choices=SEARCH_ALGS, default=None, help="how trials are sampled (default: the config's search_alg)")
    add(
        "--time-budget",
        default=None,
        help="end the search after this long, e.g. 600, 90s, 10m, 1.5h: no new trial starts, running ones end "
        "(default: the config's time_budget, else none)",
    )
    add("--config", default=None, help=f"search config: a YAML file or a shipped config's name (default {DEFAULT_CONFIG.stem})")
    add("--name", default=None, help="search name: its folder under --storage-path and its W&B group (default: config + time)")
    storage_help = f"a folder ({STORAGE_PATH}; on a cluster one every node mounts) or a URI, e.g. s3://bucket/prefix"
    add("--storage-path", default=str(STORAGE_PATH), help=storage_help)
    add("--cpus-per-trial", type=float, default=None, help="CPUs per trial, also its torch threads (default 1, or CPUs/(GPUs*4))")
    add(
        "--gpus-per-trial",
        type=float,
        default=None,
        help=f"GPUs per trial; fractions pack trials (default 1/{TRIALS_PER_GPU} or 0)",
    )
    add("--trial-process", choices=TRIAL_PROCESSES, default=None, help="where trials train: their Tune actor (default) or fork")
    add("--max-concurrent", type=int, default=None, help="most trials running at once (default: as many as resources allow)")
    add("--max-failures", type=int, default=MAX_FAILURES, help=f"retries of a failed trial from its checkpoint ({MAX_FAILURES})")
    add(
        "--keep-checkpoints",
        type=int,
        default=KEEP_CHECKPOINTS,
        help=f"trials whose best checkpoint a finished search keeps: the best N ({KEEP_CHECKPOINTS})",
    )
    add("--address", default=None, help="join this Ray cluster (default: $RAY_ADDRESS, else start a local one)")
    add(
        "--resume",
        action="store_true",
        help="continue the search --name after a crash or Ctrl-C; with --num-samples (more) or --time-budget (for "
        "this part), grow it, finished or not",
    )
    add(
        "--confirm",
        default=None,
        metavar="TOP_K[xSEEDS]",
        help="after the search, train the TOP_K best configs again with SEEDS new seeds each (default 3) at the full "
        "max_t; the winner is the best mean (default: off)",
    )
    add(
        "--warm-start",
        default=None,
        metavar="FOLDER",
        help="seed a new Optuna search's study with the finished trials of the earlier search in FOLDER",
    )
    add("--overwrite", action="store_true", help="delete an existing search of the same --name and start over")
    add("--wandb-project", default=WANDB_PROJECT, help=f"W&B project (default {WANDB_PROJECT})")
    add(
        "--wandb-mode",
        choices=("online", "offline", "disabled"),
        default=None,
        help="default: online with credentials, else offline",
    )
    add("--smoke-test", action="store_true", help=f"a seconds-long search: the shipped {SMOKE_CONFIG.stem} config")
    add("--top", type=int, default=TOP_TRIALS, help=f"trials shown in the final table (default {TOP_TRIALS})")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--verbose", action="store_true", help="Tune's own full output instead of our progress lines")
    output.add_argument("--quiet", action="store_true", help="print only the final report")
    add_commands(parser)
    return parser


def add_commands(parser: Parser) -> None:
    """`tune_mlp.py report FOLDER` and `tune_mlp.py sync FOLDER`: what is done with a search folder afterwards."""
    commands = parser.add_subparsers(dest="command", title="commands (instead of a search)", metavar="{report,sync}")
    folder_help = "a search folder (<storage-path>/<name>)"
    report = commands.add_parser(
        "report",
        help="(re)write a search's offline report, FOLDER/report/report.html, and print its path",
        description="Write the offline report of a search folder: report/report.html and its PNGs.",
    )
    report.add_argument("folder", type=Path, help=folder_help)
    sync = commands.add_parser(
        "sync",
        help="upload a search's offline W&B runs, then make them one W&B sweep",
        description="Upload a search's offline W&B runs (wandb sync), then create its W&B sweep from them.",
    )
    sync.add_argument("folder", type=Path, help=f"{folder_help} logged with --wandb-mode offline")


def parse_run_overrides(flags: list[str]) -> dict[str, Any]:
    """Run flags given on the search command line, as {flag: value} of exactly those given."""
    unknown = [flag for flag in flags if not flag.startswith("--")]
    if unknown:
        raise UserError(f"unexpected argument {unknown[0]!r}")
    if not flags:
        return {}
    parser = build_parser(flags, prog="tune_mlp.py")
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # keep only what the user typed
    return vars(parser.parse_args(flags))


def check_numbers(args: argparse.Namespace) -> None:
    if args.num_samples is not None and args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.cpus_per_trial is not None and args.cpus_per_trial <= 0:
        raise UserError(f"--cpus-per-trial must be > 0, got {args.cpus_per_trial}")
    if args.gpus_per_trial is not None and args.gpus_per_trial < 0:
        raise UserError(f"--gpus-per-trial must be >= 0, got {args.gpus_per_trial}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise UserError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    if args.keep_checkpoints < 1:
        raise UserError(f"--keep-checkpoints must be >= 1 (the winner's), got {args.keep_checkpoints}")
    if args.max_failures < 0:
        raise UserError(f"--max-failures must be >= 0, got {args.max_failures}")
    if args.smoke_test and args.config:
        raise UserError("--smoke-test runs the shipped smoke config: drop --config")


def check_address(address: str | None) -> None:
    """UserError for a local cluster without token auth, or an address where nothing listens."""
    if not address and os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        raise UserError("RAY_AUTH_MODE=disabled: the local Ray cluster always keeps token authentication on; unset it")
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:  # ray.init would retry a dead address for minutes
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except (OSError, ValueError) as error:
        raise UserError(f"--address {address}: no Ray cluster answers there ({error})") from None


def check_name(name: str) -> None:
    if not NAME_PATTERN.match(name) or ".." in name:
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only (no path separators or '..')")


def prove_storage(storage: Path) -> Path:
    """The resolved storage folder, proven writable by creating it and a probe file in it (then removing both).

    Asking (os.access) is not proof: as root it says yes under /proc and /sys.
    """
    storage = storage.expanduser().resolve()
    existing = next(path for path in (storage, *storage.parents) if path.exists())
    if not existing.is_dir():
        raise UserError(f"--storage-path {storage}: {existing} is not a folder")
    created = [path for path in (storage, *storage.parents) if not path.exists()]
    try:
        storage.mkdir(parents=True, exist_ok=True)
        probe = storage / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(f"--storage-path {storage}: is not writable ({error.strerror or error})") from None
    finally:
        for path in created:  # deepest first: leave nothing behind
            try:
                path.rmdir()
            except OSError:
                pass
    return storage


def resumed_spec(args: argparse.Namespace, overrides: dict[str, Any], storage: Path) -> SearchSpec:
    """The spec of a saved search, after refusing every flag that would change it."""
    if not args.name:
        raise UserError("--resume needs the --name of the search to continue")
    check_name(args.name)
    given = {
        "--config": args.config,
        "--search-alg": args.search_alg,
        "--smoke-test": args.smoke_test,
        "--warm-start": args.warm_start,
        "--overwrite": args.overwrite,
        "--wandb-mode": args.wandb_mode,
        "--wandb-project": args.wandb_project != WANDB_PROJECT,
    }
    changes = [flag for flag, value in given.items() if value] + [f"--{key}" for key in overrides]
    if changes:
        raise UserError(
            f"--resume continues the search as it was saved and can't change {', '.join(changes)} (only "
            "--num-samples and --time-budget grow it): drop them, or start a new search under another --name"
        )
    saved = saved_search(storage / args.name, storage_uri(args))
    trial_process = saved.get("trial_process", TRIAL_PROCESSES[0])
    if args.trial_process not in (None, trial_process):
        raise UserError(
            f"--resume: the search {args.name!r} trains its trials with --trial-process {trial_process}: drop the flag"
        )
    config = grown_config(SearchConfig(**saved["config"]), args, saved)
    spec = _spec(args, storage / args.name, config, saved["wandb_mode"], saved["wandb_project"], trial_process)
    return replace(spec, grow=args.num_samples is not None or args.time_budget is not None)


def grown_config(config: SearchConfig, args: argparse.Namespace, saved: dict[str, Any]) -> SearchConfig:
    """A saved search's config grown by --num-samples (never fewer) and --time-budget (this part's)."""
    if args.num_samples is None and args.time_budget is None:
        return config
    if "parts" not in saved:
        raise UserError(f"--resume {args.name}: this search was saved before searches could grow: resume it as it is")
    if args.num_samples is not None and args.num_samples < config.num_samples:
        raise UserError(
            f"--num-samples {args.num_samples}: the search {args.name!r} has {config.num_samples} samples already; "
            "growing only adds samples"
        )
    return with_search_flags(config, args)


def storage_uri(args: argparse.Namespace) -> str | None:
    """--storage-path when it is a URI (s3://bucket/prefix), else None."""
    return args.storage_path if stored.is_uri(args.storage_path) else None


def saved_search(folder: Path, uri: str | None) -> dict[str, Any]:
    """The saved record of the search in `folder` or, with a URI, stored under the URI (the local copy when there
    is one: the driver writes it first); UserError when there is no such search."""
    if uri is None:
        if not (folder / SEARCH_FILE).is_file() or not (folder / TUNE_STATE_FILE).is_file():
            raise UserError(f"--resume: no search named {folder.name!r} in {folder.parent}")
        return json.loads((folder / SEARCH_FILE).read_text())
    try:
        if not stored.stored(uri, folder.name, SEARCH_FILE, TUNE_STATE_FILE):
            raise UserError(f"--resume: no search named {folder.name!r} in {uri}")
        local = folder / SEARCH_FILE
        return json.loads(local.read_text() if local.is_file() else stored.read_text(uri, folder.name, SEARCH_FILE))
    except OSError as error:
        raise UserError(f"--resume: can't read the search {folder.name!r} in {uri} ({stored.first_line(error)})") from None


def with_search_flags(config: SearchConfig, args: argparse.Namespace) -> SearchConfig:
    """The config with what --num-samples, --search-alg and --time-budget say instead."""
    if args.num_samples is not None:
        config = replace(config, num_samples=args.num_samples)
    if args.time_budget is not None:
        try:
            config = replace(config, time_budget=parse_duration(args.time_budget))
        except ValueError as error:
            raise UserError(f"--time-budget {error}") from None
    if args.search_alg is not None:
        config = replace(config, search_alg=args.search_alg)

        def bad(key: str, message: str) -> UserError:
            return UserError(f"--search-alg {args.search_alg}: {config.path}: {key}: {message}")

        check_search_alg(config.space, args.search_alg, bad)
    return config


def new_spec(args: argparse.Namespace, overrides: dict[str, Any], storage: Path) -> SearchSpec:
    """The spec of a new search; refuses a name that is taken unless --overwrite."""
    config = load_config(SMOKE_CONFIG if args.smoke_test else args.config or DEFAULT_CONFIG, overrides)
    config = with_search_flags(config, args)
    name = args.name or f"{Path(config.path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_name(name)
    uri = storage_uri(args)
    if ((storage / name).exists() or (uri and stored.stored(uri, name))) and not args.overwrite:
        raise UserError(
            f"a search named {name!r} exists in {uri or storage}: continue it with --resume, "
            "pick another --name, or start over with --overwrite"
        )
    wandb_mode, trial_process = args.wandb_mode or default_wandb_mode(), args.trial_process or TRIAL_PROCESSES[0]
    spec = _spec(args, storage / name, config, wandb_mode, args.wandb_project, trial_process)
    return replace(spec, warm_start=warm_start_folder(args.warm_start, config))


def warm_start_folder(text: str | None, config: SearchConfig) -> Path | None:
    """The earlier search that --warm-start names, checked: Optuna only, a search folder, the same metric."""
    if text is None:
        return None
    if config.search_alg != "optuna":
        raise UserError(
            f"--warm-start: search_alg {config.search_alg} samples at random, so there is no model to warm: "
            "use --search-alg optuna"
        )
    folder = Path(text).expanduser().resolve()
    if not (folder / "summary.json").is_file() or not (folder / SEARCH_FILE).is_file():
        raise UserError(f"--warm-start {folder}: not a search folder (no {SEARCH_FILE} and summary.json)")
    try:
        earlier = json.loads((folder / "summary.json").read_text())["settings"]
    except (ValueError, KeyError) as error:
        raise UserError(f"--warm-start {folder}: unreadable summary.json ({error})") from None
    if (earlier.get("metric"), earlier.get("mode")) != (config.metric, config.mode):
        raise UserError(
            f"--warm-start {folder}: that search optimized {earlier.get('metric')} ({earlier.get('mode')}), "
            f"this one {config.metric} ({config.mode}): its values would mislead the study"
        )
    return folder


def _spec(
    args: argparse.Namespace, folder: Path, config: SearchConfig, wandb_mode: str, wandb_project: str, trial_process: str
) -> SearchSpec:
    return SearchSpec(
        name=folder.name,
        folder=folder,
        config=config,
        wandb_mode=wandb_mode,
        wandb_project=wandb_project,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        trial_process=trial_process,
        address=args.address,
        storage=storage_uri(args),
        resume=args.resume,
        overwrite=args.overwrite,
        confirm=parse_confirm(args.confirm),
        max_failures=args.max_failures,
        keep_checkpoints=args.keep_checkpoints,
        max_concurrent=args.max_concurrent,
        top=args.top,
        output="quiet" if args.quiet else "tune" if args.verbose else "progress",
    )


def parse_confirm(text: str | None) -> tuple[int, int] | None:
    """--confirm TOP_K[xSEEDS] as (TOP_K, SEEDS); UserError unless both are >= 1."""
    if text is None:
        return None
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", text.strip().lower())
    if not match:
        raise UserError(f"--confirm {text!r}: write TOP_K or TOP_KxSEEDS, e.g. 3x3")
    top_k, seeds = int(match.group(1)), int(match.group(2) or CONFIRM_SEEDS)
    if top_k < 1 or seeds < 1:
        raise UserError(f"--confirm {text}: needs at least 1 config and 1 seed, e.g. 3x3")
    return top_k, seeds


def describe(argv: Sequence[str] | None) -> SearchSpec:
    """Flags and config checked into one frozen SearchSpec; UserError for anything wrong. Needs no Ray, no data."""
    args, rest = build_search_parser().parse_known_args(argv)
    if args.command:
        raise UserError(f"{args.command} is a command of its own: run tune_mlp.py {args.command} FOLDER")
    args.address = args.address or os.environ.get("RAY_ADDRESS") or None  # read once: the flag, else Ray's variable
    overrides = parse_run_overrides(rest)
    check_numbers(args)
    check_address(args.address)
    uri = storage_uri(args)
    if uri:
        stored.prove_uri(uri)  # a bad URI, a missing bucket, refused credentials: one line, before anything starts
    storage = prove_storage(STORAGE_PATH if uri else Path(args.storage_path))  # with a URI: the driver's own files
    make = resumed_spec if args.resume else new_spec
    spec = make(args, overrides, storage)
    if spec.address is None and not ray_running():
        spec = spec.fitted_to(local_nodes())  # refuse a trial too large before the data is read and Ray starts
    return spec
