"""Hostile virtqueues: random rings, some with one thing wrong, and what the device must do with each.

The VENOM lesson (CVE-2015-3456: a floppy controller trusted an index from the
guest) applied to a ring.  :func:`random_ring` builds a random split virtqueue
(virtio 1.x, 2.7) of random size with random chains (direct and indirect),
random buffers and garbage in the descriptors nobody uses, and, unless it is
``"valid"``, exactly one fault of a kind from :data:`FAULTS`: an index past the
ring, a ``next`` past the table, a loop, a buffer past RAM or wrapping past
2**64, a zero length, a device-writable buffer on the transmit queue, an unknown
flag, an available ``idx`` too far ahead, INDIRECT misused, a queue size or area
the device must refuse.  Because the generator put the fault there itself, it
knows the answer without asking the device: which chains come before it (their
bytes must reach the console and their heads the used ring), and that the device
must then need a reset.

:func:`run_on_device` drives a :class:`labkit.virtio.console.VirtioConsole`
through its virtio-mmio registers as a driver would, over RAM that is a host
``bytearray``.  ``tests/unit/test_virtio_hostile.py`` checks a fixed sample,
``benchmarks/fuzz_virtqueue.py`` the full 10,000.  :func:`run_on_machine` sends a
ring through a real machine instead: :data:`HOSTILE_DRIVER`, a guest, sets the
queue up and notifies, and the device runs where the guest runs (the
emulator's worker process, or beside KVM).
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from labkit.errors import ConfigError
from labkit.memory import GuestMemory
from labkit.virtio import transport as t
from labkit.virtio.console import TRANSMITQ, VirtioConsole
from labkit.virtio.ring import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_SIZE,
                                Descriptor, QueueLayout, used_ring_size)
from labkit.vmm.devices.console import Console
from labkit.x86 import layout

QUEUE_BASE = 0x81000
"""The descriptor table; the available ring follows at +0x1000 and the used ring at +0x2000."""
INDIRECT_AREA = (0x84000, 0x88000)
BUFFER_AREA = (0x90000, 0x1F0000)
"""Buffers never overlap each other, so each chain's bytes are known."""
RAM_SIZE = 2 << 20
"""The guest RAM the rings are made for: labkit's default 2 MiB."""
DRIVER_PARAMS = 0x80000
"""Where :data:`HOSTILE_DRIVER` reads u32 size, u32 features 0-31, u64 desc, u64 avail, u64 used."""

RING_FAULTS = ("avail_idx_too_far", "size_not_power_of_2", "size_above_max", "size_zero", "desc_misaligned",
               "avail_misaligned", "used_misaligned", "area_past_ram")
"""Faults of the ring itself: nothing may be consumed."""
CHAIN_FAULTS = ("head_past_ring", "next_past_table", "loop", "length_past_ram", "addr_past_ram", "addr_wraps",
                "zero_length", "write_flag", "unknown_flag", "indirect_not_negotiated", "indirect_bad_length",
                "indirect_with_next", "indirect_nested", "indirect_past_ram", "indirect_next_past_table",
                "indirect_loop")
"""Faults of one chain: the chains before it are consumed, it and those after are not."""
FAULTS = RING_FAULTS + CHAIN_FAULTS

if TYPE_CHECKING:
    from labkit.guest import Guest

_U16 = struct.Struct("<H")
U64 = 1 << 64


@dataclass
class HostileRing:
    """One generated virtqueue and the answer the device must give."""

    fault: str
    """``"valid"`` or one of :data:`FAULTS`."""
    layout: QueueLayout
    indirect: bool
    """Whether the driver negotiates VIRTIO_F_INDIRECT_DESC."""
    start: int
    """The free-running index both rings start at (the device's last_avail and used idx)."""
    avail_idx: int
    writes: list[tuple[int, bytes]] = field(default_factory=list)
    """``(address, bytes)`` the driver stored in RAM: descriptors, ring slots, indirect tables, buffers."""
    expected_console: bytes = b""
    expected_heads: list[int] = field(default_factory=list)

    @property
    def bad(self) -> bool:
        return self.fault != "valid"

    @property
    def used_area(self) -> tuple[int, int]:
        """``[start, end)`` of the used ring: the only memory the device may write."""
        size = max(self.layout.size, 1)
        return self.layout.used, self.layout.used + used_ring_size(size)


