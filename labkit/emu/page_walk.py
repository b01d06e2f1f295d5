"""The x86 page walk, as the CPU does it for an access (Intel SDM vol. 3, chapter 4).

Linear to guest-physical over guest RAM for the accesses labkit makes on the
guest's behalf (exception delivery reads the IDT, GDT and TSS and pushes the
frame; ``read_linear`` reads code): no paging, 32-bit paging (4 MiB pages with
CR4.PSE), PAE and 4-level paging.  Accessed bits are set on every entry walked
and the dirty bit on the leaf of a write, like the CPU; U/S and R/W are checked
with CR0.WP.  A failed check is :class:`PageFault` with the #PF error code
(P, W/R, U/S) and the address for CR2.  Caching translations (the TLB) is the
caller's business.
"""

from __future__ import annotations


class PageFault(Exception):
    """#PF: ``error_code`` (bit 0 P, bit 1 W/R, bit 2 U/S) and the faulting linear ``address`` (CR2)."""

    def __init__(self, error_code: int, address: int):
        super().__init__(error_code, address)
        self.error_code = error_code
        self.address = address


class TableOutsideRam(Exception):
    """A paging structure lies outside guest RAM (labkit does not walk tables in MMIO)."""


def walk(ram: memoryview, linear: int, write: bool, user: bool, cr0: int, cr3: int, cr4: int,
         long_mode: bool) -> int:
    """Guest-physical page (4 KiB aligned part of the address) behind ``linear``; PageFault if not permitted."""
    size = len(ram)
    wp = bool(cr0 & 0x10000)

    def fail(present: bool) -> PageFault:
        code = (1 if present else 0) | (2 if write else 0) | (4 if user else 0)
        return PageFault(code, linear)

    def entry_at(address: int, width: int) -> int:
        if address + width > size:
            raise TableOutsideRam(f"a page table at guest-physical {address:#x} lies outside RAM")
        return int.from_bytes(ram[address:address + width], "little")

    def mark(address: int, width: int, value: int, bits: int) -> None:
        if value & bits != bits:
            ram[address:address + width] = (value | bits).to_bytes(width, "little")

    if long_mode or cr4 & 0x20:  # PAE or 4-level: 8-byte entries
        mask = 0x000F_FFFF_FFFF_F000
        if long_mode:
            table = cr3 & mask
            levels = [(39, 0), (30, 1), (21, 1), (12, 0)]
        else:
            pdpte_address = (cr3 & 0xFFFFFFE0) + ((linear >> 30) & 3) * 8
            pdpte = entry_at(pdpte_address, 8)
            if not pdpte & 1:
                raise fail(False)
            table = pdpte & mask
            levels = [(21, 1), (12, 0)]
        allowed_user, allowed_write = True, True
        for shift, may_be_large in levels:
            address = table + ((linear >> shift) & 0x1FF) * 8
            entry = entry_at(address, 8)
            if not entry & 1:
                raise fail(False)
            allowed_user &= bool(entry & 4)
            allowed_write &= bool(entry & 2)
            leaf = shift == 12 or (may_be_large and entry & 0x80)
            mark(address, 8, entry, 0x20 | (0x40 if (write and leaf) else 0))
            if leaf:
                if (user and not allowed_user) or (write and not allowed_write and (user or wp)):
                    raise fail(True)
                page_mask = (1 << shift) - 1
                return (entry & mask & ~page_mask) | (linear & page_mask & ~0xFFF)
            table = entry & mask
    # 32-bit paging: 4-byte entries, 4 MiB pages with CR4.PSE
    pde_address = (cr3 & 0xFFFFF000) + ((linear >> 22) & 0x3FF) * 4
    pde = entry_at(pde_address, 4)
    if not pde & 1:
        raise fail(False)
    if pde & 0x80 and cr4 & 0x10:
        if (user and not pde & 4) or (write and not pde & 2 and (user or wp)):
            raise fail(True)
        mark(pde_address, 4, pde, 0x20 | (0x40 if write else 0))
        return (pde & 0xFFC00000) | (linear & 0x3FF000)
    mark(pde_address, 4, pde, 0x20)
    pte_address = (pde & 0xFFFFF000) + ((linear >> 12) & 0x3FF) * 4
    pte = entry_at(pte_address, 4)
    if not pte & 1:
        raise fail(False)
    if (user and not (pde & pte & 4)) or (write and not (pde & pte & 2) and (user or wp)):
        raise fail(True)
    mark(pte_address, 4, pte, 0x20 | (0x40 if write else 0))
    return pte & 0xFFFFF000
