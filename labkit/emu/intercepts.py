"""#GP for the CR0/CR4 loads and MSR accesses a real CPU refuses, which QEMU 5.0 (in Unicorn 2.1.4) lets run.

QEMU 5.0's ``helper_write_crN`` loads CR0 and CR4 without checking reserved or
inconsistent bits (and cuts a 64-bit value to 32 bits), and ``helper_rdmsr`` /
``helper_wrmsr`` read 0 for, and drop writes to, any MSR they do not model.
KVM gives #GP for all of these.  Unicorn has no hook for MOV CR, RDMSR or WRMSR
(``UC_HOOK_INSN`` takes IN, OUT, SYSCALL, SYSENTER, CPUID, RDTSC, RDTSCP), but
both helpers call ``cpu_svm_check_intercept_param`` first, and that is the
seam used here: with ``HF_GUEST_MASK`` set in hflags and intercept bits for
CR0/CR4 writes and MSR accesses, the CPU leaves the instruction unexecuted
(state restored to its start) and raises ``EXCP_VMEXIT + exit code``, which
Unicorn hands to the UC_HOOK_INTR hook (Unicorn's ``cpu_vmexit`` writes no
VMCB).  Nothing else changes: every other intercept bit is 0, EFER.SVME stays 0
(so VMRUN and friends stay #UD, as on a host without nested SVM), and the
guest never sees the bit.

The emulation backend then decides in Python: #GP(0) at the instruction
(SDM vol. 3, 2.5 and vol. 2 MOV CR, RDMSR, WRMSR), or run that one instruction
with the intercepts off.  Refused:

- CR0: bits 63:32 set; NW = 1 with CD = 0; PG = 1 with PE = 0; PG 0 -> 1 with
  EFER.LME = 1 and CR4.PAE = 0; PG = 0 in 64-bit mode (what KVM's
  ``kvm_set_cr0`` checks).
- CR4: any bit the emulated CPU's CPUID does not announce (KVM's
  ``__cr4_reserved_bits``: VME/PVI need VME, PSE, PAE, MCE, PGE, OSFXSR needs
  FXSR, OSXMMEXCPT needs SSE, UMIP, LA57, VMXE, SMXE, FSGSBASE, PCIDE, OSXSAVE
  needs XSAVE, SMEP, SMAP, PKE), bits 63:32, and PAE = 0 in IA-32e mode.
- RDMSR/WRMSR of an MSR not in :data:`KNOWN_MSRS`, the MSRs QEMU 5.0's
  ``helper_rdmsr`` models (the list is copied from it; IA32_TSC, 0x10, is not
  among them and so is #GP here, while real CPUs have it).  Values written to
  known MSRs are not checked (a non-canonical LSTAR is not #GP here).

The offsets used: ``vm_vmcb``, ``intercept`` and ``intercept_cr_write``
follow ``old_exception`` in QEMU 5.0's ``CPUX86State`` (found by
:mod:`labkit.emu.cpu_state`), and are verified once per process in a scratch
engine by provoking both intercepts.  MSR intercepts read a permission bitmap
through ``vm_vmcb``: three hidden pages at :data:`SVM_PAGES` (a VMCB pointing
at an all-ones bitmap), mapped in every engine, far above anything labkit's
layout uses; a guest that maps that physical address with its own page tables
can read them.
"""

from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass
from typing import Iterator

from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_64, UC_PROT_ALL, UC_PROT_READ, Uc
from unicorn import x86_const as X

from labkit.emu import cpu_state as S
from labkit.errors import EmulatorError
from labkit.x86.arch import CR0_CD, CR0_NW, CR0_PE, CR0_PG, CR4_PAE, EFER_LME

EXCP_VMEXIT = 0x100
SVM_EXIT_WRITE_CR0 = 0x10
SVM_EXIT_MSR = 0x7C
SVM_EXIT_INTR = 0x60
HF_GUEST_MASK = 1 << 21
SVM_PAGES = (1 << 40) - 0x3000
"""Guest-physical address of the hidden VMCB page and the two-page MSR permission bitmap after it."""
_MSRPM_BASE_PA = 0x48  # offsetof(struct vmcb, control.msrpm_base_pa)

KNOWN_MSRS = frozenset(
    [0x174, 0x175, 0x176,  # IA32_SYSENTER_CS, _ESP, _EIP
     0x1B,  # IA32_APIC_BASE
     0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084,  # EFER, STAR, LSTAR, CSTAR, FMASK
     0xC0000100, 0xC0000101, 0xC0000102, 0xC0000103,  # FS_BASE, GS_BASE, KERNEL_GS_BASE, TSC_AUX
     0x277,  # IA32_PAT
     0xC0010117,  # VM_HSAVE_PA
     0x198,  # IA32_PERF_STATUS
     0x34,  # MSR_SMI_COUNT
     0xFE, 0x2FF, 0x250, 0x258, 0x259,  # MTRRcap, MTRRdefType, fixed-range MTRRs
     0x179, 0x17A, 0x17B,  # IA32_MCG_CAP, _STATUS, _CTL
     0x1A0,  # IA32_MISC_ENABLE
     0xD90,  # IA32_BNDCFGS
     0x8B]  # IA32_BIOS_SIGN_ID (microcode revision)
    + list(range(0x200, 0x210))  # MTRRphysBase/Mask 0..7
    + list(range(0x268, 0x270))  # fixed-range 4K MTRRs
    + list(range(0x400, 0x400 + 4 * 10)))  # IA32_MC0..9 CTL/STATUS/ADDR/MISC (QEMU's default 10 banks)
