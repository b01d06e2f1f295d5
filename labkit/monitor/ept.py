"""Nested paging as Intel's EPT does it (SDM vol. 3C, "EPT" in the VMX chapter): a model, counted per access.

With nested paging the CPU walks two sets of tables: the guest's own
(linear to guest-physical, which the guest edits freely: no traps, no shadow)
and the hypervisor's extended page tables (guest-physical to host-physical).
Every guest-physical address the guest walk produces, the guest's table
pages included, goes through an EPT walk first.  On a TLB miss, a 4-level
guest walk under 4-level EPT reads 4 x (4 + 1) + 4 = 24 entries instead of
4: the price of leaving the guest's page tables alone.

An EPT entry (SDM table "Format of an EPT ... entry"): bit 0 read, bit 1
write, bit 2 execute; in a leaf, bits 5:3 the memory type (0 UC, 1 WC, 4
WT, 5 WP, 6 WB) and bit 6 ignore-PAT; bit 7 a large page (2 MiB in a PD, 1
GiB in a PDPT); bit 8 accessed and bit 9 dirty (with EPTP bit 6); bits 51:12
the address.  An entry with bits 2:0 = 0 is not present.  An access EPT does
not allow is an *EPT violation*, a VM exit (basic reason 48) with the
guest-physical address and an exit qualification: bits 0-2 the access (read,
write, fetch), bits 3-5 the AND of the read/write/execute bits of the entries
walked, bit 7 set when a guest-linear address is known, bit 8 set when the
access was the final one (clear: a guest paging-structure entry).  The model
walks memory it is given (``read``: 8 bytes at a host-physical address); it
does not model misconfigurations, the EPTP's own checks, or the A/D bits.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from labkit.errors import ConfigError
from labkit.memory import GuestMemory

EPT_READ, EPT_WRITE, EPT_EXECUTE = 1, 2, 4
EPT_PERMISSIONS = EPT_READ | EPT_WRITE | EPT_EXECUTE
EPT_MEMORY_TYPE_SHIFT = 3
EPT_IGNORE_PAT = 1 << 6
EPT_LARGE = 1 << 7
EPT_ADDRESS_MASK = 0x000F_FFFF_FFFF_F000
MEMORY_TYPES = {0: "UC", 1: "WC", 4: "WT", 5: "WP", 6: "WB"}
WRITE_BACK = 6
EXIT_REASON_EPT_VIOLATION = 48
LEVELS = ("PML4", "PDPT", "PD", "PT")
SHIFTS = (39, 30, 21, 12)
PAGE = 0x1000
_PRESENT, _WRITABLE, _LARGE_PAGE = 1, 2, 0x80
_GUEST_ADDRESS = 0x000F_FFFF_FFFF_F000

Reader = Callable[[int], int]


def ept_entry(address: int, *, read: bool = True, write: bool = True, execute: bool = True,
              memory_type: int = WRITE_BACK, leaf: bool = True, large: bool = False) -> int:
    """An EPT entry pointing at ``address`` (a table, or a page if ``leaf``)."""
    if address & ~EPT_ADDRESS_MASK:
        raise ConfigError(f"EPT addresses are 4 KiB aligned and below 2**52, not {address:#x}")
    if memory_type not in MEMORY_TYPES:
        raise ConfigError(f"EPT memory type must be one of {sorted(MEMORY_TYPES)}, not {memory_type}")
    value = address | (EPT_READ if read else 0) | (EPT_WRITE if write else 0) | (EPT_EXECUTE if execute else 0)
    if leaf:
        value |= memory_type << EPT_MEMORY_TYPE_SHIFT | (EPT_LARGE if large else 0)
    return value


@dataclass(frozen=True)
class Reference:
    """One memory reference of a walk: which structure (``"guest PD"``, ``"EPT PT"``, ``"data"``), where, what."""

    structure: str
    address: int
    """Host-physical address read."""
    value: int


@dataclass(frozen=True)
class EptViolation:
    """The VM exit an access EPT forbids raises (basic exit reason 48)."""

    guest_physical: int
    qualification: int
    guest_linear: int | None

    reason = EXIT_REASON_EPT_VIOLATION

    def describe(self) -> str:
        q = self.qualification
        access = "/".join(name for bit, name in ((1, "read"), (2, "write"), (4, "fetch")) if q & bit)
        allowed = "".join(name if q & bit else "-" for bit, name in ((8, "r"), (16, "w"), (32, "x")))
        what = ("the final access" if q & 0x100 else "a guest page-table entry") if q & 0x80 else "no linear address"
        return (f"EPT violation: {access} of guest-physical {self.guest_physical:#x} ({what}), EPT allows "
                f"{allowed}, qualification {q:#x}")


@dataclass(frozen=True)
class GuestPageFault:
    """The guest's own #PF (its tables said no): delivered to the guest without a VM exit."""

    address: int
    level: str


@dataclass(frozen=True)
class NestedWalk:
    """A two-dimensional walk: every reference in order, then the host-physical address or what stopped it."""

    linear: int
    references: tuple[Reference, ...]
    host_physical: int | None
    stopped: EptViolation | GuestPageFault | None

    @property
    def count(self) -> int:
        return len(self.references)


