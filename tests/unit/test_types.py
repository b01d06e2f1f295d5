"""mypy over labkit/ with pyproject.toml's ``[tool.mypy]``: every function typed, no type errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def mypy(tree: Path, cache: Path, *paths: str) -> subprocess.CompletedProcess:
    """``python -m mypy`` in ``tree`` with its pyproject.toml (over ``paths``, default: the configured files)."""
    try:
        import mypy  # noqa: F401
    except ImportError:
        pytest.fail("mypy is missing: pip install -e '.[test]' (it is in the test extra)")
    return subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(cache), "--no-error-summary", *paths],
                          cwd=tree, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MYPY_FORCE_COLOR": "0"})


def test_labkit_type_checks():
    result = mypy(ROOT, ROOT / ".mypy_cache")  # kept between runs (git ignores it): seconds instead of half a minute
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout


def test_a_type_error_and_an_untyped_function_fail_the_check(tmp_path):
    """The check can fail: a wrong type and a function without hints are both reported, by file and line."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copytree(ROOT / "labkit", tmp_path / "labkit", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    layout = tmp_path / "labkit" / "x86" / "layout.py"
    lines = len(layout.read_text().splitlines())
    layout.write_text(layout.read_text() + 'WRONG: int = "not a number"\n')
    table = tmp_path / "labkit" / "table.py"
    table.write_text(table.read_text() + "\n\ndef untyped(value):\n    return value\n")
    result = mypy(tmp_path, tmp_path / "cache", "--follow-imports=skip", "labkit/x86/layout.py", "labkit/table.py")
    assert result.returncode != 0, result.stdout
    assert f"labkit/x86/layout.py:{lines + 1}: error: Incompatible types in assignment" in result.stdout, result.stdout
    assert "labkit/table.py" in result.stdout and "[no-untyped-def]" in result.stdout, result.stdout


def test_the_seams_are_checked_a_backend_or_core_that_does_not_conform_fails(tmp_path):
    """The protocols are checked where they are used: a backend whose method differs from ``Backend``'s,
    and a core whose ``pio`` differs from ``Dispatcher``'s, are reported (the protocols are not decoration)."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copytree(ROOT / "labkit", tmp_path / "labkit", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for path, old, new in (
            ("kvm/backend.py", "    def kick(self) -> None:", "    def kick(self, now: bool) -> None:"),
            ("emu/unicorn_backend.py", "    def dirty_log_fetch(self) -> list[int]:",
             "    def dirty_log_fetch(self) -> set[int]:"),
            ("vmm/core.py", "    def pio(self, port: int, size: int, is_write: bool, value: int, rip: int) -> int:",
             "    def pio(self, port: int, size: int, is_write: bool, value: int) -> int:")):
        module = tmp_path / "labkit" / path
        text = module.read_text()
        assert text.count(old) == 1, (path, old)
        module.write_text(text.replace(old, new))
    result = mypy(tmp_path, tmp_path / "cache")
    assert result.returncode != 0, result.stdout
    assert 'Incompatible return value type (got "KvmBackend", expected "Backend")' in result.stdout, result.stdout
    assert 'Incompatible return value type (got "EmuBackend", expected "Backend")' in result.stdout, result.stdout
    assert 'incompatible type "MachineCore"; expected "Dispatcher"' in result.stdout, result.stdout
