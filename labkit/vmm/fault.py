"""The fault port: where the default exception handlers report a guest's fault.

Every vector of the default IDT (IVT in real mode) that ``labkit.x86.boot``
installs points at a stub that saves the accumulator, writes the vector number
to ``FAULT_PORT`` and halts.  This device reads the exception frame under the
stub's saved accumulator (layout in ``labkit.x86.boot``'s docstring), turns
it into a :class:`labkit.vmm.status.Fault` with the registers as they were at
the fault, and ends the run.  A guest with its own IDT never reaches it.
"""

from __future__ import annotations

import struct
from dataclasses import replace
from typing import Callable

from labkit.vmm.status import Fault, Status
from labkit.x86.idt import ERROR_CODE_VECTORS
from labkit.x86.state import Regs, SRegs

WORD = {16: ("<H", 2), 32: ("<I", 4), 64: ("<Q", 8)}


def read_fault_frame(mode: int, vector: int, regs: Regs, sregs: SRegs,
                     memory: memoryview) -> tuple[Fault, Regs]:
    """The fault a default stub reported, and the registers at the fault.

    Raises ``ValueError`` when the frame does not lie inside guest RAM (the
    guest broke its own stack before faulting).
    """
    fmt, width = WORD[mode]
    address = sregs.ss.base + (regs.rsp & (0xFFFF if mode == 16 else 0xFFFF_FFFF_FFFF_FFFF))
    count = 7 if mode == 64 else 6

    if address < 0 or address + count * width > len(memory):
        raise ValueError(f"the exception frame at {address:#x} is outside guest RAM")

    def word(index: int) -> int:
        return struct.unpack_from(fmt, memory, address + index * width)[0]

    saved_ax = word(0)
    index = 1
    error_code = None
    if mode != 16 and vector in ERROR_CODE_VECTORS:
        error_code = word(1)
        index = 2
    rip, cs, rflags = word(index), word(index + 1), word(index + 2)
    if mode == 64 or (mode == 32 and cs & 3 == 3):
        rsp = word(index + 3)
    else:
        rsp = (regs.rsp + (index + 3) * width) & (0xFFFF if mode == 16 else 0xFFFF_FFFF)
    accumulator_mask = {16: 0xFFFF, 32: 0xFFFF_FFFF, 64: 0xFFFF_FFFF_FFFF_FFFF}[mode]
    rax = (regs.rax & ~accumulator_mask) | saved_ax
    at_fault = replace(regs, rax=rax, rip=rip, rsp=rsp, rflags=rflags)
    return Fault(vector, rip, error_code, sregs.cr2 if vector == 14 else None), at_fault


class FaultReporter:
    """The device at ``FAULT_PORT``: a write of a vector ends the run with status ``fault``."""

    def __init__(self, mode: int, backend, on_fault: Callable[[Status, Regs], None]):
        self._mode = mode
        self._backend = backend
        self._on_fault = on_fault

    def write(self, offset: int, size: int, value: int) -> None:
        vector = value & 0xFF
        regs = self._backend.get_regs()
        try:
            fault, at_fault = read_fault_frame(
                self._mode, vector, regs, self._backend.get_sregs(), self._backend.memory)
        except ValueError as error:
            self._on_fault(Status("fault", message=str(error), fault=Fault(vector, regs.rip)), regs)
            return
        self._on_fault(Status("fault", fault=fault), at_fault)

    def read(self, offset: int, size: int) -> int:
        return 0