"""The MSRs the emulated CPU has: the cases of QEMU 5.0's helper_rdmsr (target/i386/misc_helper.c)."""


@dataclass(frozen=True)
class InterceptFields:
    """Offsets in CPUX86State of the SVM intercept state, and the CR4 bits the emulated CPU allows."""

    vm_vmcb: int
    intercept: int
    intercept_cr_write: int
    cr4_valid: int


_fields: InterceptFields | None = None


def _cpuid(uc: Uc, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    uc.mem_write(0x1000, b"\x0f\xa2")  # cpuid
    uc.reg_write(X.UC_X86_REG_RAX, leaf)
    uc.reg_write(X.UC_X86_REG_RCX, subleaf)
    uc.emu_start(0x1000, 0x1002)
    return tuple(uc.reg_read(reg) & 0xFFFFFFFF for reg in (X.UC_X86_REG_EAX, X.UC_X86_REG_EBX, X.UC_X86_REG_ECX,
                                                          X.UC_X86_REG_EDX))


def cr4_valid_bits(leaf1: tuple[int, int, int, int], leaf7: tuple[int, int, int, int]) -> int:
    """CR4 bits a CPU with these CPUID leaves 1 and 7 accepts (KVM's __cr4_reserved_bits, inverted)."""
    _, _, ecx1, edx1 = leaf1
    _, ebx7, ecx7, _ = leaf7
    rules = [(0, edx1 >> 1), (1, edx1 >> 1), (2, edx1 >> 4), (3, edx1 >> 2), (4, edx1 >> 3), (5, edx1 >> 6),
             (6, edx1 >> 7), (7, edx1 >> 13), (8, 1), (9, edx1 >> 24), (10, edx1 >> 25), (11, ecx7 >> 2),
             (12, ecx7 >> 16), (13, ecx1 >> 5), (14, ecx1 >> 6), (16, ebx7), (17, ecx1 >> 17), (18, ecx1 >> 26),
             (20, ebx7 >> 7), (21, ebx7 >> 20), (22, ecx7 >> 3)]
    return sum(1 << bit for bit, feature in rules if feature & 1)


def map_svm_pages(uc: Uc) -> None:
    """Map the hidden VMCB (read-only for the guest) and the all-ones MSR permission bitmap."""
    uc.mem_map(SVM_PAGES, 0x3000, UC_PROT_READ)
    uc.mem_write(SVM_PAGES + _MSRPM_BASE_PA, (SVM_PAGES + 0x1000).to_bytes(8, "little"))
    uc.mem_write(SVM_PAGES + 0x1000, b"\xff" * 0x2000)


def find_intercept_fields() -> InterceptFields:
    """Offsets of vm_vmcb, intercept, intercept_cr_write (after old_exception), verified by provoking intercepts."""
    global _fields
    if _fields is not None:
        return _fields
    deep = S.find_deep_fields()
    vm_vmcb = (deep.old_exception + 4 + 7) & ~7  # int old_exception; uint64_t vm_vmcb, tsc_offset, intercept; ...
    candidate = InterceptFields(vm_vmcb=vm_vmcb, intercept=vm_vmcb + 16, intercept_cr_write=vm_vmcb + 26,
                                cr4_valid=0)
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x10000, UC_PROT_ALL)
    cr4_valid = cr4_valid_bits(_cpuid(uc, 1), _cpuid(uc, 7))
    map_svm_pages(uc)
    address = S.locate_state(uc)
    seen: list[tuple[int, int]] = []

    def on_interrupt(engine: Uc, vector: int, _data: object) -> None:
        seen.append((vector, engine.reg_read(X.UC_X86_REG_RIP)))
        engine.emu_stop()

    hook = uc.hook_add(UC_HOOK_INTR, on_interrupt)
    try:
        for at, code, expected in ((0x2000, b"\x0f\x22\xe0", EXCP_VMEXIT + SVM_EXIT_WRITE_CR0 + 4),  # mov cr4, rax
                                   (0x3000, b"\x0f\x22\xc0", EXCP_VMEXIT + SVM_EXIT_WRITE_CR0),  # mov cr0, rax
                                   (0x4000, b"\x0f\x32", EXCP_VMEXIT + SVM_EXIT_MSR)):  # rdmsr
            uc.reg_write(X.UC_X86_REG_RAX, uc.reg_read(X.UC_X86_REG_CR4) if code[2:] == b"\xe0"
                         else uc.reg_read(X.UC_X86_REG_CR0))
            uc.reg_write(X.UC_X86_REG_RCX, 0x10)
            uc.mem_write(at, code + b"\xf4")
            seen.clear()
            with _intercepting(address, candidate):
                uc.emu_start(at, at + len(code) + 1)
            if seen != [(expected, at)]:
                raise EmulatorError(f"the SVM intercept fields at {vm_vmcb} (after old_exception) do not "
                                    f"intercept {code.hex()}: saw {seen}, expected vector {expected:#x}")
    finally:
        uc.hook_del(hook)
        del on_interrupt, uc
    _fields = InterceptFields(vm_vmcb=vm_vmcb, intercept=vm_vmcb + 16, intercept_cr_write=vm_vmcb + 26,
                              cr4_valid=cr4_valid)
    return _fields


