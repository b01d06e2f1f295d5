"""Create/run/destroy cycles leak nothing, also when the caller is interrupted mid-run (issue 11, item 7).

Counted from /proc (tests/machine/fleet_resources.py).  A fixed sample here;
``benchmarks/leaks_fleet.py`` runs 1,000 cycles per backend.
"""

from __future__ import annotations

import _thread
import os
import threading
import time

import pytest
from fleet_resources import check_no_growth, quiet, settled

from labkit.fleet import Fleet, VmSpec, VmState, run_many
from labkit.vmm.status import StatusKind

CYCLES = int(os.environ.get("LABKIT_FLEET_LEAK_CYCLES", "100"))
GUESTS = ["hello64", "triplefault64", "fault64", "exit64"]


def cycle(backend: str, index: int) -> None:
    """One VM made, run and destroyed through run_many, with a timeout every fifth time."""
    guest = "forever64" if index % 5 == 4 else GUESTS[index % len(GUESTS)]
    [outcome] = run_many([VmSpec(f"vm{index}", guest, backend=backend)], timeout=0.05)
    assert outcome.status is not StatusKind.ERROR, outcome.reason


@pytest.mark.slow
def test_create_run_destroy_cycles_leak_nothing(backend_name):
    for index in range(5):  # warm up: libraries, the watchdog thread, first-use caches
        cycle(backend_name, index)
    list(run_many([VmSpec(f"warm{i}", "hello64", backend=backend_name) for i in range(16)]))  # malloc arenas
    before = quiet()
    for index in range(CYCLES):
        cycle(backend_name, index)
    check_no_growth(before, settled(before), CYCLES)


@pytest.mark.slow
def test_fleets_of_many_leak_nothing(backend_name):
    specs = [VmSpec(f"vm{i}", GUESTS[i % 4] if i % 3 else "forever64", backend=backend_name) for i in range(16)]
    list(run_many(specs, timeout=0.2))
    before = quiet()
    for _ in range(3):
        assert len(list(run_many(specs, timeout=0.2))) == 16
    check_no_growth(before, settled(before), 48)


@pytest.mark.slow
def test_interrupted_mid_run_releases_everything(backend_name):
    """A KeyboardInterrupt in the middle of run_many: running VMs are paused and closed, waiting ones never
    start, every thread and worker is gone, and it does not wait for the VMs' 30 s budgets."""
    list(run_many([VmSpec("warm", "hello64", backend=backend_name)]))
    before = quiet()
    specs = [VmSpec(f"loop{i}", "forever64", backend=backend_name) for i in range(12)]
    fleet = Fleet(specs, timeout=30.0, max_parallel=8)
    seen = []
    timer = threading.Timer(1.5, _thread.interrupt_main)
    started = time.monotonic()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        for outcome in fleet.run():
            seen.append(outcome)
    took = time.monotonic() - started
    timer.join()
    assert seen == []  # nothing ended on its own before the interrupt
    assert took < 10.0
    states = [row.state for row in fleet.statuses()]
    assert states.count(VmState.PAUSED) + states.count(VmState.NOT_RUN) == 12, states
    assert states.count(VmState.NOT_RUN) >= 4  # max_parallel=8: four never started
    check_no_growth(before, settled(before), 12)


@pytest.mark.slow
def test_stopping_early_closes_the_rest(backend_name):
    specs = [VmSpec("quick", "hello64", backend=backend_name)] + [
        VmSpec(f"loop{i}", "forever64", backend=backend_name) for i in range(4)]
    list(run_many(specs[:1]))
    before = quiet()
    iterator = run_many(specs, timeout=30.0)
    first = next(iterator)
    assert first.name == "quick"
    started = time.monotonic()
    iterator.close()  # the caller stops iterating: the loops are paused and closed now
    assert time.monotonic() - started < 10.0
    check_no_growth(before, settled(before), 5)
