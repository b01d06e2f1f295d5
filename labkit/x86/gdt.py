"""Segment descriptors and labkit's GDT (Intel SDM vol. 3, 3.4.5 and 7.2.3).

A descriptor is described by :class:`labkit.x86.state.Segment`, the same
``struct kvm_segment`` fields KVM takes in ``KVM_SET_SREGS``, so the hidden part
of a segment register and the descriptor in the GDT come from one value and
cannot disagree.  ``Segment.limit`` is in bytes, as in ``kvm_segment``: with
``g=1`` it must end in ``0xFFF`` and is stored as ``limit >> 12``.

Code and data descriptors are built with their accessed bit already set, and the
TSS descriptor as *busy* (type 0xB), which is what the CPU itself would have
written after loading them; so the CPU never writes to the GDT and the state in
memory matches the registers.
"""

from __future__ import annotations

import struct
from dataclasses import replace

from labkit.errors import ConfigError
from labkit.x86 import layout
from labkit.x86.arch import CODE_RX_ACCESSED, DATA_RW_ACCESSED, LDT, TSS_AVAILABLE, TSS_BUSY  # noqa: F401 (re-exported)
from labkit.x86.state import Segment

DESCRIPTOR_SIZE = 8
SYSTEM_DESCRIPTOR64_SIZE = 16

TSS_LIMIT = 0x67
"""104 bytes - 1: the TSS has no I/O permission bitmap (SDM vol. 3, 8.2.1 / 8.7)."""


def _raw_limit(segment: Segment) -> int:
    if segment.g:
        if segment.limit & 0xFFF != 0xFFF:
            raise ConfigError(f"a page-granular limit must end in 0xFFF, not {segment.limit:#x}")
        raw = segment.limit >> 12
    else:
        raw = segment.limit
    if not 0 <= raw <= 0xFFFFF:
        raise ConfigError(f"segment limit {segment.limit:#x} does not fit 20 bits (g={segment.g})")
    return raw


def encode_descriptor(segment: Segment) -> bytes:
    """The 8-byte descriptor for a code, data or (legacy) system segment."""
    if not 0 <= segment.base <= 0xFFFFFFFF:
        raise ConfigError(f"an 8-byte descriptor holds a 32-bit base, not {segment.base:#x}")
    limit = _raw_limit(segment)
    access = (
        (segment.type & 0xF)
        | (segment.s & 1) << 4
        | (segment.dpl & 3) << 5
        | (segment.present & 1) << 7
    )
    flags = (segment.avl & 1) | (segment.l & 1) << 1 | (segment.db & 1) << 2 | (segment.g & 1) << 3
    low = (limit & 0xFFFF) | (segment.base & 0xFFFF) << 16
    high = (
        (segment.base >> 16) & 0xFF
        | access << 8
        | ((limit >> 16) & 0xF) << 16
        | flags << 20
        | ((segment.base >> 24) & 0xFF) << 24
    )
    return struct.pack("<II", low, high)


def decode_descriptor(raw: bytes, selector: int = 0) -> Segment:
    """The :class:`Segment` (hidden part) an 8-byte descriptor loads, for ``selector``."""
    if len(raw) < DESCRIPTOR_SIZE:
        raise ConfigError(f"a descriptor is 8 bytes, got {len(raw)}")
    low, high = struct.unpack_from("<II", raw)
    base = (low >> 16) | (high & 0xFF) << 16 | (high >> 24) << 24
    limit = (low & 0xFFFF) | ((high >> 16) & 0xF) << 16
    access = (high >> 8) & 0xFF
    flags = (high >> 20) & 0xF
    g = (flags >> 3) & 1
    return Segment(
        base=base,
        limit=(limit << 12) | 0xFFF if g else limit,
        selector=selector,
        type=access & 0xF,
        s=(access >> 4) & 1,
        dpl=(access >> 5) & 3,
        present=(access >> 7) & 1,
        avl=flags & 1,
        l=(flags >> 1) & 1,
        db=(flags >> 2) & 1,
        g=g,
        unusable=0 if (access >> 7) & 1 else 1,
    )


