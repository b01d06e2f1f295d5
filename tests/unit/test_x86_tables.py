"""Encode -> decode round trips for the GDT, IDT, TSS and page-table builders."""

from __future__ import annotations

import struct

import pytest

from labkit.errors import ConfigError
from labkit.memory import GuestMemory
from labkit.x86 import gdt, idt, layout, paging, tss
from labkit.x86.state import Segment

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("selector", sorted(gdt.gdt_segments()))
def test_gdt_descriptors_decode_to_the_segments_they_were_built_from(selector):
    table = gdt.build_gdt()
    segment = gdt.gdt_segments()[selector]
    index = selector & ~7
    if segment.s:
        decoded = gdt.decode_descriptor(table[index:index + 8], selector)
    else:
        decoded = gdt.decode_system_descriptor64(table[index:index + 16], selector)
    assert decoded == segment


def test_gdt_has_the_known_bytes_of_flat_segments():
    table = gdt.build_gdt()
    assert len(table) == layout.GDT_ENTRIES * 8 == gdt.gdt_limit() + 1
    assert table[0:8] == bytes(8)
    # The classic encodings: 64-bit code 0x00AF9B..., data 0x00CF93..., user data 0x00CFF3...
    assert struct.unpack_from("<Q", table, layout.KERNEL_CS64)[0] == 0x00AF9B000000FFFF
    assert struct.unpack_from("<Q", table, layout.KERNEL_DS)[0] == 0x00CF93000000FFFF
    assert struct.unpack_from("<Q", table, layout.USER_DS & ~7)[0] == 0x00CFF3000000FFFF
    assert struct.unpack_from("<Q", table, layout.USER_CS64 & ~7)[0] == 0x00AFFB000000FFFF
    assert struct.unpack_from("<Q", table, layout.KERNEL_CS32)[0] == 0x00CF9B000000FFFF
    assert struct.unpack_from("<Q", table, layout.KERNEL_CS16)[0] == 0x00009B000000FFFF


def test_segment_flags_match_their_roles():
    segments = gdt.gdt_segments()
    assert segments[layout.KERNEL_CS64].l == 1 and segments[layout.KERNEL_CS64].db == 0
    assert segments[layout.USER_CS64].dpl == 3 and segments[layout.USER_CS64].l == 1
    assert segments[layout.USER_CS32].db == 1 and segments[layout.USER_CS32].dpl == 3
    assert segments[layout.KERNEL_DS].db == 1 and segments[layout.KERNEL_DS].dpl == 0
    tr = segments[layout.TSS_SELECTOR]
    assert (tr.type, tr.s, tr.base, tr.limit) == (gdt.TSS_BUSY, 0, layout.TSS_ADDRESS, 0x67)


@pytest.mark.parametrize(
    "segment",
    [
        Segment(base=0x12345678, limit=0xABCDE, type=0x3, dpl=2, db=1, avl=1),
        Segment(base=0xFFFFF000, limit=0x12345FFF, type=0xA, g=1, l=1, db=0),
        Segment(base=0, limit=0, type=0x9, s=0, present=0, unusable=1),
    ],
)
def test_descriptor_round_trip(segment):
    assert gdt.decode_descriptor(gdt.encode_descriptor(segment), segment.selector) == segment


def test_system_descriptor64_keeps_the_upper_base():
    segment = Segment(base=0xFFFF_8000_1234_5000, limit=0x67, type=0x9, s=0)
    raw = gdt.encode_system_descriptor64(segment)
    assert len(raw) == 16
    assert gdt.decode_system_descriptor64(raw) == segment


@pytest.mark.parametrize(
    "segment",
    [
        Segment(limit=0x12345, g=1),  # page-granular limit must end in 0xFFF
        Segment(limit=0x100000),  # does not fit 20 bits
        Segment(base=1 << 32),  # 8-byte descriptor
    ],
)
def test_bad_descriptors_are_rejected(segment):
    with pytest.raises(ConfigError):
        gdt.encode_descriptor(segment)


