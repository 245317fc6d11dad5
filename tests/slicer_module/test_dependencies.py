"""The Slicer module's dependency rules (README, Layout): IBISAgentLib imports only the standard library and numpy, and
nothing of ours; IBISAgent.py adds only what Slicer's Python provides. Checked statically (ast) and by importing
the library in a fresh interpreter whose only third-party package is numpy."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import LIB_DIR, MODULE_DIR

STDLIB = set(sys.stdlib_module_names)
SLICER_PROVIDED = {"slicer", "vtk", "qt", "ctk", "SampleData"}
FORBIDDEN = {"ibisagent", "ibisagent_training", "monailabel_app", "torch", "sam2", "requests", "PIL", "nibabel"}


def imported_top_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
            names.add(node.module.split(".")[0])
    return names


LIB_FILES = sorted(LIB_DIR.glob("*.py"))


def test_every_library_file_is_listed_in_cmake():
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text()
    for path in LIB_FILES:
        assert f"${{MODULE_NAME}}Lib/{path.name}" in cmake, f"{path.name} missing from MODULE_PYTHON_SCRIPTS"
    for resource in ("Resources/UI/${MODULE_NAME}.ui", "Resources/Icons/${MODULE_NAME}.png"):
        assert resource in cmake
    assert "add_subdirectory(IBISAgent)" in (MODULE_DIR.parent / "CMakeLists.txt").read_text()


@pytest.mark.parametrize("path", LIB_FILES, ids=lambda p: p.name)
def test_library_imports_only_stdlib_and_numpy(path):
    outside = imported_top_names(path) - STDLIB - {"numpy", "IBISAgentLib"}
    assert not outside, f"{path.name} imports {sorted(outside)}; IBISAgentLib may use the standard library and numpy"


def test_module_imports_only_what_slicer_provides():
    names = imported_top_names(MODULE_DIR / "IBISAgent.py")
    assert not names & FORBIDDEN
    outside = names - STDLIB - SLICER_PROVIDED - {"numpy", "IBISAgentLib"}
    assert not outside, f"IBISAgent.py imports {sorted(outside)}, which Slicer's Python does not provide"


def test_library_imports_with_only_stdlib_and_numpy(tmp_path):
    """A fresh interpreter (-I -S: no site-packages, no PYTHONPATH) that sees numpy and the module folder only."""
    packages = tmp_path / "site"
    packages.mkdir()
    os.symlink(Path(np.__file__).parent, packages / "numpy")
    script = f"""
import sys
sys.path[:0] = [{str(packages)!r}, {str(MODULE_DIR)!r}]
import importlib, pkgutil
import sysconfig
import IBISAgentLib
for info in pkgutil.iter_modules(IBISAgentLib.__path__):
    importlib.import_module("IBISAgentLib." + info.name)
allowed = (sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"], *sys.path[:2])
files = [getattr(m, "__file__", None) for m in list(sys.modules.values())]
third_party = sorted(f for f in files if f and not f.startswith(allowed))
print("imported:", sorted(m for m in sys.modules if m.startswith("IBISAgentLib")))
print("third party:", third_party)
assert not third_party, third_party
import requests  # must not be importable here: proves the isolation is real
"""
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", script], capture_output=True, text=True, timeout=120)
    assert "third party: []" in proc.stdout, proc.stdout + proc.stderr
    for name in ("client", "geometry", "imagefiles", "trajectory"):
        assert f"IBISAgentLib.{name}" in proc.stdout
    assert "No module named 'requests'" in proc.stderr, proc.stderr


@pytest.mark.parametrize("path", sorted(MODULE_DIR.rglob("*.py")), ids=lambda p: p.name)
def test_module_files_compile_for_python_39(path):
    """Slicer 5.6 ships Python 3.9: no 3.10+ syntax (match, X | Y outside annotations is caught at runtime only)."""
    ast.parse(path.read_text(), str(path), feature_version=(3, 9))
