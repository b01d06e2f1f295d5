"""Debian's qemu-utils (qemu-img, qemu-io) as the reference the storage tests compare labkit with.

``scripts/setup test`` installs them; a test that needs them fails (it does not skip) where they are missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: install Debian's qemu-utils (scripts/setup test does)")
    return path


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([tool("qemu-img"), *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"qemu-img {' '.join(args)} exited {result.returncode}: {result.stdout}{result.stderr}")
    return result


def qemu_io(path: str, *commands: str, fmt: str = "qcow2") -> str:
    args = [tool("qemu-io"), "-f", fmt]
    for command in commands:
        args += ["-c", command]
    result = subprocess.run([*args, path], capture_output=True, text=True, timeout=300)
    if result.returncode != 0 or "failed" in result.stderr:
        raise AssertionError(f"qemu-io {commands} on {path}: {result.stdout}{result.stderr}")
    return result.stdout


def qemu_check(path: str) -> tuple[int, dict]:
    """``qemu-img check --output json``: (exit code, report)."""
    result = qemu_img("check", "--output", "json", path, check=False)
    try:
        report = json.loads(result.stdout) if result.stdout.strip() else {}
    except json.JSONDecodeError:
        report = {"raw": result.stdout + result.stderr}
    return result.returncode, report
