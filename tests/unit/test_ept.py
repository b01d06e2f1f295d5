"""The EPT model: entry format, the 24-reference two-dimensional walk, EPT violations and their qualification."""

from __future__ import annotations

import struct

import pytest

from labkit.errors import ConfigError
from labkit.monitor.ept import (EPT_EXECUTE, EPT_LARGE, EPT_READ, EPT_WRITE, EptViolation, GuestPageFault,
                                NestedMemory, ept_entry, nested_walk)

RAM = 2 << 20
PML4, PDPT, PD, PT, DATA = 0x10000, 0x11000, 0x12000, 0x13000, 0x20000
VIRTUAL = 0x4000_0000 + 0x5000


def guest_ram() -> bytes:
    """A guest with one 4-level mapping: VIRTUAL -> DATA, all writable."""
    ram = bytearray(RAM)
    for at, value in ((PML4, PDPT | 3), (PDPT + 8, PD | 3), (PD, PT | 3), (PT + 5 * 8, DATA | 3)):
        struct.pack_into("<Q", ram, at, value)
    struct.pack_into("<Q", ram, DATA, 0x1234)
    return bytes(ram)


def test_an_entry_has_the_sdm_format():
    entry = ept_entry(0x5000, write=False, memory_type=6)
    assert entry & 7 == EPT_READ | EPT_EXECUTE and entry >> 3 & 7 == 6 and entry & ~0xFFF == 0x5000
    assert ept_entry(0x20_0000, large=True) & EPT_LARGE
    assert ept_entry(0x5000, leaf=False) >> 3 & 7 == 0
    with pytest.raises(ConfigError):
        ept_entry(0x5001)
    with pytest.raises(ConfigError):
        ept_entry(0x5000, memory_type=2)


def test_a_tlb_miss_costs_24_references_for_4_levels_under_4():
    memory = NestedMemory(guest_ram())
    walk = nested_walk(memory.read, PML4, memory.ept, VIRTUAL)
    assert walk.stopped is None and walk.host_physical == memory.guest_base + DATA
    assert walk.count == 24 == 4 * (4 + 1) + 4
    kinds = [reference.structure.split()[0] for reference in walk.references]
    assert kinds == (["EPT"] * 4 + ["guest"]) * 4 + ["EPT"] * 4
    assert memory.read(walk.host_physical) == 0x1234


def test_an_ept_violation_carries_the_access_the_permissions_and_the_address():
    memory = NestedMemory(guest_ram())
    memory.protect(DATA, write=False)
    walk = nested_walk(memory.read, PML4, memory.ept, VIRTUAL, write=True)
    assert isinstance(walk.stopped, EptViolation) and walk.count == 24
    assert walk.stopped.guest_physical == DATA and walk.stopped.guest_linear == VIRTUAL
    assert walk.stopped.qualification == EPT_WRITE | (EPT_READ | EPT_EXECUTE) << 3 | 0x80 | 0x100
    memory.protect(PT, read=False, write=False, execute=False)
    walk = nested_walk(memory.read, PML4, memory.ept, VIRTUAL)
    assert isinstance(walk.stopped, EptViolation) and walk.stopped.guest_physical == PT + 5 * 8
    assert walk.stopped.qualification == EPT_READ | 0x80  # a guest paging-structure entry, no permission
    assert walk.count == 19


def test_the_guests_own_fault_needs_no_exit():
    memory = NestedMemory(guest_ram())
    walk = nested_walk(memory.read, PML4, memory.ept, VIRTUAL + 0x1000)
    assert walk.stopped == GuestPageFault(VIRTUAL + 0x1000, "PT") and walk.count == 20