class _Builder:
    def __init__(self, rng: random.Random, size: int, indirect: bool):
        self.rng = rng
        self.size = size
        self.indirect = indirect
        self.desc: dict[int, Descriptor] = {}
        self.tables: list[tuple[int, list[Descriptor]]] = []
        self.buffers: list[tuple[int, bytes]] = []
        self.free = list(range(size))
        rng.shuffle(self.free)
        self.table_next = INDIRECT_AREA[0]
        self.buffer_next = BUFFER_AREA[0]

    def room(self, buffers: int) -> bool:
        """Whether ``buffers`` more buffers surely fit in the buffer area (each at most 364 bytes with its gap)."""
        return self.buffer_next + 364 * buffers <= BUFFER_AREA[1]

    def buffer(self) -> tuple[int, int, bytes]:
        length = self.rng.randint(1, 300)
        address = self.buffer_next + self.rng.randint(0, 63)
        self.buffer_next = address + length
        data = self.rng.randbytes(length)
        self.buffers.append((address, data))
        return address, length, data

    def chain(self) -> tuple[int, bytes, list[int], int | None] | None:
        """A valid chain: (head, its bytes, its descriptor indexes, the address of its indirect table)."""
        use_table = self.indirect and self.rng.random() < 0.3 and self.free
        if use_table:
            entries = self.rng.randint(1, 8)
            if self.table_next + VIRTQ_DESC_SIZE * entries > INDIRECT_AREA[1] or not self.room(entries + 1):
                return None
            table_address = self.table_next
            self.table_next += VIRTQ_DESC_SIZE * entries
            table, data = [], b""
            for entry in range(entries):
                address, length, chunk = self.buffer()
                last = entry == entries - 1
                table.append(Descriptor(address, length, 0 if last else VIRTQ_DESC_F_NEXT, 0 if last else entry + 1))
                data += chunk
            self.tables.append((table_address, table))
            head = self.free.pop()
            self.desc[head] = Descriptor(table_address, VIRTQ_DESC_SIZE * entries, VIRTQ_DESC_F_INDIRECT, 0)
            return head, data, [head], table_address
        length = min(self.rng.randint(1, 4), len(self.free))
        if not length or not self.room(length + 1):
            return None
        indexes = [self.free.pop() for _ in range(length)]
        data = b""
        for position, index in enumerate(indexes):
            address, size, chunk = self.buffer()
            last = position == length - 1
            self.desc[index] = Descriptor(address, size, 0 if last else VIRTQ_DESC_F_NEXT,
                                          0 if last else indexes[position + 1])
            data += chunk
        return indexes[0], data, indexes, None

    def table_of(self, address: int) -> list[Descriptor]:
        return next(table for base, table in self.tables if base == address)


def random_ring(rng: random.Random, fault: str | None = None, *, start_at_zero: bool = False) -> HostileRing:
    """A random virtqueue; ``fault`` ``None`` picks ``"valid"`` a quarter of the time, else a random fault."""
    if fault is None:
        fault = "valid" if rng.random() < 0.25 else rng.choice(FAULTS)
    if fault not in FAULTS and fault != "valid":
        raise ConfigError(f"unknown fault {fault!r}; the faults are {', '.join(FAULTS)}")
    if fault.startswith("indirect_") and fault != "indirect_not_negotiated":
        indirect = True
    elif fault == "indirect_not_negotiated":
        indirect = False
    else:
        indirect = rng.random() < 0.5
    size = 1 << rng.randint(0, 8)
    start = 0 if start_at_zero else rng.choice([0, rng.randrange(1 << 16), 0xFFFF - rng.randrange(4)])
    layout = QueueLayout(size, QUEUE_BASE, QUEUE_BASE + 0x1000, QUEUE_BASE + 0x2000)
    builder = _Builder(rng, size, indirect)
    chains = []
    for _ in range(rng.randint(1, size)):
        chain = builder.chain()
        if chain is None:
            break
        chains.append(chain)
    case = HostileRing(fault, layout, indirect, start, (start + len(chains)) & 0xFFFF)
    heads = [chain[0] for chain in chains]
    victim = rng.randrange(len(chains)) if chains else 0
    consumed = len(chains)
    if fault in RING_FAULTS:
        consumed = 0
        _ring_fault(rng, case, fault, len(chains))
    elif fault != "valid":
        if not chains:  # every fault of a chain needs one; a queue of size 1 always has it
            raise AssertionError("no chain to put a fault in")
        consumed = victim
        _chain_fault(rng, builder, case, fault, chains[victim])
    # Garbage in every descriptor no chain uses: the device must not read it.
    for index in builder.free:
        builder.desc[index] = Descriptor.decode(rng.randbytes(VIRTQ_DESC_SIZE))
    for index, descriptor in builder.desc.items():
        case.writes.append((layout.desc + VIRTQ_DESC_SIZE * index, descriptor.encode()))
    for base, table in builder.tables:
        case.writes.append((base, b"".join(entry.encode() for entry in table)))
    slots = bytearray(rng.randbytes(2 * size))  # slots past the published idx hold garbage too
    for position, head in enumerate(heads):
        _U16.pack_into(slots, 2 * ((start + position) % size), head)
    if fault == "head_past_ring":
        _U16.pack_into(slots, 2 * ((start + victim) % size), rng.randint(size, 0xFFFF))
    case.writes.append((layout.avail, _U16.pack(rng.randint(0, 1)) + _U16.pack(case.avail_idx) + bytes(slots)))
    case.writes.extend(builder.buffers)
    case.expected_console = b"".join(chain[1] for chain in chains[:consumed])
    case.expected_heads = heads[:consumed]
    return case


