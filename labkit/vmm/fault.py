"""The fault port: where the default exception handlers report a guest's fault.

Every vector of the default IDT (IVT in real mode) that labkit's boot set-up
installs points at a stub that writes the vector number to ``FAULT_PORT``.
This device reads the exception frame the stub left on the guest's stack,
turns it into a :class:`labkit.vmm.status.Fault`, and ends the run.  A guest
that installs its own IDT never reaches it.
"""

from __future__ import annotations

from typing import Callable

from labkit.vmm.status import Fault, Status
from labkit.x86.boot import read_fault_frame
from labkit.x86.state import Regs


class FaultReporter:
    def __init__(self, mode: int, backend, on_fault: Callable[[Status], None]):
        self._mode = mode
        self._backend = backend
        self._on_fault = on_fault
        self.regs_at_fault: Regs | None = None

    def write(self, offset: int, size: int, value: int) -> None:
        regs = self._backend.get_regs()
        sregs = self._backend.get_sregs()
        frame = read_fault_frame(self._mode, value & 0xFF, regs, self._backend.memory)
        cr2 = sregs.cr2 if frame.vector == 14 else None
        self.regs_at_fault = frame.regs
        self._on_fault(Status("fault", fault=Fault(frame.vector, frame.rip, frame.error_code, cr2)))

    def read(self, offset: int, size: int) -> int:
        return 0
