"""KvmBackend's memory regions (read-only ones too) and its dirty log on the real /dev/kvm."""

from __future__ import annotations

import pytest

from kvm_guests import (
    ENTRY, MMIO_ADDRESS, REGION64, REGION_ADDRESS, ROM_ADDRESS, RecordingDispatcher, load_boot_state,
)
from labkit import exits
from labkit.errors import ConfigError
from labkit.kvm import KvmBackend
from labkit.kvm import bindings as kb
from labkit.kvm.system import Kvm
from labkit.x86 import layout

pytestmark = pytest.mark.kvm

MEMORY = 2 << 20
ROM_VALUE = 0x1122_3344_5566_7788


@pytest.fixture
def backend():
    with KvmBackend(MEMORY, 64) as vm:
        yield vm


def _regions_for_region64(backend):
    region = backend.add_memory_region(REGION_ADDRESS, 0x10000)
    rom = backend.add_memory_region(ROM_ADDRESS, 0x2000, read_only=True)
    rom[0:8] = ROM_VALUE.to_bytes(8, "little")  # the host fills its ROM
    region[0:8] = (42).to_bytes(8, "little")
    return region, rom


@pytest.mark.parametrize("user", [False, True], ids=["cpl0-emulated", "cpl3-native"])
def test_regions_are_guest_memory_and_rom_writes_are_mmio_exits(backend, user):
    region, rom = _regions_for_region64(backend)
    load_boot_state(backend, 64, REGION64, user=user)
    dispatcher = RecordingDispatcher(stop_on={layout.FAULT_PORT})
    result = backend.run(dispatcher, timeout=2.0)
    # CPL0 halts; at CPL3 `hlt` is a #GP, which the default stub reports on the fault port.
    assert result == (exits.Io(layout.FAULT_PORT, 1, True, 13) if user else exits.Hlt())
    regs = backend.get_regs()
    assert bytes(region[0x3000:0x3004]) == (3).to_bytes(4, "little")  # the guest's write
    assert regs.rbx == 42  # the host's write, read by the guest
    assert regs.rax >> 8 == ROM_VALUE >> 8  # the ROM reads as memory (the fault stub's vector is in AL)
    rom_write = dispatcher.log[0]
    assert rom_write[:5] == ("mmio", ROM_ADDRESS + 0x10, 4, True, ROM_VALUE & 0xFFFF_FFFF)
    assert bytes(rom[0x10:0x14]) == bytes(4)  # ...and a write to it does not change it
    assert backend.memory[0x20000] == 1


def test_regions_lists_ram_first_then_by_address(backend):
    high = backend.add_memory_region(0x80_0000, 0x1000)
    rom = backend.add_memory_region(ROM_ADDRESS, 0x2000, read_only=True)
    listed = backend.regions()
    assert [(address, len(view), read_only) for address, view, read_only in listed] == [
        (0, MEMORY, False), (ROM_ADDRESS, 0x2000, True), (0x80_0000, 0x1000, False),
    ]
    assert listed[0][1] is backend.memory and listed[1][1] is rom and listed[2][1] is high
    assert not rom.readonly  # the host writes the ROM's contents


@pytest.mark.parametrize("address, size, message", [
    (REGION_ADDRESS + 0x800, 0x1000, "multiples of 4 KiB"),
    (REGION_ADDRESS, 0x1800, "multiples of 4 KiB"),
    (REGION_ADDRESS, 0, "non-empty"),
    (MEMORY - 0x1000, 0x2000, r"overlaps RAM \[0x0, 0x200000\)"),
    (0, 0x1000, "overlaps RAM"),
    (REGION_ADDRESS + 0x4000, 0x1000, r"overlaps memory region \[0x400000, 0x410000\)"),
    (REGION_ADDRESS - 0x1000, 0x2000, "overlaps memory region"),
    (layout.MAPPED_LIMIT - 0x1000, 0x2000, "beyond 0x40000000"),
    (-0x1000, 0x1000, "non-negative int"),
    (REGION_ADDRESS, 4096.0, "non-negative int"),
    (True, 0x1000, "non-negative int"),
])
def test_bad_regions_are_config_errors(backend, address, size, message):
    backend.add_memory_region(REGION_ADDRESS, 0x10000)
    with pytest.raises(ConfigError, match=message):
        backend.add_memory_region(address, size)
    assert len(backend.regions()) == 2  # nothing half-added


def test_regions_reach_the_end_of_the_mapped_range_and_close_frees_them():
    backend = KvmBackend(MEMORY, 64)
    last = backend.add_memory_region(layout.MAPPED_LIMIT - 0x1000, 0x1000)
    last[0] = 7
    backend.close()
    with pytest.raises(ValueError):
        last[0]  # released with the backend
    with pytest.raises(ConfigError, match="closed"):
        backend.add_memory_region(REGION_ADDRESS, 0x1000)


