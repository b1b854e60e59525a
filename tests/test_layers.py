"""The package layout is the architecture (ARCHITECTURE.md §3): each layer of vac/ imports only
the layers it may, so a module's place in the tree says what it may depend on. This reads every
module's imports (also those inside functions) and fails on an arrow pointing the wrong way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

VAC = Path(__file__).resolve().parent.parent / "vac"

# layer -> the other layers it may import
ALLOWED = {
    "core": set(),
    "records": {"core"},
    "backends": {"core"},
    "services": {"core", "records"},
    "content": {"core", "records"},
    "ops": {"core", "records"},
    "daemon": {"core", "records", "backends", "services", "content", "ops"},
    "cli": {"core", "records", "backends", "services", "content", "ops"},
}
# `vac simulate` drives the daemon's executor itself, never a copy of it (issue 14).
EXCEPTIONS = {("cli/simulate.py", "vac.daemon.executor")}


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("vac.")}


def layer_of(name: str) -> str:
    return name.split(".")[1]


MODULES = sorted(path for path in VAC.rglob("*.py") if path.parent != VAC)


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(VAC)))
def test_imports_follow_the_layers(path):
    layer = path.relative_to(VAC).parts[0]
    relative = str(path.relative_to(VAC))
    wrong = sorted(
        name for name in imported_modules(path)
        if layer_of(name) in ALLOWED and layer_of(name) != layer
        and layer_of(name) not in ALLOWED[layer]
        and not any(relative == where and (name == allowed or name.startswith(allowed + "."))
                    for where, allowed in EXCEPTIONS))
    assert not wrong, f"vac/{relative} ({layer}) may not import {wrong}"


def test_every_package_is_a_known_layer():
    assert {path.name for path in VAC.iterdir() if path.is_dir() and path.name != "__pycache__"} \
        == set(ALLOWED)


def test_the_core_imports_only_the_standard_library():
    import sys

    third_party = set()
    for path in VAC.joinpath("core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0
                     else [])
            for name in names:
                top = name.split(".")[0]
                if top != "vac" and top not in sys.stdlib_module_names and top != "__future__":
                    third_party.add(f"{path.name}: {name}")
    assert not third_party