def _ring_fault(rng: random.Random, case: HostileRing, fault: str, chains: int) -> None:
    layout = case.layout
    if fault == "avail_idx_too_far":
        case.avail_idx = (case.start + layout.size + rng.randint(1, 0xFFFF - layout.size)) & 0xFFFF
    elif fault == "size_not_power_of_2":
        size = rng.choice([3, 5, 6, 7, 12, 100, 255])
        case.layout = QueueLayout(size, layout.desc, layout.avail, layout.used)
    elif fault == "size_above_max":
        case.layout = QueueLayout(rng.choice([512, 1024, 32768, 65536, 1 << 31]), layout.desc, layout.avail,
                                  layout.used)
    elif fault == "size_zero":
        case.layout = QueueLayout(0, layout.desc, layout.avail, layout.used)
    elif fault == "desc_misaligned":
        case.layout = QueueLayout(layout.size, layout.desc + rng.randint(1, 15), layout.avail, layout.used)
    elif fault == "avail_misaligned":
        case.layout = QueueLayout(layout.size, layout.desc, layout.avail + 1, layout.used)
    elif fault == "used_misaligned":
        case.layout = QueueLayout(layout.size, layout.desc, layout.avail, layout.used + rng.choice([1, 2, 3]))
    elif fault == "area_past_ram":
        which = rng.randrange(3)  # an aligned area that ends past RAM (even the 8 bytes of a 1-entry avail ring)
        areas = [layout.desc, layout.avail, layout.used]
        areas[which] = rng.choice([RAM_SIZE, 1 << 40, U64 - 16] + ([RAM_SIZE - 4] if which else []))
        case.layout = QueueLayout(layout.size, *areas)


def _chain_fault(rng: random.Random, builder: _Builder, case: HostileRing, fault: str,
                 chain: tuple[int, bytes, list[int], int | None]) -> None:
    head, _data, indexes, table_address = chain
    desc = builder.desc
    if fault.startswith("indirect_") and fault != "indirect_not_negotiated":
        _indirect_fault(rng, builder, fault, head)
        return
    if fault == "head_past_ring":
        return  # written with the slots
    if fault == "indirect_not_negotiated":
        index = indexes[-1]
        desc[index] = _with(desc[index], flags=desc[index].flags | VIRTQ_DESC_F_INDIRECT)
        return
    if table_address is not None:  # the chain is one INDIRECT descriptor: put the fault in its table
        table = builder.table_of(table_address)
        _descriptor_fault(rng, fault, table, len(table), list(range(len(table))))
        return
    _descriptor_fault(rng, fault, desc, builder.size, indexes)