@pytest.mark.parametrize(
    "gate",
    [
        idt.Gate(offset=0x12345678, selector=0x30, type=idt.INTERRUPT_GATE, dpl=0),
        idt.Gate(offset=0x500, selector=0x08, type=idt.TRAP_GATE, dpl=3),
        idt.Gate(offset=0, selector=0, present=0),
    ],
)
def test_gate32_round_trip(gate):
    raw = idt.encode_gate32(gate)
    assert len(raw) == 8
    assert idt.decode_gate32(raw) == gate


@pytest.mark.parametrize(
    "gate",
    [
        idt.Gate(offset=0xFFFF_8000_DEAD_BEEF, selector=0x08, type=idt.INTERRUPT_GATE, dpl=3, ist=1),
        idt.Gate(offset=0xD10, selector=0x08, type=idt.TRAP_GATE),
    ],
)
def test_gate64_round_trip(gate):
    raw = idt.encode_gate64(gate)
    assert len(raw) == 16
    assert idt.decode_gate64(raw) == gate


def test_gate64_known_encoding():
    raw = idt.encode_gate64(idt.Gate(offset=0x1122334455667788, selector=0x08, dpl=3))
    assert raw == bytes.fromhex("8877 0800 00 ee 6655 44332211 00000000".replace(" ", ""))


def test_bad_gates_are_rejected():
    with pytest.raises(ConfigError):
        idt.encode_gate32(idt.Gate(offset=1 << 32, selector=8))
    with pytest.raises(ConfigError):
        idt.encode_gate64(idt.Gate(offset=0, selector=8, type=0x5))
    with pytest.raises(ConfigError):
        idt.encode_gate32(idt.Gate(offset=0, selector=8, ist=1))


def test_ivt_entry_round_trip():
    raw = idt.encode_ivt_entry(0xF000, 0xFEA5)
    assert raw == bytes([0xA5, 0xFE, 0x00, 0xF0])
    assert idt.decode_ivt_entry(raw) == (0xF000, 0xFEA5)
    assert len(idt.build_ivt([(0, 0x500)] * 256)) == 1024 == idt.idt_limit(16) + 1


def test_tss64_round_trip_and_offsets():
    raw = tss.build_tss64()
    assert len(raw) == tss.TSS_SIZE == 104
    assert struct.unpack_from("<Q", raw, 4)[0] == layout.KERNEL_STACK_TOP  # RSP0
    assert struct.unpack_from("<H", raw, 102)[0] > gdt.TSS_LIMIT  # no I/O bitmap
    custom = tss.Tss64(rsp=(1, 2, 3), ist=(4, 5, 6, 7, 8, 9, 10), iopb_offset=0x68)
    assert tss.decode_tss64(tss.build_tss64(custom)) == custom
    assert tss.decode_tss64(raw) == tss.Tss64()


def test_tss32_round_trip_and_offsets():
    raw = tss.build_tss32()
    assert len(raw) == 104
    assert struct.unpack_from("<I", raw, 4)[0] == layout.KERNEL_STACK_TOP  # ESP0
    assert struct.unpack_from("<I", raw, 8)[0] == layout.KERNEL_DS  # SS0
    assert struct.unpack_from("<H", raw, 102)[0] > gdt.TSS_LIMIT
    custom = tss.Tss32(esp0=0x1000, ss0=0x10, esp1=0x2000, ss1=0x19, esp2=0x3000, ss2=0x1A)
    assert tss.decode_tss32(tss.build_tss32(custom)) == custom


def _memory(ram: bytearray) -> GuestMemory:
    return GuestMemory([(0, memoryview(ram), False)])


def _ram_with_tables(size: int = 0x10000) -> bytearray:
    ram = bytearray(size)
    for address, table in paging.build_page_tables():
        ram[address:address + len(table)] = table
    return ram


@pytest.mark.parametrize("address", [0, 0x8123, 0x1FFFFF, 0x200000, 0x12345678, layout.MAPPED_LIMIT - 1])
def test_identity_map(address):
    result = paging.translate(_memory(_ram_with_tables()), address, write=True, user=True)
    assert isinstance(result, paging.Translation)
    assert result.physical == address
    assert result.flags & (paging.PRESENT | paging.WRITABLE | paging.USER) == 7
    assert result.page_size == (4096 if address < 0x200000 else 0x200000)


