"""``labkit run-many`` as a student types it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def labkit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "labkit.cli", *args], capture_output=True, text=True, timeout=120)


def test_run_many_streams_each_vm_and_says_how_it_ended(backend_name):
    done = labkit("run-many", "hello64*3", "triplefault64", "forever64", "--backend", backend_name,
                  "--timeout", "0.5")
    assert done.returncode == 3, done.stderr  # two of them did not halt or exit
    lines = done.stdout.splitlines()
    assert len(lines) == 6 and lines[-1] == "--- 5 VMs, 3 halted or exited, 2 did not"
    assert sum("halted" in line and "[Hello from 64-bit mode!]" in line for line in lines) == 3
    assert any(line.startswith("triplefault64-3") and "shutdown (triple fault)" in line for line in lines)
    assert any(line.startswith("forever64-4") and "0.5 s budget" in line for line in lines)


def test_run_many_json(backend_name):
    done = labkit("run-many", "exit64*2", "--backend", backend_name, "--json")
    assert done.returncode == 0, done.stderr
    vms = json.loads(done.stdout)["vms"]
    assert sorted(vm["name"] for vm in vms) == ["exit64-0", "exit64-1"]
    assert all(vm["status"] == "exited" and vm["exit_code"] == 42 and vm["backend"] == backend_name for vm in vms)


@pytest.mark.unit
def test_run_many_limits_and_bad_input_are_one_line_errors():
    done = labkit("run-many", "hello64*300", "--backend", "emu")
    assert done.returncode == 2 and done.stdout == ""
    assert "FleetLimits.max_vms" in done.stderr and "--max-vms" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = labkit("run-many", "hello64*0", "--backend", "emu")
    assert done.returncode == 2 and "GUEST*COUNT" in done.stderr
    done = labkit("run-many", "hello64*2", "--backend", "emu", "--memory", "64M", "--memory-total", "100M")
    assert done.returncode == 2 and "FleetLimits.memory_total" in done.stderr