def _descriptor_fault(rng: random.Random, fault: str, table: dict[int, Descriptor] | list[Descriptor], entries: int,
                      indexes: list[int]) -> None:
    """Put ``fault`` into one of the descriptors ``indexes`` of a chain in ``table`` (``entries`` long)."""
    position = rng.randrange(len(indexes))
    index = indexes[position]
    old = table[index]
    if fault == "next_past_table":
        table[index] = _with(old, flags=old.flags | VIRTQ_DESC_F_NEXT, next=rng.randint(entries, 0xFFFF))
    elif fault == "loop":
        last = indexes[-1]
        table[last] = _with(table[last], flags=table[last].flags | VIRTQ_DESC_F_NEXT, next=rng.choice(indexes))
    elif fault == "length_past_ram":
        address = rng.randrange(BUFFER_AREA[0], RAM_SIZE)
        table[index] = _with(old, addr=address, len=min(RAM_SIZE - address + rng.randint(1, 1 << 20), 0xFFFFFFFF))
    elif fault == "addr_past_ram":
        table[index] = _with(old, addr=rng.randrange(RAM_SIZE, U64))
    elif fault == "addr_wraps":
        table[index] = _with(old, addr=U64 - rng.randint(1, 4096), len=8192)
    elif fault == "zero_length":
        table[index] = _with(old, len=0)
    elif fault == "write_flag":
        table[index] = _with(old, flags=old.flags | VIRTQ_DESC_F_WRITE)
    elif fault == "unknown_flag":
        table[index] = _with(old, flags=old.flags | (1 << rng.randint(3, 15)))
    else:
        raise AssertionError(fault)


def _indirect_fault(rng: random.Random, builder: _Builder, fault: str, head: int) -> None:
    desc = builder.desc
    if desc[head].flags & VIRTQ_DESC_F_INDIRECT == 0:
        # The chain picked is direct: make its head an INDIRECT descriptor first (a valid table of one entry).
        address, length, _chunk = builder.buffer()
        table_address = builder.table_next
        builder.table_next += VIRTQ_DESC_SIZE
        builder.tables.append((table_address, [Descriptor(address, length)]))
        old_next = desc[head]
        builder.free.extend(i for i in _chain_indexes(desc, head)[1:])
        desc[head] = Descriptor(table_address, VIRTQ_DESC_SIZE, VIRTQ_DESC_F_INDIRECT, old_next.next)
    head_desc = desc[head]
    table = builder.table_of(head_desc.addr)
    if fault == "indirect_bad_length":
        desc[head] = _with(head_desc, len=rng.choice([0, head_desc.len + rng.randint(1, 15), 8]))
    elif fault == "indirect_with_next":
        desc[head] = _with(head_desc, flags=head_desc.flags | VIRTQ_DESC_F_NEXT)
    elif fault == "indirect_nested":
        index = rng.randrange(len(table))
        table[index] = _with(table[index], flags=table[index].flags | VIRTQ_DESC_F_INDIRECT)
    elif fault == "indirect_past_ram":
        desc[head] = _with(head_desc, addr=rng.choice([RAM_SIZE - 8, RAM_SIZE, 1 << 48, U64 - 16]))
    elif fault == "indirect_next_past_table":
        _descriptor_fault(rng, "next_past_table", table, len(table), list(range(len(table))))
    elif fault == "indirect_loop":
        _descriptor_fault(rng, "loop", table, len(table), list(range(len(table))))
    else:
        raise AssertionError(fault)


def _chain_indexes(desc: dict[int, Descriptor], head: int) -> list[int]:
    indexes = [head]
    while desc[indexes[-1]].flags & VIRTQ_DESC_F_NEXT:
        indexes.append(desc[indexes[-1]].next)
    return indexes


def _with(descriptor: Descriptor, **changes: int) -> Descriptor:
    fields = {"addr": descriptor.addr, "len": descriptor.len, "flags": descriptor.flags, "next": descriptor.next}
    fields.update(changes)
    return Descriptor(fields["addr"] % U64, fields["len"] & 0xFFFFFFFF, fields["flags"] & 0xFFFF,
                      fields["next"] & 0xFFFF)


def write_ring(ram: bytearray, case: HostileRing) -> None:
    """Store what the driver wrote (each range inside ``ram``)."""
    memory = GuestMemory([(0, memoryview(ram), False)])
    for address, data in case.writes:
        memory.write(address, data)


