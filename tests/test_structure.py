"""The package's shape: no import cycles (imports inside functions count), and the modules that run in light
processes import only what those processes can afford."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "text_recognizer"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at any depth of its code (functions included)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {target for target in imported if target in modules and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "text_recognizer.search.driver" in graph and graph["text_recognizer.search.driver"]
    assert cycles(graph) == []


def modules_after_import(module: str) -> set[str]:
    """The top-level packages loaded into a fresh interpreter by importing `module`."""
    code = f"import sys; import {module}; print(' '.join(sorted({{name.split('.')[0] for name in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    return set(result.stdout.split())


@pytest.mark.parametrize("module", ["text_recognizer.facts", "text_recognizer.search.trial.forkserver"])
def test_leaf_modules_import_only_the_standard_library(module: str) -> None:
    baseline = modules_after_import("sys")  # what the interpreter loads by itself (site hooks, .pth files)
    loaded = modules_after_import(module) - baseline - set(sys.stdlib_module_names) - {"text_recognizer"}
    assert not {name for name in loaded if not name.startswith("_")}, loaded


LIGHTNING = {"torch", "torchvision", "pytorch_lightning", "lightning_fabric", "torchmetrics"}


def test_a_fork_mode_tune_actor_never_loads_torch() -> None:
    loaded = modules_after_import("text_recognizer.search.trial.tune_actor")
    assert "ray" in loaded and not loaded & LIGHTNING


def test_a_search_driver_starts_without_torch_or_lightning() -> None:
    # they were 5.3 of the driver's 6.8 s of imports: the run flags come from flags.py, the data from raw_files.py
    assert not modules_after_import("text_recognizer.search.driver") & LIGHTNING
    assert not modules_after_import("text_recognizer.flags") & (LIGHTNING | {"ray", "numpy"})


def test_every_data_and_model_class_has_its_flags_and_raw_files() -> None:
    from text_recognizer.data.raw_files import RAW_FILES
    from text_recognizer.flags import DATA_FLAGS, MODEL_FLAGS
    from text_recognizer.models import MODEL_CLASSES
    from text_recognizer.training import DATA_CLASSES

    assert set(DATA_CLASSES) == set(DATA_FLAGS) == set(RAW_FILES) and set(MODEL_CLASSES) == set(MODEL_FLAGS)
    for name, data_class in DATA_CLASSES.items():
        assert issubclass(data_class, RAW_FILES[name]) and RAW_FILES[name].dataset_name == name


SEARCH = "text_recognizer.search"


def layout_breaches(graph: dict[str, set[str]]) -> list[str]:
    """Imports that cross the layout of search/ (docs/layout.md): what runs in Ray's workers (search/trial/) imports
    nothing of the search outside trial/; only the entry points (cli.py) import the driver."""
    breaches = []
    for module, imported in graph.items():
        for target in imported:
            if module.startswith(f"{SEARCH}.trial") and target.startswith(SEARCH) and not target.startswith(f"{SEARCH}.trial"):
                if target != SEARCH:  # the package itself, through `from text_recognizer.search.trial import x`
                    breaches.append(f"{module} -> {target}")
            if target == f"{SEARCH}.driver" and module != "text_recognizer.cli":
                breaches.append(f"{module} -> {target}")
    return sorted(breaches)


def test_the_layout_check_finds_a_breach() -> None:
    graph = {f"{SEARCH}.trial.tune_actor": {f"{SEARCH}.outputs.results"}, f"{SEARCH}.outputs.report": {f"{SEARCH}.driver"}}
    assert layout_breaches(graph) == [
        f"{SEARCH}.outputs.report -> {SEARCH}.driver",
        f"{SEARCH}.trial.tune_actor -> {SEARCH}.outputs.results",
    ]


def test_the_search_keeps_its_layout() -> None:
    graph = import_graph()
    assert {f"{SEARCH}.trial.tune_actor", f"{SEARCH}.outputs.results", f"{SEARCH}.tracking.sweep"} <= set(graph)
    assert layout_breaches(graph) == []
