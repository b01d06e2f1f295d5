"""labkit's layers import downward only: ``lint-imports`` checks pyproject.toml's contracts.

The order (top to bottom) and where each top-level module sits is written in
``[tool.importlinter]``; the contract is exhaustive, so a new top-level module
must be placed there before this test passes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = [sys.executable, "-c",
                "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the labkit package and pyproject.toml in ``tree``."""
    try:
        import importlinter  # noqa: F401
    except ImportError:
        pytest.fail("import-linter is missing: pip install -e '.[test]' (it is in the test extra)")
    path = os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))  # this tree's labkit first
    return subprocess.run([*LINT_IMPORTS, "--no-cache", "--no-logo"], cwd=tree, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": path})


def test_layers_import_downward_only():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 1 kept, 0 broken." in result.stdout, result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The check can fail: the x86 layer importing the CLI is reported, naming both."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copytree(ROOT / "labkit", tmp_path / "labkit", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    layout = tmp_path / "labkit" / "x86" / "layout.py"
    layout.write_text(layout.read_text() + "\nimport labkit.cli  # noqa: E402 (an upward import, on purpose)\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert "labkit.x86 is not allowed to import labkit.cli" in result.stdout, result.stdout
    assert "labkit.x86.layout -> labkit.cli" in result.stdout, result.stdout


def test_a_new_top_level_module_must_be_placed(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copytree(ROOT / "labkit", tmp_path / "labkit", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    (tmp_path / "labkit" / "misc.py").write_text('"""Placed nowhere."""\n')
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert "labkit.misc" in result.stdout + result.stderr