def encode_system_descriptor64(segment: Segment) -> bytes:
    """The 16-byte TSS or LDT descriptor of long mode (SDM vol. 3, 7.2.3): a 64-bit base."""
    if segment.s:
        raise ConfigError("a 16-byte descriptor is for system segments (s=0) only")
    low = encode_descriptor(replace(segment, base=segment.base & 0xFFFFFFFF))
    return low + struct.pack("<II", (segment.base >> 32) & 0xFFFFFFFF, 0)


def decode_system_descriptor64(raw: bytes, selector: int = 0) -> Segment:
    """The :class:`Segment` a 16-byte long-mode system descriptor loads."""
    if len(raw) < SYSTEM_DESCRIPTOR64_SIZE:
        raise ConfigError(f"a long-mode system descriptor is 16 bytes, got {len(raw)}")
    segment = decode_descriptor(raw[:8], selector)
    (upper,) = struct.unpack_from("<I", raw, 8)
    segment.base |= upper << 32
    return segment


def _flat(selector: int, code: bool, *, long: bool = False, default32: bool = True) -> Segment:
    return Segment(
        base=0,
        limit=0xFFFFFFFF,
        selector=selector,
        type=CODE_RX_ACCESSED if code else DATA_RW_ACCESSED,
        present=1,
        dpl=selector & 3,
        db=1 if default32 and not long else 0,
        s=1,
        l=1 if long else 0,
        g=1,
    )


def gdt_segments() -> dict[int, Segment]:
    """Every non-null descriptor of labkit's GDT, by selector (RPL bits as in layout.py).

    KERNEL_DS is a flat 4 GiB data segment with D/B=1: valid as SS in both
    protected mode (32-bit stack) and long mode (where base, limit and D/B of
    data segments are ignored).
    """
    segments = {
        layout.KERNEL_CS64: _flat(layout.KERNEL_CS64, True, long=True),
        layout.KERNEL_DS: _flat(layout.KERNEL_DS, False),
        layout.USER_CS32: _flat(layout.USER_CS32, True),
        layout.USER_DS: _flat(layout.USER_DS, False),
        layout.USER_CS64: _flat(layout.USER_CS64, True, long=True),
        layout.KERNEL_CS32: _flat(layout.KERNEL_CS32, True),
        layout.KERNEL_CS16: Segment(
            base=0, limit=0xFFFF, selector=layout.KERNEL_CS16, type=CODE_RX_ACCESSED,
            present=1, dpl=0, db=0, s=1, l=0, g=0,
        ),
        layout.TSS_SELECTOR: tss_segment(),
    }
    return segments


def tss_segment() -> Segment:
    """TR as loaded by ``ltr TSS_SELECTOR``: busy TSS at TSS_ADDRESS, limit 0x67.

    Type 0xB is "busy 32-bit TSS" outside long mode and "busy 64-bit TSS" in it;
    VM entry requires exactly this type for TR (SDM vol. 3, 27.3.1.2).
    """
    return Segment(
        base=layout.TSS_ADDRESS, limit=TSS_LIMIT, selector=layout.TSS_SELECTOR,
        type=TSS_BUSY, present=1, dpl=0, db=0, s=0, l=0, g=0,
    )


def build_gdt() -> bytes:
    """labkit's GDT: ``GDT_ENTRIES`` x 8 bytes, to be written at ``GDT_ADDRESS``.

    The TSS descriptor is the 16-byte long-mode form; with a base below 4 GiB its
    upper half is all zero, which outside long mode reads as a null descriptor,
    so the same table serves 16-, 32- and 64-bit guests.
    """
    table = bytearray(layout.GDT_ENTRIES * DESCRIPTOR_SIZE)
    for selector, segment in gdt_segments().items():
        index = selector & ~7
        if segment.s:
            table[index:index + 8] = encode_descriptor(segment)
        else:
            table[index:index + 16] = encode_system_descriptor64(segment)
    return bytes(table)


def gdt_limit() -> int:
    """GDTR.limit: the table's size in bytes minus one."""
    return layout.GDT_ENTRIES * DESCRIPTOR_SIZE - 1
