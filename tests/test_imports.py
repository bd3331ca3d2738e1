"""The import graph: every module imports on its own (no cycles, no optional extra needed at import time), and
the library's layers never import upward.

Layers, lowest first (arrows point one way, as in STYLE.md):

- base modules: ``errors``, ``registry``, ``units``, ``fileio``, ``distributed``, ``perf``;
- ``models``, ``data``;
- ``preflight`` (the commands' checks of what a config points at: models and data);
- ``attacks``;
- ``methods``;
- ``train`` and ``eval`` (the trainer runs evaluations: ``train`` may import ``eval``, not the reverse);
- ``export`` (reads a model and its run folder: ``models`` and ``train``'s run layout, never methods or eval);
- application: ``experiments`` (may import anything but the CLI) and ``cli``.

Nothing in the library imports the application.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "mmtard"

APPLICATION = {"cli", "experiments"}
BASE = {"errors", "registry", "units", "fileio", "distributed", "perf"}
#: layer (first name below ``mmtard``) -> the layers its modules must never import
FORBIDDEN_IMPORTS = {
    **{base: {"models", "data", "attacks", "methods", "train", "eval", "export"} | APPLICATION for base in BASE},
    "models": {"attacks", "methods", "train", "eval", "export"} | APPLICATION,
    "data": {"attacks", "methods", "train", "eval", "export"} | APPLICATION,
    "preflight": {"attacks", "methods", "train", "eval", "export"} | APPLICATION,
    "attacks": {"methods", "train", "eval", "export"} | APPLICATION,
    "methods": {"train", "eval", "export"} | APPLICATION,
    "eval": {"train"} | APPLICATION,
    "train": {"export"} | APPLICATION,
    "export": {"attacks", "methods", "eval"} | APPLICATION,
    "experiments": {"cli"},
}
#: optional dependencies (extras); no module may need them to be imported
OPTIONAL_MODULES = ("matplotlib", "sklearn", "tensorboard")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(module_name(path) for path in PACKAGE.rglob("*.py"))

# Runs in a fresh interpreter: before each module is imported, every mmtard module is dropped from
# sys.modules, so each one is imported as if it were the first (an import cycle fails whichever module
# opens it). Third-party packages stay loaded: importing torch once per module would take minutes. The
# optional extras are made unimportable, as on an install without them.
IMPORT_EACH_ALONE = textwrap.dedent(
    """
    import importlib, json, sys, traceback

    modules, blocked = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    for name in blocked:  # `import name` raises ModuleNotFoundError, find_spec(name) is None: not installed
        sys.modules[name] = None
    failures = {}
    for name in modules:
        for loaded in [m for m in sys.modules if m == "mmtard" or m.startswith("mmtard.")]:
            del sys.modules[loaded]
        try:
            importlib.import_module(name)
        except Exception:
            failures[name] = traceback.format_exc(limit=-4)
    print(json.dumps(failures))
    """
)


def import_each_alone(src: Path, modules: list[str]) -> dict[str, str]:
    """Module -> traceback, for each of ``modules`` (found under ``src``) that fails to import first."""
    env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH_ALONE, json.dumps(modules), json.dumps(OPTIONAL_MODULES)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def import_failures() -> dict[str, str]:
    return import_each_alone(SRC, MODULES)


def test_import_check_catches_a_cycle_and_an_extra_needed_at_import(tmp_path):
    fake = tmp_path / "mmtard"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "a.py").write_text("from mmtard.b import B\nA = 1\n")
    (fake / "b.py").write_text("from mmtard.a import A\nB = 1\n")
    (fake / "plots.py").write_text("import matplotlib.pyplot\n")
    (fake / "lazy.py").write_text("def plot():\n    import matplotlib.pyplot\n")
    failures = import_each_alone(tmp_path, ["mmtard.a", "mmtard.b", "mmtard.plots", "mmtard.lazy"])
    assert sorted(failures) == ["mmtard.a", "mmtard.b", "mmtard.plots"]
    assert "partially initialized module" in failures["mmtard.a"]
    assert "matplotlib" in failures["mmtard.plots"]


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone_without_extras(import_failures, module):
    assert module not in import_failures, f"importing {module} first fails:\n{import_failures.get(module)}"


def mmtard_imports(path: Path) -> set[str]:
    """Every ``mmtard`` module that ``path`` imports, at module level or inside functions (absolute names)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            imported.add(origin)
            imported |= {f"{origin}.{alias.name}" for alias in node.names}  # `from mmtard import eval`
    return {name for name in imported if name == "mmtard" or name.startswith("mmtard.")}


def layer(module: str) -> str:
    """``mmtard.eval.run`` -> ``eval``; ``mmtard.units`` -> ``units``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_mmtard_imports_reads_absolute_relative_and_lazy_imports(tmp_path, monkeypatch):
    fake = tmp_path / "mmtard" / "eval"
    fake.mkdir(parents=True)
    source = fake / "run.py"
    source.write_text(
        "import os\nfrom mmtard.attacks import create_attack\nfrom . import report\nfrom ..train import config\n"
        "def f():\n    import mmtard.cli\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    found = {layer(name) for name in mmtard_imports(source)}
    assert found >= {"attacks", "eval", "train", "cli"}


@pytest.mark.parametrize("importer", sorted(FORBIDDEN_IMPORTS))
def test_no_layer_imports_upward(importer):
    forbidden = FORBIDDEN_IMPORTS[importer]
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if layer(module_name(path)) != importer:
            continue
        for target in sorted(mmtard_imports(path)):
            if layer(target) in forbidden:
                offences.append(f"{path.relative_to(SRC)} imports {target}")
    assert not offences, f"{importer} must not import {sorted(forbidden)}:\n" + "\n".join(offences)


def test_every_layer_rule_names_modules_that_exist_or_are_planned():
    """A renamed layer would silently leave its rule checking nothing."""
    present = {layer(module) for module in MODULES}
    assert set(FORBIDDEN_IMPORTS) - {"experiments"} <= present
