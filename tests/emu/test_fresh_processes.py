"""Fresh processes find Unicorn's CPU state every time, whatever ran before in them.

A fixed sample of ``benchmarks/bench_fresh_processes.py`` (which runs 1,000):
30 fresh processes, each running hello64 on KVM first (where this machine has
/dev/kvm; a broken /dev/kvm fails the test) and then on the emulator, every
second one after importing ``labkit.monitor``.  Before the CPU state was reached
through Unicorn's own pointers, up to a quarter of such processes failed with
"cannot find Unicorn's CPU state in memory".
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from backends import HAS_KVM

pytestmark = [pytest.mark.emu, pytest.mark.slow]

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_fresh_processes.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_fresh_processes", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_thirty_fresh_processes_run_kvm_then_emulation_and_all_halt():
    bench = _bench()
    assert bench.kvm_usable() == HAS_KVM  # /dev/kvm exists here but cannot be opened: a failure, not a skip
    report = bench.run(30, jobs=2, kvm=HAS_KVM)
    assert report["failure_messages"] == {}
    assert report["succeeded"] == 30 and report["kvm"] == HAS_KVM
