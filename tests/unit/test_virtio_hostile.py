"""Hostile virtqueues against the virtio console: a fixed sample of labkit.virtio.hostile's random rings.

benchmarks/fuzz_virtqueue.py runs the full 10,000; this runs 500 with a fixed seed, so a
failure names a case that can be rebuilt (``random_ring(random.Random(SEED))`` in order).
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from labkit.virtio.hostile import FAULTS, RAM_SIZE, check_outcome, random_ring, run_on_device, write_ring

pytestmark = pytest.mark.unit

SEED = 20261130
SAMPLE = 500


def test_500_random_rings_each_get_the_answer_the_generator_knows():
    rng = random.Random(SEED)
    kinds: Counter[str] = Counter()
    failures = []
    for number in range(SAMPLE):
        case = random_ring(rng)
        kinds[case.fault] += 1
        for native in (True, False):  # the C drain where it is built (and Python after it), and Python alone
            ram = bytearray(RAM_SIZE)
            write_ring(ram, case)
            before = bytes(ram)
            device, console = run_on_device(ram, case, native=native)  # never raises: a raise fails right here
            problems = check_outcome(case, device, console, before, ram)
            if case.bad and not device.error:
                problems.append("a bad ring with no error message")
            if problems:
                failures.append(f"case {number} ({case.fault}, native={native}): {'; '.join(problems)}")
    assert not failures, "\n".join(failures[:10])
    assert set(kinds) == set(FAULTS) | {"valid"}, f"faults never drawn: {set(FAULTS) - set(kinds)}"
    assert kinds["valid"] >= SAMPLE // 8


@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_alone_needs_a_reset(fault):
    rng = random.Random(fault)
    for _ in range(10):
        case = random_ring(rng, fault)
        ram = bytearray(RAM_SIZE)
        write_ring(ram, case)
        before = bytes(ram)
        device, console = run_on_device(ram, case)
        assert check_outcome(case, device, console, before, ram) == []
        assert device.needs_reset and device.error


def run(case):
    ram = bytearray(RAM_SIZE)
    write_ring(ram, case)
    before = bytes(ram)
    device, console = run_on_device(ram, case)
    return check_outcome(case, device, console, before, ram), device


def test_the_oracle_notices_a_device_that_skips_a_check(monkeypatch):
    """If the device stopped checking flags, the sample would say so (the oracle is not the device's)."""
    import labkit.virtio.ring

    monkeypatch.setattr(labkit.virtio.ring, "VIRTQ_DESC_FLAGS", 0xFFFF)
    problems, device = run(random_ring(random.Random(1), "unknown_flag"))
    assert not device.needs_reset and any("needs_reset is False" in problem for problem in problems)


def test_a_buffer_past_ram_is_refused_by_guest_memory_itself(monkeypatch):
    """The device reads a buffer only through GuestMemory.read, whose range check is the one that refuses it
    (``contains``, which the device uses for ring areas and indirect tables, plays no part here)."""
    from labkit.memory import GuestMemory

    monkeypatch.setattr(GuestMemory, "contains", lambda self, address, size: True)
    rng = random.Random(1)
    for _ in range(5):
        case = random_ring(rng, "length_past_ram")
        problems, device = run(case)
        assert problems == [] and "is not inside guest memory" in device.error
