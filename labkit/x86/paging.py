"""Long-mode 4-level page tables: labkit's identity map, and a walker (Intel SDM vol. 3, 4.5).

``build_page_tables`` identity-maps [0, MAPPED_LIMIT) (1 GiB)::

    PML4[0] -> PDPT at PDPT_ADDRESS
    PDPT[0] -> PD   at PD_ADDRESS
    PD[0]   -> PT   at PT_ADDRESS: the first 2 MiB in 4 KiB pages, so a lesson
               can flip U/S or R/W on one page (see ``pt_entry_address``)
    PD[1..511]      2 MiB pages

Every entry is present, writable (R/W=1) and user-accessible (U/S=1), with the
accessed and dirty bits already set so the CPU never writes to the tables (they
stay out of dirty-page logs).  An access at or above MAPPED_LIMIT raises #PF.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Iterable, Union

from labkit.errors import ConfigError, GuestMemoryError
from labkit.x86 import layout
from labkit.x86.arch import PF_FETCH, PF_PRESENT, PF_RESERVED, PF_USER, PF_WRITE  # noqa: F401 (re-exported)
from labkit.x86.arch import PTE_ACCESSED as ACCESSED  # the page-table bits, by their short names here
from labkit.x86.arch import PTE_ADDRESS_MASK as ADDRESS_MASK
from labkit.x86.arch import PTE_CACHE_DISABLE as CACHE_DISABLE
from labkit.x86.arch import PTE_DIRTY as DIRTY
from labkit.x86.arch import PTE_GLOBAL as GLOBAL
from labkit.x86.arch import PTE_NO_EXECUTE as NO_EXECUTE
from labkit.x86.arch import PTE_PAGE_SIZE as PAGE_SIZE_BIT
from labkit.x86.arch import PTE_PRESENT as PRESENT
from labkit.x86.arch import PTE_USER as USER
from labkit.x86.arch import PTE_WRITABLE as WRITABLE
from labkit.x86.arch import PTE_WRITE_THROUGH as WRITE_THROUGH
from labkit.x86.readable import Readable


ENTRIES = 512
LARGE_PAGE = 2 << 20

DEFAULT_FLAGS = PRESENT | WRITABLE | USER | ACCESSED | DIRTY

_ENTRY = struct.Struct("<Q")


def build_page_tables(mapped_limit: int = layout.MAPPED_LIMIT) -> tuple[tuple[int, bytes], ...]:
    """The identity map as ``((address, table bytes), ...)`` for PML4, PDPT, PD and PT."""
    if mapped_limit % LARGE_PAGE or not LARGE_PAGE <= mapped_limit <= 1 << 30:
        raise ConfigError(
            f"mapped_limit must be a multiple of 2 MiB in [2 MiB, 1 GiB], not {mapped_limit:#x}"
        )
    pointer = PRESENT | WRITABLE | USER | ACCESSED
    pml4 = _table({0: layout.PDPT_ADDRESS | pointer})
    pdpt = _table({0: layout.PD_ADDRESS | pointer})
    pd_entries = {0: layout.PT_ADDRESS | pointer}
    for index in range(1, mapped_limit // LARGE_PAGE):
        pd_entries[index] = index * LARGE_PAGE | DEFAULT_FLAGS | PAGE_SIZE_BIT
    pd = _table(pd_entries)
    pt = _table({index: index * layout.PAGE_SIZE | DEFAULT_FLAGS for index in range(ENTRIES)})
    return (
        (layout.PML4_ADDRESS, pml4),
        (layout.PDPT_ADDRESS, pdpt),
        (layout.PD_ADDRESS, pd),
        (layout.PT_ADDRESS, pt),
    )


def _table(entries: dict[int, int]) -> bytes:
    table = bytearray(ENTRIES * 8)
    for index, value in entries.items():
        _ENTRY.pack_into(table, index * 8, value)
    return bytes(table)


def pt_entry_address(address: int) -> int:
    """Guest-physical address of the 4 KiB PT entry mapping ``address`` (first 2 MiB only).

    Write ``entry & ~USER`` there and the page becomes supervisor-only; the
    guest must ``invlpg`` it (or reload CR3) for the change to take effect.
    """
    if not 0 <= address < LARGE_PAGE:
        raise ConfigError(f"only the first 2 MiB are mapped with 4 KiB pages, not {address:#x}")
    return layout.PT_ADDRESS + (address >> 12) * 8


def write_protect(read_entry: Callable[[int], int], start: int, end: int, *, keep_writable: Iterable[int] = (),
                  spare_tables: Iterable[int] = ()) -> list[tuple[int, bytes]]:
    """Edits to labkit's identity map that make the 4 KiB pages of ``[start, end)`` read-only.

    ``read_entry`` reads the 8-byte entry at a guest-physical address.  A 2 MiB
    page the range touches is first split into a page table written at the next
    of ``spare_tables`` (page-aligned guest-physical addresses), mapping the
    same 2 MiB with the same flags.  Pages in ``keep_writable`` keep R/W.
    Returns ``[(address, bytes), ...]`` to write, in order; the caller makes
    sure no TLB holds the old entries (or flushes it).
    """
    if start % layout.PAGE_SIZE or end % layout.PAGE_SIZE or not 0 <= start < end <= layout.MAPPED_LIMIT:
        raise ConfigError(f"write_protect needs page-aligned {start:#x} < {end:#x} within labkit's map")
    keep = {page & ~(layout.PAGE_SIZE - 1) for page in keep_writable}
    spares = iter(spare_tables)
    edits: list[tuple[int, bytes]] = []
    for region in range(start & ~(LARGE_PAGE - 1), end, LARGE_PAGE):
        pd_entry_at = layout.PD_ADDRESS + (region >> 21) * 8
        pd_entry = read_entry(pd_entry_at)
        first, last = max(start, region), min(end, region + LARGE_PAGE)
        if pd_entry & PAGE_SIZE_BIT:
            table = next(spares, None)
            if table is None or table % layout.PAGE_SIZE:
                raise ConfigError(f"splitting the 2 MiB page at {region:#x} needs a spare page-aligned table")
            flags = pd_entry & 0xFFF & ~PAGE_SIZE_BIT
            entries = {index: region + index * layout.PAGE_SIZE | flags for index in range(ENTRIES)}
            for page in range(first, last, layout.PAGE_SIZE):
                if page not in keep:
                    entries[(page - region) >> 12] &= ~WRITABLE
            edits.append((table, _table(entries)))
            edits.append((pd_entry_at, _ENTRY.pack(table | PRESENT | WRITABLE | USER | ACCESSED)))
            continue
        table = pd_entry & ADDRESS_MASK
        for page in range(first, last, layout.PAGE_SIZE):
            if page not in keep:
                entry_at = table + ((page - region) >> 12) * 8
                edits.append((entry_at, _ENTRY.pack(read_entry(entry_at) & ~WRITABLE)))
    return edits


@dataclass(frozen=True)
class Translation:
    """Where a linear address goes: physical address, effective flags, page size."""

    physical: int
    flags: int
    """PRESENT | WRITABLE | USER as the AND over all levels, plus the leaf's other bits."""
    page_size: int


