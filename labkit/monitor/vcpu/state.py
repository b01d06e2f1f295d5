"""The virtual CPU's state: what a deprivileged guest kernel believes ring 0 owns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from labkit.errors import LabkitError
from labkit.x86 import layout
from labkit.x86.arch import (CR0_ET, CR0_NE, CR0_PE, CR0_PG, CR0_WP, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_PAE, EFER_LMA,
                             EFER_LME, EFER_SCE, MSR_EFER)
from labkit.x86.gdt import gdt_limit
from labkit.x86.idt import idt_limit


class VirtualTripleFault(LabkitError):
    """The guest's virtual IDT cannot deliver an exception (no gate, not present, outside RAM)."""


class PortDevice(Protocol):
    """A device only the monitor has, reached by the guest's trapped ``in``/``out``."""

    def read(self, port: int, size: int) -> int: ...

    def write(self, port: int, size: int, value: int) -> None: ...


@dataclass
class VirtualCpu:
    """What the deprivileged guest kernel believes ring 0 owns; starts as labkit's 64-bit boot state."""

    interrupts_enabled: bool = False
    """The virtual RFLAGS.IF (the real IF stays 1 while the guest runs in ring 3)."""
    cr0: int = CR0_PE | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    cr2: int = 0
    cr3: int = layout.PML4_ADDRESS
    cr4: int = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    gdtr: tuple[int, int] = (layout.GDT_ADDRESS, gdt_limit())
    """(base, limit) as the guest loaded it with ``lgdt``."""
    idtr: tuple[int, int] = (layout.IDT_ADDRESS, idt_limit(64))
    ldtr: int = 0
    tr: int = layout.TSS_SELECTOR
    cs: int = layout.KERNEL_CS64
    """The code selector the guest believes it runs with (RPL 0); pushed in reflected frames."""
    ss: int = layout.KERNEL_DS
    msrs: dict[int, int] = field(default_factory=lambda: {MSR_EFER: EFER_SCE | EFER_LME | EFER_LMA})
    pending: list[int] = field(default_factory=list)
    """Vectors of virtual interrupts waiting for the virtual IF, oldest first."""
    halted: bool = False
    """Set by an emulated ``hlt``; the monitor decides whether to wake the guest or end the run."""
    ports: dict[int, PortDevice] = field(default_factory=dict, repr=False, compare=False)
    """Port -> a device only the monitor has (consulted before the machine's bus)."""
    emulated: dict[str, int] = field(default_factory=dict)
    """Emulated instructions by mnemonic."""
    reflected: dict[int, int] = field(default_factory=dict)
    """Exceptions and interrupts reflected into the virtual IDT, by vector."""

    def snapshot(self) -> "VirtualCpu":
        """A copy without the port devices (it pickles)."""
        return VirtualCpu(self.interrupts_enabled, self.cr0, self.cr2, self.cr3, self.cr4, self.gdtr, self.idtr,
                          self.ldtr, self.tr, self.cs, self.ss, dict(self.msrs), list(self.pending), self.halted,
                          {}, dict(self.emulated), dict(self.reflected))