class Ept:
    """Extended page tables rooted at ``eptp`` (its bits 51:12) in host memory ``read``."""

    def __init__(self, read: Reader, eptp: int):
        self.read = read
        self.root = eptp & EPT_ADDRESS_MASK

    def translate(self, guest_physical: int, access: int, references: list[Reference], *,
                  linear: int | None = None, final: bool = True) -> int | EptViolation:
        """Host-physical address of ``guest_physical`` for ``access`` (EPT_READ/WRITE/EXECUTE bits), appending
        each entry read to ``references``; or the EPT violation."""
        table, allowed = self.root, EPT_PERMISSIONS
        for depth, (level, shift) in enumerate(zip(LEVELS, SHIFTS)):
            at = table + (guest_physical >> shift & 0x1FF) * 8
            entry = self.read(at)
            references.append(Reference(f"EPT {level}", at, entry))
            allowed &= entry & EPT_PERMISSIONS
            if not entry & EPT_PERMISSIONS:
                return self._violation(guest_physical, access, 0, linear, final)
            if depth == 3 or (depth in (1, 2) and entry & EPT_LARGE):
                if access & ~allowed:
                    return self._violation(guest_physical, access, allowed, linear, final)
                size = 1 << shift
                return (entry & EPT_ADDRESS_MASK & ~(size - 1)) | guest_physical & (size - 1)
            table = entry & EPT_ADDRESS_MASK
        raise AssertionError("unreachable: the EPT PT level is always a leaf")

    @staticmethod
    def _violation(guest_physical: int, access: int, allowed: int, linear: int | None, final: bool) -> EptViolation:
        qualification = access & 7 | (allowed & 7) << 3
        if linear is not None:
            qualification |= 0x80 | (0x100 if final else 0)
        return EptViolation(guest_physical, qualification, linear)


def nested_walk(read: Reader, guest_cr3: int, ept: Ept, linear: int, *, write: bool = False,
                fetch: bool = False) -> NestedWalk:
    """Translate ``linear`` through the guest's 4-level tables (from guest-physical ``guest_cr3``) and EPT.

    Each guest table entry is read at the host-physical address EPT gives for
    it; the final guest-physical address goes through EPT once more.  On a TLB
    and paging-structure-cache miss this is every reference the CPU makes.
    """
    references: list[Reference] = []
    access = EPT_WRITE if write else (EPT_EXECUTE if fetch else EPT_READ)
    table = guest_cr3 & _GUEST_ADDRESS
    for depth, (level, shift) in enumerate(zip(LEVELS, SHIFTS)):
        entry_gpa = table + (linear >> shift & 0x1FF) * 8
        host = ept.translate(entry_gpa, EPT_READ, references, linear=linear, final=False)
        if isinstance(host, EptViolation):
            return NestedWalk(linear, tuple(references), None, host)
        entry = read(host)
        references.append(Reference(f"guest {level}", host, entry))
        if not entry & _PRESENT:
            return NestedWalk(linear, tuple(references), None, GuestPageFault(linear, level))
        if depth == 3 or (depth in (1, 2) and entry & _LARGE_PAGE):
            size = 1 << shift
            gpa = (entry & _GUEST_ADDRESS & ~(size - 1)) | linear & (size - 1)
            final = ept.translate(gpa, access, references, linear=linear, final=True)
            if isinstance(final, EptViolation):
                return NestedWalk(linear, tuple(references), None, final)
            return NestedWalk(linear, tuple(references), final, None)
        table = entry & _GUEST_ADDRESS
    raise AssertionError("unreachable: the guest PT level is always a leaf")


class NestedMemory:
    """Host memory for the model: the guest's RAM at host-physical ``guest_base``, EPT tables below it.

    The EPT maps every guest-physical page of ``ram`` to the same page at
    ``guest_base`` in 4 KiB EPT pages (so every level is walked), read/write/
    execute, write-back; ``protect`` changes one page's permissions.  Guest RAM
    is read through a :class:`labkit.memory.GuestMemory` (bounds-checked).
    """

    TABLES = 0x10_0000

    def __init__(self, ram: bytes, *, guest_base: int = 0x4000_0000):
        size = len(ram)  # of the bytes given, before they become guest RAM
        pages, partial = divmod(size, PAGE)
        if partial or guest_base % PAGE or guest_base < self.TABLES + 0x100_0000:
            raise ConfigError("guest RAM must be whole pages, placed page-aligned above the EPT tables")
        self.ram = bytearray(ram)
        self.memory = GuestMemory([(guest_base, memoryview(self.ram), False)])
        """Host-physical memory holding the guest's RAM."""
        self.guest_base = guest_base
        self.tables: dict[int, bytearray] = {}
        self._next = self.TABLES
        self.eptp = self._table() | 6 | (3 << 3)  # WB, 4-level walk: as an EPTP is written (the model ignores them)
        for page in range(0, pages * PAGE, PAGE):
            self._map(page, ept_entry(guest_base + page))

    @property
    def ept(self) -> Ept:
        return Ept(self.read, self.eptp)

    def read(self, host_physical: int) -> int:
        table = self.tables.get(host_physical & ~(PAGE - 1))
        if table is not None:
            return int(struct.unpack_from("<Q", table, host_physical & (PAGE - 1))[0])
        return int(struct.unpack("<Q", self.memory.read(host_physical, 8))[0])

    def protect(self, guest_page: int, *, read: bool = True, write: bool = True, execute: bool = True) -> None:
        self._map(guest_page, ept_entry(self.guest_base + guest_page, read=read, write=write, execute=execute))

    def _table(self) -> int:
        address = self._next
        self._next += PAGE
        self.tables[address] = bytearray(PAGE)
        return address

    def _map(self, guest_page: int, leaf: int) -> None:
        table = self.eptp & EPT_ADDRESS_MASK
        for shift in SHIFTS[:3]:
            at = table + (guest_page >> shift & 0x1FF) * 8
            entry = self.read(at)
            if not entry & EPT_PERMISSIONS:
                entry = ept_entry(self._table(), leaf=False)
                struct.pack_into("<Q", self.tables[table], at - table, entry)
            table = entry & EPT_ADDRESS_MASK
        struct.pack_into("<Q", self.tables[table], (guest_page >> 12 & 0x1FF) * 8, leaf)