def run_on_device(ram: bytearray, case: HostileRing, *, native: bool = True) -> tuple[VirtioConsole, bytes]:
    """Set the device up over ``ram`` as the driver would (3.1.1, 4.2.3), with ``case``'s ring, and notify once.

    ``ram`` must already hold the ring (:func:`write_ring`).  Returns the device and what it sent to the console.
    ``native``: the console is a machine's :class:`Console`, which the queue drains in C where that is built
    (``labkit.virtio.native``); otherwise a plain function, which only the Python drain serves.
    """
    memory = GuestMemory([(0, memoryview(ram), False)])
    out = Console(capacity=len(ram))
    device = VirtioConsole(memory, out if native else out.extend)
    register = device.write
    register(t.STATUS, 4, 0)
    register(t.STATUS, 4, t.STATUS_ACKNOWLEDGE | t.STATUS_DRIVER)
    features = t.VIRTIO_F_VERSION_1 | (t.VIRTIO_F_INDIRECT_DESC if case.indirect else 0)
    for word in (0, 1):
        register(t.DRIVER_FEATURES_SEL, 4, word)
        register(t.DRIVER_FEATURES, 4, (features >> (32 * word)) & 0xFFFFFFFF)
    register(t.STATUS, 4, t.STATUS_ACKNOWLEDGE | t.STATUS_DRIVER | t.STATUS_FEATURES_OK)
    register(t.QUEUE_SEL, 4, TRANSMITQ)
    register(t.QUEUE_SIZE, 4, case.layout.size & 0xFFFFFFFF)
    for low, address in ((t.QUEUE_DESC_LOW, case.layout.desc), (t.QUEUE_DRIVER_LOW, case.layout.avail),
                         (t.QUEUE_DEVICE_LOW, case.layout.used)):
        register(low, 4, address & 0xFFFFFFFF)
        register(low + 4, 4, address >> 32)
    register(t.QUEUE_READY, 4, 1)
    register(t.STATUS, 4, t.STATUS_ACKNOWLEDGE | t.STATUS_DRIVER | t.STATUS_FEATURES_OK | t.STATUS_DRIVER_OK)
    if case.start and device.transmit is not None:  # start the free-running indexes where the case says
        state = device.save()
        state["last_avail"] = state["used_idx"] = case.start
        device.restore(state)
    device.notify(TRANSMITQ)
    return device, out.output


def check_outcome(case: HostileRing, device: VirtioConsole, console: bytes, before: bytes,
                  after: bytes | bytearray) -> list[str]:
    """Everything wrong with what the device did to ``case`` (empty when it behaved); ``before``/``after`` are RAM.

    The device must: need a reset exactly when the ring is bad; send exactly the
    bytes of the chains before the fault; return exactly those heads, in order,
    with ``len`` 0; and change no byte of RAM outside the used ring (none at all
    when it refused the queue itself).
    """
    problems = []
    if device.needs_reset != case.bad:
        problems.append(f"needs_reset is {device.needs_reset} for a {case.fault} ring (error: {device.error})")
    if console != case.expected_console:
        problems.append(f"console got {len(console)} bytes, not the {len(case.expected_console)} expected")
    used_start, used_end = case.used_area
    if case.fault in RING_FAULTS and case.fault != "avail_idx_too_far":
        used_start = used_end = 0  # the device never took the queue: not even a used ring may change
    used = bytes(after[used_start:used_end])
    outside = bytearray(after)
    outside[used_start:used_end] = before[used_start:used_end]
    if outside != before:
        first = next(i for i in range(len(before)) if before[i] != outside[i])
        problems.append(f"RAM outside the used ring changed (first at {first:#x})")
    if case.expected_heads:
        size = case.layout.size
        for position, head in enumerate(case.expected_heads):
            slot = (case.start + position) % size
            element = struct.unpack_from("<II", used, 4 + 8 * slot)
            if element != (head, 0):
                problems.append(f"used slot {slot} holds {element}, expected ({head}, 0)")
                break
        published = _U16.unpack_from(used, 2)[0]
        if published != (case.start + len(case.expected_heads)) & 0xFFFF:
            problems.append(f"used idx {published}, expected {(case.start + len(case.expected_heads)) & 0xFFFF}")
    return problems


