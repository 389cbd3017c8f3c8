"""The package's layers, read from its imports (ast, nothing executed): a lower layer never
imports a higher one, the math imports no Ray or MLflow, the records and ``cadis compare``
load no torch, and ``--dry-run`` loads no Ray. The rules are data; each is also shown to fail
on a package made to break it."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "cadis"

#: The layers, lowest first. A module may import modules of its own layer and of lower ones;
#: the most specific prefix decides a module's layer.
LAYERS = (
    ("foundation", ("cadis.errors", "cadis.files", "cadis.validation", "cadis.overrides",
                    "cadis.progress")),
    # Only names: the metric and tag names that writers below the sweep use too.
    ("tracking contract", ("cadis.tracking.contract",)),
    ("data and models", ("cadis.data", "cadis.models")),
    ("smoothing", ("cadis.smoothing",)),
    ("stored draws", ("cadis.draws",)),
    ("certifier", ("cadis.certifier",)),
    ("fine-tuning", ("cadis.finetuning",)),
    ("named models and pretraining", ("cadis.certify_models", "cadis.pretrain")),
    ("tracking", ("cadis.tracking",)),
    ("sweeps", ("cadis.sweeps",)),
    ("commands", ("cadis.cli", "cadis.__main__")),
)

#: Orchestration libraries and the only modules that may import them (anywhere in the file).
ORCHESTRATION = {
    "ray": ("cadis.finetuning.ray_train", "cadis.finetuning.train_failures", "cadis.sweeps"),
    "mlflow": ("cadis.tracking.client", "cadis.tracking.sweep_reader", "cadis.sweeps"),
    "optuna": ("cadis.sweeps",),
}

#: Modules whose import (module-level imports, followed through cadis) must not load a package.
NOT_LOADED = {
    "torch": ("cadis.smoothing.bounds", "cadis.smoothing.records", "cadis.smoothing.paired",
              "cadis.smoothing.multiplicity", "cadis.smoothing.verdicts",
              "cadis.tracking.contract", "cadis.tracking.compare", "cadis.files",
              "cadis.validation", "cadis.progress", "cadis.sweeps.objective",
              # `cadis compare` and its figures: the reader, the ranking, what to draw.
              "cadis.tracking.server", "cadis.tracking.client", "cadis.tracking.sweep_reader",
              "cadis.sweeps.ranking", "cadis.sweeps.distribution_text",
              "cadis.sweeps.figure_data", "cadis.sweeps.figures",
              # The driver's clock of each trial's phases; what Train's controller unpickles.
              "cadis.sweeps.trial_phases", "cadis.finetuning.train_failures"),
    # What `cadis sweep --dry-run` loads before it stops.
    "ray": ("cadis.cli", "cadis.sweeps.driver", "cadis.sweeps.parse", "cadis.sweeps.describe"),
}


@dataclass(frozen=True)
class Import:
    target: str
    line: int
    at_module_level: bool


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, modules: set[str]) -> list[Import]:
    """Every import in a file; ``from a import b`` names ``a.b`` when that is a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[Import] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return  # annotations only: nothing is imported when the code runs
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, node.lineno, module_level) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.append(Import(name if name in modules else node.module, node.lineno,
                                    module_level))
        for child in ast.iter_child_nodes(node):
            inner = module_level and not isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(tree, True)
    return found


def read_package(root: Path) -> dict[str, list[Import]]:
    paths = sorted(root.rglob("*.py"))
    modules = {module_name(root, path) for path in paths}
    return {module_name(root, path): imports_of(path, modules) for path in paths}