def test_page_tables_are_where_layout_says():
    addresses = [address for address, _ in paging.build_page_tables()]
    assert addresses == [layout.PML4_ADDRESS, layout.PDPT_ADDRESS, layout.PD_ADDRESS, layout.PT_ADDRESS]
    assert all(len(table) == 4096 for _, table in paging.build_page_tables())


def test_beyond_mapped_limit_is_a_not_present_fault():
    fault = paging.translate(_memory(_ram_with_tables()), layout.MAPPED_LIMIT, write=True, user=True)
    assert fault == paging.PageFault(layout.MAPPED_LIMIT, paging.PF_WRITE | paging.PF_USER, "PDPT")


def test_flipping_us_and_rw_in_the_pt():
    ram = _ram_with_tables()
    entry_address = paging.pt_entry_address(0x9000)
    (entry,) = struct.unpack_from("<Q", ram, entry_address)
    struct.pack_into("<Q", ram, entry_address, entry & ~(paging.USER | paging.WRITABLE))
    fault = paging.translate(_memory(ram), 0x9010, user=True)
    assert fault == paging.PageFault(0x9010, paging.PF_PRESENT | paging.PF_USER, "PT")
    assert isinstance(paging.translate(_memory(ram), 0x9010), paging.Translation)  # ring 0 may read
    fault = paging.translate(_memory(ram), 0x9010, write=True)  # CR0.WP=1: ring 0 may not write
    assert fault.error_code == paging.PF_PRESENT | paging.PF_WRITE
    assert isinstance(paging.translate(_memory(ram), 0x9010, write=True, write_protect=False), paging.Translation)
    assert isinstance(paging.translate(_memory(ram), 0xA000, write=True, user=True), paging.Translation)


def _apply(ram: bytearray, edits) -> None:
    for address, data in edits:
        ram[address:address + len(data)] = data


def _reads(ram: bytearray):
    return lambda address: struct.unpack_from("<Q", ram, address)[0]


@pytest.mark.parametrize("start, end", [(0x1C_0000, 0x20_0000), (0x3C_0000, 0x40_0000), (0x1F_E000, 0x20_2000)],
                         ids=["4k-pages", "split-2m-page", "both"])
def test_write_protect_makes_exactly_the_range_read_only_and_keeps_the_map(start, end):
    ram = _ram_with_tables(8 << 20)
    spare = end - 0x1000 if end > paging.LARGE_PAGE else None  # a table inside the protected range
    keep = start + 0x1000
    edits = paging.write_protect(_reads(ram), start, end, keep_writable=[keep + 0x10],
                                 spare_tables=[] if spare is None else [spare])
    _apply(ram, edits)
    for page in range(start - 0x4000, end + 0x4000, 0x1000):
        for address in (page, page + 0xFF8):
            read = paging.translate(_memory(ram), address, user=True)
            assert isinstance(read, paging.Translation) and read.physical == address  # still identity-mapped
            write = paging.translate(_memory(ram), address, write=True, user=True)
            if start <= page < end and page != keep:
                assert write == paging.PageFault(address, paging.PF_PRESENT | paging.PF_WRITE | paging.PF_USER, "PT")
            else:
                assert isinstance(write, paging.Translation), hex(address)


def test_write_protect_needs_a_spare_table_to_split_a_2m_page():
    ram = _ram_with_tables(8 << 20)
    with pytest.raises(ConfigError, match="spare"):
        paging.write_protect(_reads(ram), 0x30_0000, 0x30_1000)
    with pytest.raises(ConfigError, match="page-aligned"):
        paging.write_protect(_reads(ram), 0x30_0010, 0x30_1000)


def test_not_present_pt_entry():
    ram = _ram_with_tables()
    struct.pack_into("<Q", ram, paging.pt_entry_address(0), 0)
    fault = paging.translate(_memory(ram), 0x10, fetch=True)
    assert fault == paging.PageFault(0x10, paging.PF_FETCH, "PT")


def test_translate_rejects_non_canonical_addresses():
    with pytest.raises(ConfigError):
        paging.translate(_memory(_ram_with_tables()), 0x0000_8000_0000_0000)


def test_build_page_tables_checks_its_limit():
    with pytest.raises(ConfigError):
        paging.build_page_tables(0x1234)
    assert paging.describe_flags(paging.DEFAULT_FLAGS) == "P RW US A D"
