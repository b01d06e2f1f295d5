"""The kernel-side page walk and the ring-0 stub of labkit.monitor.shadow, without a machine."""

from __future__ import annotations

import struct

import pytest

from labkit.monitor.shadow import LEVELS, STUB_CAPACITY, STUB_COUNT, shadow_stub, walk_kernel
from labkit.monitor.vcpu import decode
from labkit.x86 import layout
from labkit.x86.paging import WRITABLE, PageFault, build_page_tables, translate


def _memory(tables) -> dict[int, int]:
    entries = {}
    for base, data in tables:
        for index in range(512):
            entries[base + 8 * index] = struct.unpack_from("<Q", data, 8 * index)[0]
    return entries


@pytest.mark.parametrize("address", [0x0, 0x8123, 0x1F_F000, 0x20_0000, 0x3FF_FFF8, 0x3FFF_F000, 0x4000_0000,
                                     0x8000_0000, 0x7F_FFFF_F000])
@pytest.mark.parametrize("write", [False, True])
def test_the_walk_agrees_with_labkits_translate(address, write):
    entries = _memory(build_page_tables())
    read = lambda at: entries.get(at, 0)  # noqa: E731
    walk = walk_kernel(read, layout.PML4_ADDRESS, address, write=write)
    expected = translate(read, address, write=write)
    if isinstance(expected, PageFault):
        assert walk.page is None and walk.error_code == expected.error_code
        assert walk.steps[-1].level == expected.level
    else:
        assert walk.physical == expected.physical and walk.error_code is None


def test_a_read_only_page_faults_on_write_only_with_cr0_wp():
    entries = _memory(build_page_tables())
    pte = layout.PT_ADDRESS + 8 * 9
    entries[pte] &= ~WRITABLE
    read = lambda at: entries.get(at, 0)  # noqa: E731
    assert walk_kernel(read, layout.PML4_ADDRESS, 0x9000, write=True).error_code == 0x3
    assert walk_kernel(read, layout.PML4_ADDRESS, 0x9000, write=True, write_protect=False).page == 0x9000
    walk = walk_kernel(read, layout.PML4_ADDRESS, 0x9000)
    assert [step.level for step in walk.steps] == list(LEVELS)
    assert walk.steps[-1].address == pte and not walk.writable


def test_the_stub_is_the_documented_code():
    at = 0x1C0000
    code = shadow_stub(at)
    assert len(code) == STUB_COUNT and STUB_CAPACITY >= 160
    texts, offset = [], 0
    while code[offset] != 0xCC:
        decoded = decode(code[offset:offset + 15], at + offset)
        assert decoded is not None
        texts.append(decoded.mnemonic)
        offset += decoded.length
    assert texts == ["push", "push", "push", "mov", "test", "je", "mov", "mov", "mov", "mov", "invlpg", "loop",
                     "mov", "test", "je", "mov", "pop", "pop", "pop", "iretq"]