def _prefix_match(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(module: str) -> int:
    matches = [(len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS)
               for prefix in prefixes if _prefix_match(module, prefix)]
    if not matches:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return max(matches)[1]


def back_imports(package: dict[str, list[Import]]) -> list[str]:
    problems = []
    for module, imports in package.items():
        for item in imports:
            if item.target in package and layer_of(item.target) > layer_of(module):
                problems.append(f"{module}:{item.line} ({LAYERS[layer_of(module)][0]}) imports "
                                f"{item.target} ({LAYERS[layer_of(item.target)][0]})")
    return problems


def misplaced_orchestration(package: dict[str, list[Import]]) -> list[str]:
    problems = []
    for module, imports in package.items():
        for item in imports:
            library = item.target.split(".")[0]
            allowed = ORCHESTRATION.get(library)
            if allowed and not any(_prefix_match(module, prefix) for prefix in allowed):
                problems.append(f"{module}:{item.line} imports {item.target}")
    return problems


def loaded_at_import(package: dict[str, list[Import]], module: str) -> set[str]:
    """Every module (cadis's and others') importing ``module`` loads, following cadis's own
    module-level imports (and the packages above each module, which Python imports first)."""
    seen: set[str] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        if name not in package:
            continue
        parents = [".".join(name.split(".")[:depth]) for depth in range(1, name.count(".") + 1)]
        pending += [parent for parent in parents if parent in package]
        pending += [item.target for item in package[name] if item.at_module_level]
    return seen


def loads(package: dict[str, list[Import]], module: str, library: str) -> bool:
    return any(_prefix_match(name, library) for name in loaded_at_import(package, module))


def import_cycles(package: dict[str, list[Import]]) -> list[list[str]]:
    edges = {module: sorted({item.target for item in imports if item.target in package
                             and item.target != module})
             for module, imports in package.items()}
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in edges[module]:
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return cycles


PACKAGE = read_package(PACKAGE_ROOT)


# --------------------------------------------------------------------------- the package


def test_every_module_has_a_layer():
    for module in PACKAGE:
        if module != "cadis":
            layer_of(module)


def test_no_lower_layer_imports_a_higher_one():
    assert back_imports(PACKAGE) == []


@pytest.mark.parametrize("library", sorted(ORCHESTRATION))
def test_orchestration_libraries_only_where_they_orchestrate(library):
    assert [problem for problem in misplaced_orchestration(PACKAGE)
            if f" imports {library}" in problem] == []


@pytest.mark.parametrize("library,module", [(library, module) for library, modules in
                                            NOT_LOADED.items() for module in modules])
def test_light_modules_do_not_load_heavy_packages(library, module):
    assert module in PACKAGE
    assert not loads(PACKAGE, module, library)


def test_no_import_cycles():
    assert import_cycles(PACKAGE) == []


# --------------------------------------------------------------------------- the rules bite


def write_package(root: Path, files: dict[str, str]) -> dict[str, list[Import]]:
    for name, text in files.items():
        path = root / "cadis" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return read_package(root / "cadis")


BROKEN = {
    "back-import": ({"__init__.py": "", "smoothing/__init__.py": "",
                     "smoothing/bounds.py": "from cadis.sweeps import driver\n",
                     "sweeps/__init__.py": "", "sweeps/driver.py": ""},
                    lambda package: back_imports(package)),
    "lazy back-import": ({"__init__.py": "", "models/__init__.py": "",
                          "models/devices.py": "def f():\n    import cadis.cli\n",
                          "cli.py": ""},
                         lambda package: back_imports(package)),
    "ray in the math": ({"__init__.py": "", "finetuning/__init__.py": "",
                         "finetuning/losses.py": "def f():\n    import ray.train\n"},
                        lambda package: misplaced_orchestration(package)),
    "torch through a light module": (
        {"__init__.py": "", "tracking/__init__.py": "",
         "tracking/compare.py": "from cadis.smoothing.smooth import Smooth\n",
         "smoothing/__init__.py": "", "smoothing/smooth.py": "import torch\n"},
        lambda package: ["torch"] if loads(package, "cadis.tracking.compare", "torch") else []),
    # How compare's figures once loaded torch: the ranking's objective sat beside the
    # fine-tuning configuration.
    "torch through the ranking": (
        {"__init__.py": "", "sweeps/__init__.py": "", "finetuning/__init__.py": "",
         "sweeps/figure_data.py": "from cadis.sweeps.ranking import rank_trials\n",
         "sweeps/ranking.py": "from cadis.sweeps.spec import Objective\n",
         "sweeps/spec.py": "from cadis.finetuning.config import TrainConfig\n",
         "finetuning/config.py": "import torch\n"},
        lambda package: ["torch"] if loads(package, "cadis.sweeps.figure_data", "torch") else []),
    "mlflow in the names": ({"__init__.py": "", "tracking/__init__.py": "",
                             "tracking/contract.py": "def f():\n    import mlflow\n"},
                            lambda package: misplaced_orchestration(package)),
    "cycle": ({"__init__.py": "", "finetuning/__init__.py": "",
               "finetuning/loop.py": "from cadis.finetuning import fit\n",
               "finetuning/fit.py": "def f():\n    from cadis.finetuning import loop\n"},
              lambda package: import_cycles(package)),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_each_rule_fails_on_a_package_that_breaks_it(tmp_path, case):
    files, check = BROKEN[case]
    assert check(write_package(tmp_path, files))


def test_type_checking_imports_and_annotations_are_not_imports(tmp_path):
    package = write_package(tmp_path, {
        "__init__.py": "", "tracking/__init__.py": "", "torchy.py": "import torch\n",
        "tracking/compare.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                "    from cadis.torchy import x\n"
                                "def f():\n    import torch\n")})
    assert not loads(package, "cadis.tracking.compare", "torch")
