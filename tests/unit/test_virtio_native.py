"""labkit.virtio.native: the transmit queue's C drain gives what the Python drain gives, chain for chain.

The hostile-ring sample (test_virtio_hostile.py) runs both paths against the generator's
answers, but its chains are mostly several descriptors long, which the C drain hands to
Python at once.  Here every ring is made of one-buffer chains, the case C takes, with
at most one thing wrong where C must stop (an index past the ring, a zero length, a
buffer past RAM or wrapping past 2**64, a flag, an available idx too far ahead) or a
buffer in a second memory region, which C leaves to Python although it is valid.  Both
paths run on copies of the same RAM; the console, its dropped count, the ring's
indexes, the result and every byte of RAM must come out the same.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from labkit.memory import GuestMemory
from labkit.native import compiler
from labkit.virtio import native
from labkit.virtio.ring import VIRTQ_DESC_F_WRITE, Descriptor, DeviceQueue, DriverQueue, QueueLayout
from labkit.vmm.devices.console import Console

pytestmark = pytest.mark.unit

RAM = 1 << 20
HIGH = (0x4000_0000, 1 << 16)
"""A second region (base, size): valid buffers there go through Python."""
FAULTS = ("head_past_ring", "zero_length", "past_ram", "wraps", "flag", "avail_too_far", "high_region", None)


def test_the_c_drain_is_built_and_matches_its_mirror():
    if compiler() is None:
        pytest.skip("no C compiler on this machine: every chain goes through Python (native.status() says so)")
    library = native.load()
    assert library is not None, native.status()
    assert native.layout_of(library) == native.expected_layout()
    assert native.status().startswith("C drain")


def one_buffer_ring(rng: random.Random, fault: str | None) -> tuple[QueueLayout, list[tuple[int, bytes]], int]:
    """A queue of one-buffer chains, one of them (if ``fault``) wrong: its layout, RAM writes and avail idx."""
    size = rng.choice([1, 2, 8, 64, 256])
    layout = QueueLayout(size, 0x1000, 0x2000, 0x3000)
    writes: list[tuple[int, bytes]] = []
    chains = rng.randint(1, size)
    heads = rng.sample(range(size), chains)  # each descriptor names one chain's buffer
    start = rng.randrange(1 << 16)
    at = rng.randrange(chains)
    address = 0x10000
    for position, head in enumerate(heads):
        length = rng.choice([1, 7, 256, 4096, rng.randint(1, 3000)])
        data = rng.randbytes(length)
        descriptor = Descriptor(address, length, 0, 0)
        writes.append((address, data))
        address += length
        if position == at and fault in ("head_past_ring", "zero_length", "past_ram", "wraps", "flag", "high_region"):
            head = size + rng.randrange(1000) if fault == "head_past_ring" else head
            descriptor = {
                "zero_length": Descriptor(descriptor.addr, 0, 0, 0),
                "past_ram": Descriptor(RAM - rng.randint(0, 100), rng.randint(101, 5000), 0, 0),
                "wraps": Descriptor((1 << 64) - rng.randint(1, 4096), 8192, 0, 0),
                "flag": Descriptor(descriptor.addr, length, rng.choice([VIRTQ_DESC_F_WRITE, 8, 0x8000]), 0),
                "high_region": Descriptor(HIGH[0] + 16, min(length, HIGH[1] - 16), 0, 0),
            }.get(fault, descriptor)
        if head < size:
            writes.append((layout.desc + 16 * head, descriptor.encode()))
        writes.append((layout.avail + 4 + 2 * ((start + position) % size), head.to_bytes(2, "little")))
    avail_idx = (start + chains + (size + 1 if fault == "avail_too_far" else 0)) & 0xFFFF
    writes.append((layout.avail + 2, avail_idx.to_bytes(2, "little")))
    return layout, writes, start


def drain_once(layout, writes, start, sink_kind: str, capacity: int):
    ram, high = bytearray(RAM), bytearray(HIGH[1])
    memory = GuestMemory([(0, memoryview(ram), False), (HIGH[0], memoryview(high), False)])
    for address, data in writes:
        if address + len(data) <= RAM:
            memory.write(address, data)
    queue = DeviceQueue(memory, layout, writable=False, last_avail=start, used_idx=start)
    console = Console(capacity)
    sink = console if sink_kind == "native" else console.extend
    chains, moved, error = queue.drain(sink)
    return (chains, moved, str(error) if error else None, queue.last_avail, queue.used_idx, console.output,
            console.dropped, bytes(ram), bytes(high)), queue


@pytest.mark.parametrize("fault", FAULTS, ids=lambda fault: fault or "valid")
def test_c_and_python_drain_agree_on_one_buffer_rings(fault):
    if native.load() is None:
        pytest.skip(f"the C drain is not built here: {native.status()}")
    rng = random.Random(f"native-{fault}")
    taken_by_c = 0
    for case in range(60):
        layout, writes, start = one_buffer_ring(rng, fault)
        capacity = rng.choice([1 << 20, rng.randint(0, 30000)])  # a console that fills up drops the rest
        with_c, queue = drain_once(layout, writes, start, "native", capacity)
        python, _ = drain_once(layout, writes, start, "python", capacity)
        assert with_c == python, f"case {case}: C and Python differ"
        taken_by_c += queue._native is not None and queue._native.state.moved > 0
        if fault not in (None, "high_region"):
            assert with_c[2] is not None, f"case {case}: a {fault} ring drained without an error"
    if fault == "avail_too_far":  # C takes nothing of a ring that is wrong as a whole
        assert taken_by_c == 0
    else:
        assert taken_by_c > 0, "the C drain never took a chain: this test compared Python with itself"


def test_a_console_filled_by_c_counts_what_it_drops():
    if native.load() is None:
        pytest.skip(f"the C drain is not built here: {native.status()}")
    ram = bytearray(RAM)
    memory = GuestMemory([(0, memoryview(ram), False)])
    layout = QueueLayout(8, 0x1000, 0x2000, 0x3000)
    driver = DriverQueue(memory, layout)
    driver.clear()
    for index in range(3):
        memory.write(0x10000 + 0x2000 * index, bytes([65 + index]) * 4096)
        driver.add_chain([(0x10000 + 0x2000 * index, 4096)], index)
    driver.publish()
    console = Console(capacity=5000)
    queue = DeviceQueue(memory, layout, writable=False)
    assert queue.drain(console) == (3, 3 * 4096, None)
    assert queue._native is not None
    assert console.output == b"A" * 4096 + b"B" * 904 and console.dropped == 2 * 4096 - 904
    assert driver.used_idx() == 3 and [driver.used_element(slot) for slot in range(3)] == [(0, 0), (1, 0), (2, 0)]


def test_labkit_native_0_drains_in_python_alone():
    script = ("from labkit.virtio import native\n"
              "from labkit.virtio.hostile import RAM_SIZE, random_ring, run_on_device, write_ring\n"
              "import random\n"
              "assert native.load() is None\n"
              "case = random_ring(random.Random(3), None)\n"
              "ram = bytearray(RAM_SIZE)\n"
              "write_ring(ram, case)\n"
              "device, console = run_on_device(ram, case)\n"
              "assert console == case.expected_console and not device.needs_reset\n"
              "print(native.status())\n")
    out = subprocess.run([sys.executable, "-c", script], env={**os.environ, "LABKIT_NATIVE": "0"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Python only: turned off by LABKIT_NATIVE=0"