@contextlib.contextmanager
def _intercepting(address: int, fields: InterceptFields) -> Iterator[None]:
    hflags = ctypes.c_uint32.from_address(address + S.HFLAGS)
    ctypes.c_uint64.from_address(address + fields.vm_vmcb).value = SVM_PAGES
    ctypes.c_uint64.from_address(address + fields.intercept).value = 1 << (SVM_EXIT_MSR - SVM_EXIT_INTR)
    ctypes.c_uint16.from_address(address + fields.intercept_cr_write).value = 0b1_0001  # CR0, CR4
    hflags.value |= HF_GUEST_MASK
    try:
        yield
    finally:
        hflags.value &= ~HF_GUEST_MASK


class Intercepts:
    """One engine's CR0/CR4/MSR intercepts: installed at creation, off around host-side MSR calls."""

    def __init__(self, uc: Uc, cpu: S.CpuStateView):
        self.fields = find_intercept_fields()
        self.cpu = cpu
        map_svm_pages(uc)
        q, u16 = cpu.q, cpu.bytes.cast("H")
        q[self.fields.vm_vmcb // 8] = SVM_PAGES
        q[self.fields.intercept // 8] = 1 << (SVM_EXIT_MSR - SVM_EXIT_INTR)
        u16[self.fields.intercept_cr_write // 2] = 0b1_0001
        u16.release()
        self.on()

    def on(self) -> None:
        self.cpu.u32[S.HFLAGS // 4] |= HF_GUEST_MASK

    def off(self) -> None:
        self.cpu.u32[S.HFLAGS // 4] &= ~HF_GUEST_MASK

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """For RDMSR/WRMSR through Unicorn's API (get_msrs, set_msrs, the syscall hook): an intercept
        there would leave QEMU's helper by longjmp outside the CPU loop."""
        was_on = bool(self.cpu.u32[S.HFLAGS // 4] & HF_GUEST_MASK)
        self.off()
        try:
            yield
        finally:
            if was_on:
                self.on()

    def refuses(self, exit_code: int, is_write: int, instruction: bytes, long_mode: bool, code64: bool) -> bool:
        """Whether the intercepted instruction gets #GP(0) instead of running (see the module docstring)."""
        cpu = self.cpu
        q = cpu.q
        if exit_code == SVM_EXIT_MSR:
            return (q[1] & 0xFFFF_FFFF) not in KNOWN_MSRS
        decoded = decode_mov_to_cr(instruction, code64)
        if decoded is None:
            return False  # lmsw or clts: they cannot set a refused bit
        cr, gpr = decoded
        value = q[gpr] if code64 else q[gpr] & 0xFFFF_FFFF
        cr0, cr4, efer = q[S.CR // 8], q[(S.CR + 32) // 8], q[cpu.deep.efer // 8]
        if cr == 0:
            return bool(value >> 32 or (value & CR0_NW and not value & CR0_CD) or (value & CR0_PG and not value & CR0_PE)
                        or (value & CR0_PG and not cr0 & CR0_PG and efer & EFER_LME and not cr4 & CR4_PAE)
                        or (not value & CR0_PG and code64))
        if cr == 4:
            return bool(value & ~self.fields.cr4_valid or (long_mode and not value & CR4_PAE))
        return False


def decode_mov_to_cr(code: bytes, code64: bool) -> tuple[int, int] | None:
    """(control register, GPR index in QEMU's regs[] order) of a ``mov crN, reg`` (0F 22 /r); None otherwise."""
    rex = 0
    for i, byte in enumerate(code[:15]):
        if byte in (0x66, 0x67, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0xF0):
            rex = 0
            continue
        if code64 and 0x40 <= byte <= 0x4F:
            rex = byte
            continue
        if byte == 0x0F and i + 2 < len(code) and code[i + 1] == 0x22:
            modrm = code[i + 2]
            return ((modrm >> 3) & 7) | (8 if rex & 4 else 0), (modrm & 7) | (8 if rex & 1 else 0)
        return None
    return None