HOSTILE_DRIVER = f"""
# hostile_driver: finds nothing, checks nothing: resets the virtio console, accepts VERSION_1 and the
# feature bits 0-31 at {DRIVER_PARAMS:#x} + 4, sets queue 1 up from the block at {DRIVER_PARAMS:#x}, DRIVER_OK,
# notifies once and exits with the device status as exit code. The host wrote the ring itself.
        .equ MMIO, {layout.VIRTIO_MMIO_BASE:#x}
        .equ P, {DRIVER_PARAMS:#x}
        mov ebp, MMIO
        mov dword ptr [rbp + {t.STATUS:#x}], 0
        mov dword ptr [rbp + {t.STATUS:#x}], {t.STATUS_ACKNOWLEDGE | t.STATUS_DRIVER}
        mov dword ptr [rbp + {t.DRIVER_FEATURES_SEL:#x}], 0
        mov eax, [P + 4]
        mov [rbp + {t.DRIVER_FEATURES:#x}], eax
        mov dword ptr [rbp + {t.DRIVER_FEATURES_SEL:#x}], 1
        mov dword ptr [rbp + {t.DRIVER_FEATURES:#x}], 1
        mov dword ptr [rbp + {t.STATUS:#x}], {t.STATUS_ACKNOWLEDGE | t.STATUS_DRIVER | t.STATUS_FEATURES_OK}
        mov dword ptr [rbp + {t.QUEUE_SEL:#x}], {TRANSMITQ}
        mov eax, [P]
        mov [rbp + {t.QUEUE_SIZE:#x}], eax
        mov eax, [P + 8]
        mov [rbp + {t.QUEUE_DESC_LOW:#x}], eax
        mov eax, [P + 12]
        mov [rbp + {t.QUEUE_DESC_HIGH:#x}], eax
        mov eax, [P + 16]
        mov [rbp + {t.QUEUE_DRIVER_LOW:#x}], eax
        mov eax, [P + 20]
        mov [rbp + {t.QUEUE_DRIVER_HIGH:#x}], eax
        mov eax, [P + 24]
        mov [rbp + {t.QUEUE_DEVICE_LOW:#x}], eax
        mov eax, [P + 28]
        mov [rbp + {t.QUEUE_DEVICE_HIGH:#x}], eax
        mov dword ptr [rbp + {t.QUEUE_READY:#x}], 1
        mov dword ptr [rbp + {t.STATUS:#x}], {t.STATUS_ACKNOWLEDGE | t.STATUS_DRIVER | t.STATUS_FEATURES_OK
                                              | t.STATUS_DRIVER_OK}
        mov dx, {layout.VIRTIO_NOTIFY_PORT:#x}
        mov ax, {TRANSMITQ}
        out dx, ax
        mov eax, [rbp + {t.STATUS:#x}]
        out {layout.DEBUG_EXIT_PORT:#x}, al
        hlt
"""
"""A guest that sets the transmit queue up as the driver block says and notifies once (GNU as source)."""


def run_on_machine(case: HostileRing, backend: str, driver: Guest | None = None) -> list[str]:
    """Send ``case`` through a real machine on ``backend``; everything wrong with the outcome (empty: right).

    ``case`` must start at 0 (``random_ring(..., start_at_zero=True)``: a real
    device's indexes start there).  ``driver`` is :data:`HOSTILE_DRIVER`
    assembled (pass it to save assembling it again).
    """
    from labkit.guest import Guest
    from labkit.virtio.console import DEVICE_NAME, console_devices
    from labkit.vmm.machine import Machine
    from labkit.vmm.status import StatusKind

    if case.start:
        raise ConfigError("a ring for a machine starts at index 0: make it with random_ring(rng, start_at_zero=True)")
    driver = driver or Guest.from_asm(HOSTILE_DRIVER, name="hostile_driver")
    with Machine(driver, backend=backend, memory=RAM_SIZE, devices=console_devices()) as machine:
        for address, data in case.writes:
            machine.write_memory(address, data)
        machine.write_memory(DRIVER_PARAMS, struct.pack(
            "<IIQQQ", case.layout.size & 0xFFFFFFFF, t.VIRTIO_F_INDIRECT_DESC if case.indirect else 0,
            case.layout.desc, case.layout.avail, case.layout.used))
        before = machine.read_memory(QUEUE_BASE, RAM_SIZE - QUEUE_BASE)
        result = machine.run(timeout=10)
        after = machine.read_memory(QUEUE_BASE, RAM_SIZE - QUEUE_BASE)
        console = machine.device_state("console")["output"]
        error = machine.device_state(DEVICE_NAME)["error"]
    problems = []
    if result.status.kind is not StatusKind.EXITED:
        problems.append(f"the run ended {result.status}")
    elif bool((result.status.code or 0) & t.STATUS_DEVICE_NEEDS_RESET) is not case.bad:
        problems.append(f"device status {result.status.code:#x} for a {case.fault} ring ({error})")
    if console != case.expected_console:
        problems.append(f"console got {len(console)} bytes, not the {len(case.expected_console)} expected")
    may_write = case.used_area if case.fault not in RING_FAULTS or case.fault == "avail_idx_too_far" else (0, 0)
    start, end = (max(address - QUEUE_BASE, 0) for address in may_write)
    if before[:start] != after[:start] or before[end:] != after[end:]:
        problems.append("RAM outside the used ring changed")
    return problems