def test_read_only_memory_capability_is_reported(backend):
    with Kvm() as kvm:
        assert backend.readonly_memory == bool(kvm.check_extension(kb.KVM_CAP_READONLY_MEM))


# --- dirty log -------------------------------------------------------------------------------


def test_dirty_log_is_exactly_the_pages_the_guest_wrote_in_ram_and_regions(backend):
    region, rom = _regions_for_region64(backend)
    load_boot_state(backend, 64, REGION64)  # CPL0, no stack use: the written set is known
    backend.dirty_log_start()
    backend.memory[0x50000] = 1  # host writes are not logged
    region[0x8000] = 1
    assert backend.run(RecordingDispatcher(), timeout=2.0) == exits.Hlt()
    assert backend.dirty_log_fetch() == [0x20, 0x31, 0x403]  # not the ROM, which was only read
    assert backend.dirty_log_fetch() == []  # fetching cleared it
    # Run the same stores again: logged again, because the fetch write-protected the pages.
    regs = backend.get_regs()
    regs.rip = ENTRY
    backend.set_regs(regs)
    assert backend.run(RecordingDispatcher(), timeout=2.0) == exits.Hlt()
    assert backend.dirty_log_fetch() == [0x20, 0x31, 0x403]


def test_dirty_log_start_stop_and_fetch_without_start(backend):
    with pytest.raises(ConfigError, match="dirty_log_start"):
        backend.dirty_log_fetch()
    load_boot_state(backend, 64, REGION64)
    _regions_for_region64(backend)
    backend.dirty_log_start()
    backend.dirty_log_stop()
    assert backend.run(RecordingDispatcher(), timeout=2.0) == exits.Hlt()
    with pytest.raises(ConfigError, match="dirty_log_start"):
        backend.dirty_log_fetch()
    backend.dirty_log_start()  # a fresh start sees nothing of the unlogged run
    assert backend.dirty_log_fetch() == []
    backend.dirty_log_start()  # starting again while logging just clears
    assert backend.dirty_log_fetch() == []


def test_a_region_added_while_logging_logs_too(backend):
    load_boot_state(backend, 64, REGION64)
    backend.dirty_log_start()
    _regions_for_region64(backend)
    assert backend.run(RecordingDispatcher(), timeout=2.0) == exits.Hlt()
    assert backend.dirty_log_fetch() == [0x20, 0x31, 0x403]


# CPL3: writes page 0x40 (RAM) and 0x402 (region), reads 0x41; marker; writes 0x40 again,
# reads 0x402 and 0x41; marker.  A marker is a write above RAM: an MMIO exit the test stops at.
USER_DIRTY64 = bytes.fromhex(
    "48 89 34 25 00 00 04 00"   # mov [0x40000], rsi
    "48 89 34 25 00 20 40 00"   # mov [0x402000], rsi
    "48 8b 04 25 00 10 04 00"   # mov rax, [0x41000]
    "88 04 25 00 00 00 10"      # mov [0x10000000], al
    "48 89 34 25 00 00 04 00"   # mov [0x40000], rsi
    "48 8b 04 25 00 20 40 00"   # mov rax, [0x402000]
    "48 8b 04 25 00 10 04 00"   # mov rax, [0x41000]
    "88 04 25 00 00 00 10"      # mov [0x10000000], al
)


def test_dirty_log_at_cpl3_under_shadow_paging(backend):
    """Native CPL3 code on PVM runs on KVM's shadow page tables.  The first touch of a page whose
    guest PTE is writable and dirty (labkit's boot tables set D) maps it writable at once, so KVM
    logs it even if it was only read (here the code page 0x8 and the read page 0x41); after a
    fetch only real writes are logged.  With EPT/NPT the first fetch is exact too."""
    backend.add_memory_region(REGION_ADDRESS, 0x10000)
    load_boot_state(backend, 64, USER_DIRTY64, user=True)
    backend.dirty_log_start()
    dispatcher = RecordingDispatcher(stop_on={MMIO_ADDRESS})
    assert backend.run(dispatcher, timeout=2.0) == exits.Mmio(MMIO_ADDRESS, 1, True, 0)
    first = set(backend.dirty_log_fetch())
    assert {0x40, 0x402} <= first <= {0x40, 0x402, 0x41, ENTRY >> 12}
    assert backend.run(dispatcher, timeout=2.0) == exits.Mmio(MMIO_ADDRESS, 1, True, 0)
    assert backend.dirty_log_fetch() == [0x40]


def test_a_kernel_without_read_only_memory_gets_a_clear_error(backend):
    backend.readonly_memory = False  # what KVM_CHECK_EXTENSION(KVM_CAP_READONLY_MEM) == 0 gives
    with pytest.raises(ConfigError, match="KVM_CAP_READONLY_MEM"):
        backend.add_memory_region(ROM_ADDRESS, 0x1000, read_only=True)
    assert len(backend.regions()) == 1
