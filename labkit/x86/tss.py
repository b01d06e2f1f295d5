"""The 32-bit and 64-bit task-state segments (Intel SDM vol. 3, 8.2.1 and 8.7).

labkit uses the TSS only for the stack a fault or ``int`` from ring 3 switches
to (RSP0/ESP0 = ``KERNEL_STACK_TOP``, SS0 = ``KERNEL_DS`` in 32-bit mode).
The I/O-permission-bitmap offset points past the segment limit, so the TSS has
no bitmap: ring-3 ``in``/``out`` with IOPL 0 raises #GP, which is the lesson.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from labkit.errors import ConfigError
from labkit.x86 import layout

TSS_SIZE = 104
NO_IO_BITMAP = TSS_SIZE
"""An IOPB offset at or beyond the limit (0x67) means "no I/O bitmap"."""

_TSS64 = struct.Struct("<I3Q Q 7Q Q H H")
_TSS32 = struct.Struct("<I 6I 3I 8I 7I H H")


@dataclass(frozen=True)
class Tss64:
    rsp: tuple[int, int, int] = (layout.KERNEL_STACK_TOP, 0, 0)
    ist: tuple[int, ...] = (0,) * 7
    iopb_offset: int = NO_IO_BITMAP


@dataclass(frozen=True)
class Tss32:
    esp0: int = layout.KERNEL_STACK_TOP
    ss0: int = layout.KERNEL_DS
    esp1: int = 0
    ss1: int = 0
    esp2: int = 0
    ss2: int = 0
    iopb_offset: int = NO_IO_BITMAP


def build_tss64(tss: Tss64 = Tss64()) -> bytes:
    """The 104-byte long-mode TSS: RSP0-2 at offset 4, IST1-7 at 36, IOPB offset at 102."""
    if len(tss.rsp) != 3 or len(tss.ist) != 7:
        raise ConfigError("a 64-bit TSS has 3 RSP and 7 IST slots")
    return _TSS64.pack(0, *tss.rsp, 0, *tss.ist, 0, 0, tss.iopb_offset)


def decode_tss64(raw: bytes) -> Tss64:
    values = _TSS64.unpack_from(raw)
    return Tss64(rsp=tuple(values[1:4]), ist=tuple(values[5:12]), iopb_offset=values[-1])


def build_tss32(tss: Tss32 = Tss32()) -> bytes:
    """The 104-byte 32-bit TSS: ESP0 at 4, SS0 at 8, ..., IOPB offset at 102."""
    stacks = (tss.esp0, tss.ss0, tss.esp1, tss.ss1, tss.esp2, tss.ss2)
    return _TSS32.pack(0, *stacks, 0, 0, 0, *(0,) * 8, *(0,) * 7, 0, tss.iopb_offset)


def decode_tss32(raw: bytes) -> Tss32:
    values = _TSS32.unpack_from(raw)
    esp0, ss0, esp1, ss1, esp2, ss2 = values[1:7]
    return Tss32(esp0, ss0, esp1, ss1, esp2, ss2, iopb_offset=values[-1])
