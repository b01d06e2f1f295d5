"""labkit.emu.page_walk: the x86 page walk over a bytearray of guest RAM, without an emulator."""

from __future__ import annotations

import struct

import pytest

from labkit.emu.page_walk import PageFault, TableOutsideRam, walk

pytestmark = pytest.mark.unit

P, W, U, A, D, PS = 0x1, 0x2, 0x4, 0x20, 0x40, 0x80
CR0_PG, CR0_WP, CR4_PSE, CR4_PAE = 0x8000_0000, 0x1_0000, 0x10, 0x20


def _entry(ram: bytearray, at: int, value: int, width: int = 8) -> None:
    ram[at:at + width] = value.to_bytes(width, "little")


def _four_level(user_page: bool = True, writable: bool = True) -> bytearray:
    """PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000 -> page 0x9000 for linear 0x40_0000_5000."""
    ram = bytearray(0x20000)
    linear = 0x40_0000_5000
    leaf_flags = P | (W if writable else 0) | (U if user_page else 0)
    _entry(ram, 0x1000 + ((linear >> 39) & 0x1FF) * 8, 0x2000 | P | W | U)
    _entry(ram, 0x2000 + ((linear >> 30) & 0x1FF) * 8, 0x3000 | P | W | U)
    _entry(ram, 0x3000 + ((linear >> 21) & 0x1FF) * 8, 0x4000 | P | W | U)
    _entry(ram, 0x4000 + ((linear >> 12) & 0x1FF) * 8, 0x9000 | leaf_flags)
    return ram


def test_four_level_walk_sets_accessed_and_dirty_bits_like_the_cpu():
    ram = _four_level()
    assert walk(memoryview(ram), 0x40_0000_5123, False, False, CR0_PG, 0x1000, CR4_PAE, True) == 0x9000
    pte = struct.unpack_from("<Q", ram, 0x4000 + 5 * 8)[0]
    assert pte & A and not pte & D
    assert walk(memoryview(ram), 0x40_0000_5123, True, True, CR0_PG, 0x1000, CR4_PAE, True) == 0x9000
    assert struct.unpack_from("<Q", ram, 0x4000 + 5 * 8)[0] & D


@pytest.mark.parametrize(("write", "user", "wp", "user_page", "writable", "code"), [
    (False, True, False, False, True, P | U),          # user read of a supervisor page
    (True, True, False, True, False, P | W | U),       # user write of a read-only page
    (True, False, True, True, False, P | W),           # supervisor write of a read-only page with CR0.WP
])
def test_protection_violations_are_page_faults_with_the_cpus_error_code(write, user, wp, user_page, writable, code):
    ram = _four_level(user_page, writable)
    with pytest.raises(PageFault) as fault:
        walk(memoryview(ram), 0x40_0000_5008, write, user, CR0_PG | (CR0_WP if wp else 0), 0x1000, CR4_PAE, True)
    assert (fault.value.error_code, fault.value.address) == (code, 0x40_0000_5008)


def test_supervisor_write_to_read_only_page_without_wp_is_allowed():
    ram = _four_level(writable=False)
    assert walk(memoryview(ram), 0x40_0000_5000, True, False, CR0_PG, 0x1000, CR4_PAE, True) == 0x9000


def test_not_present_and_tables_outside_ram():
    ram = _four_level()
    with pytest.raises(PageFault) as fault:
        walk(memoryview(ram), 0x7000, True, False, CR0_PG, 0x1000, CR4_PAE, True)
    assert fault.value.error_code == W  # P = 0: not present
    with pytest.raises(TableOutsideRam):
        walk(memoryview(ram), 0x5000, False, False, CR0_PG, 0x10_0000, CR4_PAE, True)


def test_32_bit_paging_with_a_4_mib_page():
    ram = bytearray(0x10000)
    _entry(ram, 0x1000 + (0x0080_1234 >> 22) * 4, 0x0040_0000 | P | W | PS, width=4)
    assert walk(memoryview(ram), 0x0080_1234, False, False, CR0_PG, 0x1000, CR4_PSE, False) == 0x0040_1000
    assert struct.unpack_from("<I", ram, 0x1000 + 2 * 4)[0] & A
