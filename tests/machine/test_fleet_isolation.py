"""The fleet under stress: faults contained, timeouts honoured, consoles bounded (issue 11, items 1, 3 and 7)."""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest
from fleet_guests import console_flood, port_hammer, random_bytes, wild_writes

from labkit import Machine
from labkit.fleet import VmSpec, run_many
from labkit.vmm.devices.console import DEFAULT_CAPACITY
from labkit.vmm.status import StatusKind

UART_PARAMETERS = struct.pack("<II", 0x42505156, 4096)  # uart_console64: 4 KiB of text
HEALTHY = {"hello16": b"", "hello32": b"", "hello64": b"", "compute64": b"", "exit64": b"", "rings64": b"",
           "minikernel64": b"", "uart_console64": UART_PARAMETERS,
           "memtouch64": struct.pack("<QQQ", 64, 8, 0)}


def faulty():
    return {"triplefault": ("triplefault64", {StatusKind.SHUTDOWN}),
            "forever": ("forever64", {StatusKind.TIMEOUT}),
            "flood": (console_flood(16), {StatusKind.EXITED}),
            "hammer": (port_hammer(), {StatusKind.ERROR, StatusKind.TIMEOUT}),
            "wild": (wild_writes(), {StatusKind.HALTED, StatusKind.TIMEOUT}),
            "random": (random_bytes(), {StatusKind.FAULT, StatusKind.SHUTDOWN, StatusKind.ERROR, StatusKind.TIMEOUT,
                                        StatusKind.HALTED}),
            "ud2": ("fault64", {StatusKind.FAULT})}


@pytest.mark.slow
def test_sixteen_vms_faulty_ones_contained_healthy_ones_as_alone(backend_name):
    """In one run of 16 VMs, 7 misbehave; the 9 healthy ones end with the console and registers of their solo run."""
    solo = {}
    for name, parameters in HEALTHY.items():
        with Machine(name, backend_name) as machine:
            if parameters:
                machine.write_memory(0x80000, parameters)
            solo[name] = machine.run(10.0)
            assert solo[name].status.kind in (StatusKind.HALTED, StatusKind.EXITED), (name, solo[name].status)
    bad = faulty()
    specs = [VmSpec(name, name, backend=backend_name, parameters=parameters) for name, parameters in HEALTHY.items()]
    specs += [VmSpec(name, guest, backend=backend_name, timeout=3.0) for name, (guest, _) in bad.items()]
    assert len(specs) == 16
    # The healthy ones get a generous budget: 16 VMs share 2 cores (and, on KVM, one GIL for exit handling).
    outcomes = {outcome.name: outcome for outcome in run_many(specs, timeout=30.0)}
    assert len(outcomes) == 16
    for name, alone in solo.items():
        outcome = outcomes[name]
        assert outcome.status is alone.status.kind and outcome.error == "", (name, outcome.reason)
        assert outcome.result.console == alone.console, name
        assert outcome.result.regs == alone.regs, name
    for name, (_, allowed) in bad.items():
        outcome = outcomes[name]
        assert outcome.status in allowed, (name, outcome.reason)
        assert outcome.reason  # a clear per-VM status line
    assert outcomes["flood"].console_dropped == (16 << 20) - DEFAULT_CAPACITY
    assert len(outcomes["flood"].console) == DEFAULT_CAPACITY
    assert outcomes["triplefault"].reason == "shutdown (triple fault)"
    assert "3 s budget" in outcomes["forever"].reason


@pytest.mark.slow
def test_sixteen_vms_every_timeout_honoured_within_half_a_second(backend_name):
    """16 VMs that never stop (ring-0 and ring-3 loops, a port-I/O flood, ring-3 stores over 1 MiB) on 2 cores:
    each run returns within 0.5 s of its budget, with status timeout, never an error."""
    endless = {"forever64": b"", "uart_console64": struct.pack("<II", 0x42505156, 0xFFFFFFFF),
               "forever_user64": b"", "memtouch64": struct.pack("<QQQ", 256, 1 << 40, 0)}
    guests = list(endless)
    specs = [VmSpec(f"vm{i:02}", guests[i % 4], backend=backend_name, parameters=endless[guests[i % 4]])
             for i in range(16)]
    budget = 2.0
    outcomes = list(run_many(specs, timeout=budget))
    assert len(outcomes) == 16
    late = {outcome.name: round(outcome.run_s - budget, 3) for outcome in outcomes}
    assert all(outcome.status is StatusKind.TIMEOUT for outcome in outcomes), [o.reason for o in outcomes]
    assert max(late.values()) <= 0.5, late
    assert min(late.values()) >= 0.0, late
    # they ran at once: the whole fleet took about one budget, not 16
    assert max(outcome.ended_s for outcome in outcomes) < 2 * budget + 2.0


def _rss_kib(pid: int | str = "self", field: str = "VmRSS") -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _children() -> list[int]:
    pids = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as children:
                pids += [int(pid) for pid in children.read().split()]
        except FileNotFoundError:
            continue
    return pids


@pytest.mark.slow
def test_a_100_mb_console_flood_costs_the_host_at_most_16_mb(backend_name):
    """The flood guest passes 100 MiB to its console; the caller's resident memory (and on emulation the
    worker's) grows by at most 16 MiB: the console keeps 1 MiB and counts the rest as dropped."""
    flood = console_flood(100)
    run_many([VmSpec("warm-up", "hello64", backend=backend_name)]).__next__()  # imports, first VM's set-up
    baseline = _rss_kib()
    peak = {"self": baseline, "workers": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["self"] = max(peak["self"], _rss_kib())
            for pid in _children():
                peak["workers"] = max(peak["workers"], _rss_kib(pid, "VmHWM"))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        [outcome] = run_many([VmSpec("flood", flood, backend=backend_name)], timeout=60.0)
    finally:
        done.set()
        sampler.join()
    assert outcome.status is StatusKind.EXITED and outcome.result.status.code == 7, outcome.reason
    assert outcome.console_dropped + len(outcome.console) == 100 << 20
    assert (peak["self"] - baseline) <= 16 * 1024, (baseline, peak)
    if backend_name == "emu":
        assert peak["workers"] > 0  # the sampler saw the worker
        # A forked worker starts with the caller's pages (shared); what it adds must stay under 16 MiB too.
        assert peak["workers"] - baseline <= 16 * 1024, (baseline, peak)
