"""Backend-neutral architectural state of one vCPU.

Field names follow ``struct kvm_regs``, ``struct kvm_segment``, ``struct kvm_dtable``
and ``struct kvm_sregs`` in linux/kvm.h (asm/kvm.h), so the KVM backend copies
them one to one and the emulation backend maps them onto Unicorn registers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

GPR_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)


@dataclass(slots=True)
class Regs:
    """General-purpose registers, RIP and RFLAGS (``struct kvm_regs``)."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def gprs(self) -> dict[str, int]:
        """The sixteen general-purpose registers only (what differential tests compare)."""
        return {name: getattr(self, name) for name in GPR_NAMES}


@dataclass(slots=True)
class Segment:
    """A segment register with its hidden descriptor cache (``struct kvm_segment``)."""

    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 0x3
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0  # noqa: E741 - the kernel's name
    g: int = 0
    avl: int = 0
    unusable: int = 0


@dataclass(slots=True)
class DescriptorTable:
    """GDTR or IDTR (``struct kvm_dtable``)."""

    base: int = 0
    limit: int = 0xFFFF


def _segment() -> Segment:
    return Segment()


@dataclass(slots=True)
class SRegs:
    """Segment, descriptor-table and control registers (``struct kvm_sregs``, minus the interrupt bitmap)."""

    cs: Segment = field(default_factory=lambda: Segment(type=0xB))
    ds: Segment = field(default_factory=_segment)
    es: Segment = field(default_factory=_segment)
    fs: Segment = field(default_factory=_segment)
    gs: Segment = field(default_factory=_segment)
    ss: Segment = field(default_factory=_segment)
    tr: Segment = field(default_factory=lambda: Segment(type=0xB, s=0))
    ldt: Segment = field(default_factory=lambda: Segment(type=0x2, s=0))
    gdt: DescriptorTable = field(default_factory=DescriptorTable)
    idt: DescriptorTable = field(default_factory=DescriptorTable)
    cr0: int = 0x60000010
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0xFEE00900

    @property
    def cpl(self) -> int:
        """The current privilege level: the DPL of SS (Intel SDM vol. 3, 5.5)."""
        return self.ss.dpl


@dataclass(frozen=True, slots=True)
class FpuState:
    """x87 and SSE state, as FXSAVE stores it (Intel SDM vol. 1, 10.5.1; ``struct kvm_fpu``).

    ``st`` holds ST(0)..ST(7) in stack order as 80-bit values (64-bit significand,
    then sign and exponent in the top 16 bits); ``ftw`` is FXSAVE's abridged tag byte
    (bit i set: physical register i holds a value); ``xmm`` holds XMM0..XMM15 as
    128-bit integers.
    """

    fcw: int = 0x37F
    fsw: int = 0
    ftw: int = 0
    fop: int = 0
    fip: int = 0
    fdp: int = 0
    mxcsr: int = 0x1F80
    st: tuple[int, ...] = (0,) * 8
    xmm: tuple[int, ...] = (0,) * 16


@dataclass(frozen=True, slots=True)
class DebugRegs:
    """DR0-DR3, DR6 and DR7 (``struct kvm_debugregs``; Intel SDM vol. 3, 18.2)."""

    dr0: int = 0
    dr1: int = 0
    dr2: int = 0
    dr3: int = 0
    dr6: int = 0xFFFF0FF0
    dr7: int = 0x400
