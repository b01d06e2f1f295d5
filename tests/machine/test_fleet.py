"""labkit.fleet: many VMs at once, each with its own outcome; limits checked before anything starts."""

from __future__ import annotations

import threading
import time

import pytest

from labkit import Machine
from labkit.errors import ConfigError, LimitError
from labkit.fleet import Fleet, FleetLimits, VmSpec, VmState, run_many
from labkit.vmm.status import StatusKind

MIXED = ["hello64", "forever64", "triplefault64", "fault64", "compute64", "exit64"]


def test_many_vms_each_end_their_own_way(backend_name):
    specs = [VmSpec(f"vm{i:02}", MIXED[i % len(MIXED)], backend=backend_name) for i in range(16)]
    fleet = Fleet(specs, timeout=1.0)
    order = [outcome.name for outcome in fleet.run()]
    assert sorted(order) == [spec.name for spec in specs]
    outcomes = {outcome.name: outcome for outcome in fleet.outcomes()}
    expected = {"hello64": StatusKind.HALTED, "forever64": StatusKind.TIMEOUT, "triplefault64": StatusKind.SHUTDOWN,
                "fault64": StatusKind.FAULT, "compute64": StatusKind.EXITED, "exit64": StatusKind.EXITED}
    for spec in specs:
        outcome = outcomes[spec.name]
        assert outcome.status is expected[spec.guest], (spec, outcome.reason)
        assert outcome.backend == backend_name and outcome.error == ""
        assert outcome.result is not None and outcome.result.backend == backend_name
        assert 0 <= outcome.created_s <= outcome.started_s <= outcome.ended_s
    assert outcomes["vm00"].console == "Hello from 64-bit mode!\n"
    assert outcomes["vm03"].result.status.fault.vector == 6
    assert outcomes["vm05"].result.status.code == 42
    assert "collatz" in outcomes["vm04"].console
    # The forever loops ran at the same time as the rest: the whole fleet took about one timeout, not three.
    assert max(outcome.ended_s for outcome in outcomes.values()) < 3 * 1.0 + 1.5
    states = {row.name: row.state for row in fleet.statuses()}
    assert states["vm01"] is VmState.TIMEOUT and states["vm02"] is VmState.SHUTDOWN and states["vm03"] is VmState.FAULT
    assert all(row.reason for row in fleet.statuses())


def test_outcomes_stream_as_vms_end(backend_name):
    specs = [VmSpec("slow", "forever64", backend=backend_name, timeout=2.0),
             VmSpec("fast", "hello64", backend=backend_name)]
    first = next(iter(run_many(specs)))
    assert first.name == "fast" and first.ended_s < 1.9


def test_live_statuses_show_running_vms(backend_name):
    specs = [VmSpec(f"loop{i}", "forever64", backend=backend_name) for i in range(3)]
    fleet = Fleet(specs, timeout=1.5)
    seen: list[set[VmState]] = []

    def watch() -> None:
        for _ in range(25):
            seen.append({row.state for row in fleet.statuses()})
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    outcomes = list(fleet.run())
    watcher.join()
    assert any(VmState.RUNNING in states for states in seen)
    assert [row.state for row in fleet.statuses()] == [VmState.TIMEOUT] * 3
    assert all(outcome.status is StatusKind.TIMEOUT for outcome in outcomes)


def test_max_parallel_runs_at_most_that_many(backend_name):
    specs = [VmSpec(f"loop{i}", "forever64", backend=backend_name, timeout=0.5) for i in range(4)]
    outcomes = sorted(run_many(specs, max_parallel=2), key=lambda outcome: outcome.started_s)
    for later in outcomes[2:]:  # a third VM starts only once one of the first two has ended
        assert later.started_s >= min(outcome.ended_s for outcome in outcomes[:2])


def test_parameters_reach_the_guest(backend_name):
    import struct

    block = struct.pack("<II", 0x42505156, 100)  # uart_console64: magic, 100 bytes
    [outcome] = run_many([VmSpec("uart", "uart_console64", backend=backend_name, parameters=block)])
    assert outcome.status is StatusKind.EXITED and len(outcome.console) == 100


def test_trace_is_bounded_and_counts_the_rest(backend_name):
    import struct

    block = struct.pack("<II", 0x42505156, 3000)  # two port exits per byte
    [outcome] = run_many([VmSpec("uart", "uart_console64", backend=backend_name, parameters=block,
                                 trace_limit=100)])
    assert outcome.status is StatusKind.EXITED
    assert len(outcome.result.trace.records) == 100
    assert outcome.trace_dropped >= 6000 - 100
    assert outcome.result.exits["IO"] >= 6000  # the counters go on past the bound


def test_a_vm_that_cannot_be_made_is_an_error_outcome_not_a_crash(backend_name):
    specs = [VmSpec("bad-params", "hello64", backend=backend_name, memory=1 << 20, parameters=b"x" * (2 << 20)),
             VmSpec("good", "hello64", backend=backend_name)]
    outcomes = {outcome.name: outcome for outcome in run_many(specs)}
    assert outcomes["bad-params"].status is StatusKind.ERROR and outcomes["bad-params"].result is None
    assert "guest" in outcomes["bad-params"].error.lower() or "memory" in outcomes["bad-params"].error.lower()
    assert outcomes["good"].status is StatusKind.HALTED


@pytest.mark.unit
def test_limits_are_checked_before_anything_starts():
    with pytest.raises(LimitError, match=r"FleetLimits\.max_vms.*max_vms=5"):
        Fleet([VmSpec(f"v{i}", "hello64", backend="emu") for i in range(5)], limits=FleetLimits(max_vms=4))
    with pytest.raises(LimitError, match=r"FleetLimits\.memory_per_vm.*memory_per_vm=8388608"):
        Fleet([VmSpec("big", "hello64", backend="emu", memory=8 << 20)], limits=FleetLimits(memory_per_vm=4 << 20))
    with pytest.raises(LimitError, match=r"FleetLimits\.memory_total.*lower max_parallel"):
        Fleet([VmSpec(f"v{i}", "hello64", backend="emu", memory=4 << 20) for i in range(4)],
              limits=FleetLimits(memory_total=12 << 20))
    Fleet([VmSpec(f"v{i}", "hello64", backend="emu", memory=4 << 20) for i in range(4)], max_parallel=3,
          limits=FleetLimits(memory_total=12 << 20))  # three at once fit
    with pytest.raises(LimitError, match=r"FleetLimits\.max_parallel"):
        Fleet([VmSpec("v", "hello64", backend="emu")], max_parallel=9, limits=FleetLimits(max_parallel=8))
    with pytest.raises(ConfigError, match="unique"):
        Fleet([VmSpec("same", "hello64", backend="emu"), VmSpec("same", "exit64", backend="emu")])
    with pytest.raises(ConfigError, match="no shipped guest"):
        Fleet([VmSpec("x", "no-such-guest", backend="emu")])
    with pytest.raises(ConfigError):
        VmSpec("x", "hello64", timeout=-1)
    with pytest.raises(ConfigError):
        Fleet([])
    with pytest.raises(ConfigError):
        FleetLimits(max_vms=0)