@dataclass(frozen=True)
class PageFault:
    """The #PF an access would raise: CR2 = ``address``, and the pushed error code."""

    address: int
    error_code: int
    level: str
    """Which table's entry stopped the walk: "PML4", "PDPT", "PD" or "PT"."""

    vector = 14


Reader = Union[Readable, Callable[[int], int]]


def translate(
    memory: Reader,
    address: int,
    *,
    cr3: int = layout.PML4_ADDRESS,
    write: bool = False,
    user: bool = False,
    fetch: bool = False,
    write_protect: bool = True,
) -> Translation | PageFault:
    """Walk the 4-level tables for ``address`` as the CPU would (no NX, no SMEP/SMAP).

    ``memory`` is guest memory (a :class:`~labkit.x86.readable.Readable` such as
    :class:`labkit.memory.GuestMemory`) or a function that reads the 8-byte
    entry at a physical address.  An entry outside guest memory raises
    :class:`GuestMemoryError` naming it.  ``write_protect`` is CR0.WP:
    with it, ring 0 also faults writing a read-only page.  A non-canonical
    address raises #GP on a CPU, not #PF: it is a ``ConfigError`` here.
    """
    if not 0 <= address < 1 << 64 or _non_canonical(address):
        raise ConfigError(f"{address:#x} is not a canonical 48-bit address (the CPU raises #GP)")
    read = memory if callable(memory) else _reader(memory)
    access = (PF_WRITE if write else 0) | (PF_USER if user else 0) | (PF_FETCH if fetch else 0)
    table = cr3 & ADDRESS_MASK
    effective = PRESENT | WRITABLE | USER
    levels = (("PML4", 39), ("PDPT", 30), ("PD", 21), ("PT", 12))
    for name, shift in levels:
        entry = read(table + ((address >> shift) & 0x1FF) * 8)
        if not entry & PRESENT:
            return PageFault(address, access, name)
        effective &= entry | ~(WRITABLE | USER)
        leaf = name == "PT" or (name in ("PD", "PDPT") and entry & PAGE_SIZE_BIT)
        if leaf:
            size = 1 << shift
            physical = (entry & ADDRESS_MASK & ~(size - 1)) | (address & (size - 1))
            if (user and not effective & USER) or (
                write and not effective & WRITABLE and (user or write_protect)
            ):
                return PageFault(address, access | PF_PRESENT, name)
            flags = (entry & ~(PRESENT | WRITABLE | USER) & 0xFFF) | effective
            return Translation(physical, flags, size)
        table = entry & ADDRESS_MASK
    raise AssertionError("unreachable: the PT level is always a leaf")


def _non_canonical(address: int) -> bool:
    top = address >> 47
    return top not in (0, (1 << 17) - 1)


def _reader(memory: Readable) -> Callable[[int], int]:
    def read(physical: int) -> int:
        try:
            return int.from_bytes(memory.read(physical, 8), "little")
        except GuestMemoryError as error:
            raise GuestMemoryError(f"page-table entry at {physical:#x} lies outside guest memory: {error}") from None

    return read


def describe_flags(flags: int) -> str:
    """``"P RW US A D"``-style names of the set bits."""
    names = (
        (PRESENT, "P"), (WRITABLE, "RW"), (USER, "US"), (WRITE_THROUGH, "PWT"),
        (CACHE_DISABLE, "PCD"), (ACCESSED, "A"), (DIRTY, "D"), (PAGE_SIZE_BIT, "PS"),
        (GLOBAL, "G"), (NO_EXECUTE, "NX"),
    )
    return " ".join(name for bit, name in names if flags & bit)
