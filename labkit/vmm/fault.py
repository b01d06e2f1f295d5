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

from labkit.errors import ConfigError, GuestMemoryError
from labkit.memory import GuestMemory
from labkit.vmm.status import Fault, Status, StatusKind
from labkit.x86.arch import ERROR_CODE_VECTORS, SELECTOR_RPL, Vector
from labkit.x86.state import Regs, SRegs

WORD = {16: ("<H", 2), 32: ("<I", 4), 64: ("<Q", 8)}


def read_fault_frame(mode: int, vector: int, regs: Regs, sregs: SRegs,
                     memory: GuestMemory) -> tuple[Fault, Regs]:
    """The fault a default stub reported, and the registers at the fault.

    Raises :class:`GuestMemoryError` when the frame does not lie inside guest
    memory (the guest broke its own stack before faulting).
    """
    fmt, width = WORD[mode]
    address = sregs.ss.base + (regs.rsp & (0xFFFF if mode == 16 else 0xFFFF_FFFF_FFFF_FFFF))
    count = 7 if mode == 64 else 6

    if not memory.contains(address, count * width):
        raise GuestMemoryError(f"the exception frame at {address:#x} is outside guest RAM")
    frame = memory.read(address, count * width)

    def word(index: int) -> int:
        return struct.unpack_from(fmt, frame, index * width)[0]

    saved_ax = word(0)
    index = 1
    error_code = None
    if mode != 16 and vector in ERROR_CODE_VECTORS:
        error_code = word(1)
        index = 2
    rip, cs, rflags = word(index), word(index + 1), word(index + 2)
    if mode == 64 or (mode == 32 and cs & SELECTOR_RPL == 3):
        rsp = word(index + 3)
    else:
        rsp = (regs.rsp + (index + 3) * width) & (0xFFFF if mode == 16 else 0xFFFF_FFFF)
    accumulator_mask = {16: 0xFFFF, 32: 0xFFFF_FFFF, 64: 0xFFFF_FFFF_FFFF_FFFF}[mode]
    rax = (regs.rax & ~accumulator_mask) | saved_ax
    at_fault = replace(regs, rax=rax, rip=rip, rsp=rsp, rflags=rflags)
    return Fault(vector, rip, error_code, sregs.cr2 if vector == Vector.PF else None), at_fault


class FaultReporter:
    """The device at ``FAULT_PORT``: a write of a vector ends the run with status ``fault``.

    ``regs``/``sregs`` read the vCPU's registers, ``memory`` is guest memory.
    It has no state of its own (``save()`` is empty).
    """

    def __init__(self, mode: int, regs: Callable[[], Regs], sregs: Callable[[], SRegs], memory: GuestMemory,
                 on_fault: Callable[[Status, Regs], None]):
        self._mode = mode
        self._regs = regs
        self._sregs = sregs
        self._memory = memory
        self._on_fault = on_fault

    def write(self, offset: int, size: int, value: int) -> None:
        vector = value & 0xFF
        regs = self._regs()
        try:
            fault, at_fault = read_fault_frame(self._mode, vector, regs, self._sregs(), self._memory)
        except GuestMemoryError as error:
            self._on_fault(Status(StatusKind.FAULT, message=str(error), fault=Fault(vector, regs.rip)), regs)
            return
        self._on_fault(Status(StatusKind.FAULT, fault=fault), at_fault)

    def read(self, offset: int, size: int) -> int:
        return 0

    def reset(self) -> None:
        """Nothing to reset: the port has no state of its own."""

    def save(self) -> dict:
        return {}

    def restore(self, state: dict) -> None:
        if state:
            raise ConfigError(f"the fault port has no state to restore, got {state!r}")
