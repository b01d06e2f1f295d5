"""A guest that writes a known set of pages per pass, for the dirty-log tests of both backends.

Pass ``n`` stores one qword at ``address + 8`` for each address in ``PASSES[n]``
(``REGION`` stands for the second memory region's guest address), then writes
port 0xf4 (the debug-exit port) and goes on with the next pass when run again.
The guest makes no calls or pushes and labkit's boot page tables have their
accessed and dirty bits set, so these stores are the only guest writes: the
dirty log must give exactly these page frame numbers, on KVM as on emulation.
RAM must be at least 2 MiB; the region at least 1 MiB.
"""

from __future__ import annotations

REGION = "REGION"
PASSES = (
    (0x10_0000, 0x10_1FF0, 0x1F_0000, (REGION, 0x5000)),
    (0x10_0000, 0x15_0000, (REGION, 0)),
    (0x1F_F000, (REGION, 0xF_F000)),
)
_SLOTS = 8


def _address(entry, region: int) -> int:
    return region + entry[1] if isinstance(entry, tuple) else entry


def dirty_guest_pages(pass_index: int, region: int) -> list[int]:
    """The sorted page frame numbers pass ``pass_index`` writes."""
    return sorted({(_address(entry, region) + 8) >> 12 for entry in PASSES[pass_index]})


def dirty_guest_source(region: int) -> str:
    """Intel-syntax source of the guest, for ``region`` at guest-physical ``region``."""
    rows = []
    for entries in PASSES:
        addresses = [_address(entry, region) for entry in entries]
        rows.append("    .quad " + ", ".join(hex(a) for a in addresses + [0] * (_SLOTS - len(addresses))))
    table = "\n".join(rows)
    return f"""
        xor ebx, ebx
    next_pass:
        lea rsi, [rip + table]
        mov rax, rbx
        shl rax, 6
        add rsi, rax
    store:
        mov rdi, [rsi]
        test rdi, rdi
        jz pass_done
        mov qword ptr [rdi + 8], 0x1234
        add rsi, 8
        jmp store
    pass_done:
        inc rbx
        out 0xf4, al
        jmp next_pass
        .balign 8
    table:
{table}
    """
