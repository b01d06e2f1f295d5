"""The state a labkit guest starts in: memory image, registers and MSRs per mode.

``boot_state(mode, entry, memory_size)`` is what both backends load before the
first instruction.  KVM takes ``sregs`` as is (``KVM_SET_SREGS``), so every
segment's hidden part equals its GDT descriptor (``gdt.gdt_segments``) and the
whole is a valid VM-entry state (Intel SDM vol. 3, 27.3.1 "Checks on the Guest
State Area"): CS type 0xB (accessed code), SS.DPL == CS.DPL, TR a busy TSS
(type 0xB), LDTR unusable, CR0.PE/PG, CR4.PAE and EFER.LME/LMA consistent.

Per mode (SDM vol. 3, 9.9 "Mode Switching" and 9.8.5 "Initializing IA-32e Mode")::

    mode 16  real mode: CR0 = ET.  CS = 0, IP = entry, DS = ES = FS = GS = 0,
             SS:SP = (stack_top - 0x10000) >> 4 : 0xFFFE (SS = 0, SP = stack_top - 2
             when stack_top <= 0x10000).  IVT at 0 (IDTR 0/0x3FF).
    mode 32  flat protected mode, paging off: CR0 = PE|ET|NE, CS = KERNEL_CS32,
             SS = DS = ES = FS = GS = KERNEL_DS (D/B = 1), ESP = stack_top.
    mode 64  long mode: CR0 = PE|ET|NE|WP|PG, CR4 = PAE|OSFXSR|OSXMMEXCPT,
             EFER = SCE|LME|LMA, CR3 = PML4_ADDRESS (identity map, see paging.py),
             CS = KERNEL_CS64 (L = 1), SS = DS = ES = FS = GS = KERNEL_DS.

In every mode GDTR points at ``build_gdt()``, TR at the TSS (RSP0/ESP0 =
KERNEL_STACK_TOP), and every IDT vector (IVT entry in real mode) at its own
8-byte fault stub in the boot area, except vector 4, the ``int 4`` kernel-service
gate, in 32/64-bit mode.  Vectors 3 and 4 have DPL 3, so ring 3 may use ``int3``
and ``int 4``; any other ``int n`` from ring 3 raises #GP (#UD under PVM, whose
instruction emulator cannot run a protected-mode ``int n``).

Fault stubs
-----------

Stub ``v`` sits at ``fault_stub_address(v) = BOOT_AREA + 8 * v`` and is the same
8 bytes in every mode::

    50        push rax / eax / ax     save the accumulator
    B0 vv     mov al, v
    E6 F1     out FAULT_PORT, al      labkit sees the vector (the byte written)
    F4        hlt
    EB FD     jmp back to the hlt

So at the ``out`` exit every register except RAX (only AL changed), RSP and
RIP still holds its value at the fault, and the stack holds, from RSP upwards
(``w`` = 8 bytes in 64-bit mode, 4 in 32-bit, 2 in real mode)::

    [rsp + 0]      RAX at the fault
    [rsp + w]      error code        only for vectors 8, 10-14, 17, 21, 29, 30
                                     (idt.ERROR_CODE_VECTORS); absent otherwise
                                     and always absent in real mode
    then           RIP / EIP / IP    of the faulting instruction (of the next one for
                                     traps such as int3 and int n)
    then           CS
    then           RFLAGS / EFLAGS / FLAGS
    64-bit:        RSP, SS           always pushed
    32-bit:        ESP, SS           only if the fault came from ring 3 (CS & 3 == 3);
                                     from ring 0, ESP at the fault = address just
                                     above the EFLAGS slot
    real mode:     SP at the fault = address just above the FLAGS slot (SS unchanged)

On a fault from ring 3 the frame is on the kernel stack (RSP0 = KERNEL_STACK_TOP);
from ring 0 it is on the stack in use (no IST), so a fault with a broken ring-0
stack becomes a triple fault.

Kernel services (``int 4``; also ``syscall`` in 64-bit mode, see below)
---------------------------------------------------------------------

A tiny ring-0 "kernel" in the boot area, for ring-3 programs (whose port I/O
raises #GP: IOPL is 0 and the TSS has no I/O bitmap; so it is under PVM too)::

    eax = 0  exit:  writes dil to DEBUG_EXIT_PORT, then hlt
    eax = 1  write: sends rsi bytes at rdi to COM1 (polling LSR.THRE);
                    returns rax = rsi; clobbers rdx only
    other    returns rax = -1

``int 4`` returns with ``iretq``/``iretd``.  Vector 4 is #OF, which nothing
else raises in 64-bit mode (INTO is invalid there).  Why ``int 4`` and not
``int 0x80`` or ``syscall`` (measured on this project's PVM host and Unicorn 2.1.4):

- under PVM (kvm_pvm) ring-3 ``int3`` and ``int 4`` are delivered through this
  IDT as traps, but every other ``int n`` raises #UD: KVM's instruction
  emulator cannot do a protected-mode ``int n`` (and ``int3`` at CPL 0 is an
  emulation failure, KVM_EXIT_INTERNAL_ERROR);
- under PVM ``syscall`` enters PVM's own supervisor mode, where the handler's
  ``out`` raises #GP and ``sysretq`` raises #GP; Unicorn 2.1.4's SYSCALL does
  not enter ring 0 by itself (labkit's emulation backend does it in a hook).

``syscall`` (LSTAR, STAR, SFMASK set up; returns with ``sysretq``, using the
caller's stack for one return address) therefore works on VT-x/AMD-V and on
the emulation backend, not under PVM.
Under PVM all of 32-bit mode is emulated, so there a 32-bit ``int 4`` from
ring 3 raises #UD as well.

``user=True`` starts at ``USER_TRAMPOLINE``, one ring-0 instruction:

- 64-bit: ``iretq``, whose frame (entry, USER_CS64, RFLAGS = IF|0x2, stack_top,
  USER_DS) is part of the memory image just below KERNEL_STACK_TOP;
- 32-bit: ``sysexit`` with EDX = entry, ECX = stack_top and IA32_SYSENTER_CS =
  0x08 (so CS = USER_CS32, SS = USER_DS), RFLAGS = IF|0x2: KVM's instruction
  emulator, which runs all 32-bit code under PVM, cannot ``iretd`` to an outer
  ring.  The 32-bit ring-3 program therefore starts with ECX = stack_top and
  EDX = entry; every other GPR is 0.

DS/ES/FS/GS are USER_DS from the start so the switch keeps them usable.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from functools import lru_cache
from operator import attrgetter
from typing import Mapping, Protocol, TypeVar

from labkit.errors import ConfigError
from labkit.x86 import layout
from labkit.x86.arch import (CR0_ET, CR0_NE, CR0_PE, CR0_PG, CR0_WP, CR4_OSFXSR, CR4_OSXMMEXCPT,  # noqa: F401
                             CR4_PAE, DATA_RW_ACCESSED, CODE_RX_ACCESSED, EFER_LMA, EFER_LME, EFER_SCE, LDT, MSR_CSTAR,
                             MSR_EFER, MSR_LSTAR, MSR_SFMASK, MSR_STAR, MSR_SYSENTER_CS, RFLAGS_AC, RFLAGS_DF,
                             RFLAGS_FIXED, RFLAGS_IF, RFLAGS_IOPL, RFLAGS_NT, RFLAGS_RF, RFLAGS_TF)
from labkit.x86.gdt import build_gdt, gdt_limit, gdt_segments
from labkit.x86.idt import INTERRUPT_GATE, VECTORS, Gate, build_idt, build_ivt, idt_limit
from labkit.x86.paging import build_page_tables
from labkit.x86.state import DescriptorTable, Regs, Segment, SRegs
from labkit.x86.tss import build_tss32, build_tss64

MODES = (16, 32, 64)

SFMASK_VALUE = RFLAGS_TF | RFLAGS_IF | RFLAGS_DF | RFLAGS_IOPL | RFLAGS_NT | RFLAGS_AC  # 0x47700
"""SYSCALL clears TF, IF, DF, IOPL, NT and AC (as Linux does)."""

KERNEL_SERVICE_VECTOR = 4
SERVICE_EXIT = 0
SERVICE_WRITE = 1

FAULT_STUB_SIZE = 8
USER_TRAMPOLINE = layout.BOOT_AREA + VECTORS * FAULT_STUB_SIZE  # 0xD00
SERVICE_ADDRESS = USER_TRAMPOLINE + 0x10  # 0xD10
BOOT_AREA_END = layout.GDT_ADDRESS


@dataclass(frozen=True)
class Listing:
    """Hand-encoded machine code: ``(bytes, "instruction")`` pairs; ``(b"", ".label:")`` marks a label."""

    mode: int
    lines: tuple[tuple[bytes, str], ...]

    @property
    def code(self) -> bytes:
        return b"".join(encoded for encoded, _ in self.lines)

    def labels(self) -> dict[str, int]:
        """Offset of each label in ``code``."""
        offsets, offset = {}, 0
        for encoded, text in self.lines:
            if text.endswith(":"):
                offsets[text[:-1]] = offset
            offset += len(encoded)
        return offsets


def fault_stub(vector: int) -> Listing:
    """The 8-byte default handler for ``vector``; identical bytes in 16-, 32- and 64-bit mode."""
    if not 0 <= vector < VECTORS:
        raise ConfigError(f"vector must be 0..255, not {vector}")
    return Listing(0, (
        (b"\x50", "push rax"),
        (bytes([0xB0, vector]), f"mov al, {vector:#x}"),
        (bytes([0xE6, layout.FAULT_PORT]), f"out {layout.FAULT_PORT:#x}, al"),
        (b"", ".halt:"),
        (b"\xf4", "hlt"),
        (b"\xeb\xfd", "jmp .halt"),
    ))


def fault_stub_address(vector: int) -> int:
    """Where the default handler for ``vector`` lives (the IDT gate's / IVT entry's target)."""
    return layout.BOOT_AREA + FAULT_STUB_SIZE * vector


SERVICE64 = Listing(64, (
    (b"", ".int4:"),
    (b"\xe8\x0a\x00\x00\x00", "call .service"),
    (b"\x48\xcf", "iretq"),
    (b"", ".syscall:"),
    (b"\xe8\x03\x00\x00\x00", "call .service"),
    (b"\x48\x0f\x07", "sysretq"),
    (b"", ".service:"),
    (b"\x83\xf8\x01", "cmp eax, 1"),
    (b"\x74\x13", "je .write"),
    (b"\x85\xc0", "test eax, eax"),
    (b"\x75\x07", "jne .bad"),
    (b"\x89\xf8", "mov eax, edi"),
    (b"\xe6\xf4", "out 0xf4, al"),
    (b"", ".halt:"),
    (b"\xf4", "hlt"),
    (b"\xeb\xfd", "jmp .halt"),
    (b"", ".bad:"),
    (b"\x48\xc7\xc0\xff\xff\xff\xff", "mov rax, 0xffffffffffffffff"),
    (b"\xc3", "ret"),
    (b"", ".write:"),
    (b"\x57", "push rdi"),
    (b"\x56", "push rsi"),
    (b"\xba\xfd\x03\x00\x00", "mov edx, 0x3fd"),
    (b"", ".next:"),
    (b"\x48\x85\xf6", "test rsi, rsi"),
    (b"\x74\x14", "je .done"),
    (b"", ".poll:"),
    (b"\xec", "in al, dx"),
    (b"\xa8\x20", "test al, 0x20"),
    (b"\x74\xfb", "je .poll"),
    (b"\x8a\x07", "mov al, byte ptr [rdi]"),
    (b"\xb2\xf8", "mov dl, 0xf8"),
    (b"\xee", "out dx, al"),
    (b"\xb2\xfd", "mov dl, 0xfd"),
    (b"\x48\xff\xc7", "inc rdi"),
    (b"\x48\xff\xce", "dec rsi"),
    (b"\xeb\xe7", "jmp .next"),
    (b"", ".done:"),
    (b"\x5e", "pop rsi"),
    (b"\x5f", "pop rdi"),
    (b"\x48\x89\xf0", "mov rax, rsi"),
    (b"\xc3", "ret"),
))
"""The 64-bit kernel services (see the module docstring), at SERVICE_ADDRESS."""

SERVICE32 = Listing(32, (
    (b"", ".int4:"),
    (b"\xe8\x01\x00\x00\x00", "call .service"),
    (b"\xcf", "iretd"),
    (b"", ".service:"),
    (b"\x83\xf8\x01", "cmp eax, 1"),
    (b"\x74\x11", "je .write"),
    (b"\x85\xc0", "test eax, eax"),
    (b"\x75\x07", "jne .bad"),
    (b"\x89\xf8", "mov eax, edi"),
    (b"\xe6\xf4", "out 0xf4, al"),
    (b"", ".halt:"),
    (b"\xf4", "hlt"),
    (b"\xeb\xfd", "jmp .halt"),
    (b"", ".bad:"),
    (b"\xb8\xff\xff\xff\xff", "mov eax, 0xffffffff"),
    (b"\xc3", "ret"),
    (b"", ".write:"),
    (b"\x57", "push edi"),
    (b"\x56", "push esi"),
    (b"\xba\xfd\x03\x00\x00", "mov edx, 0x3fd"),
    (b"", ".next:"),
    (b"\x85\xf6", "test esi, esi"),
    (b"\x74\x10", "je .done"),
    (b"", ".poll:"),
    (b"\xec", "in al, dx"),
    (b"\xa8\x20", "test al, 0x20"),
    (b"\x74\xfb", "je .poll"),
    (b"\x8a\x07", "mov al, byte ptr [edi]"),
    (b"\xb2\xf8", "mov dl, 0xf8"),
    (b"\xee", "out dx, al"),
    (b"\xb2\xfd", "mov dl, 0xfd"),
    (b"\x47", "inc edi"),
    (b"\x4e", "dec esi"),
    (b"\xeb\xec", "jmp .next"),
    (b"", ".done:"),
    (b"\x5e", "pop esi"),
    (b"\x5f", "pop edi"),
    (b"\x89\xf0", "mov eax, esi"),
    (b"\xc3", "ret"),
))
"""The 32-bit kernel services (``int 4`` only), at SERVICE_ADDRESS."""

TRAMPOLINE64 = Listing(64, ((b"\x48\xcf", "iretq"),))
TRAMPOLINE32 = Listing(32, ((b"\x0f\x35", "sysexit"),))
"""KVM's instruction emulator (all 32-bit code under PVM) cannot ``iretd`` to ring 3; SYSEXIT it can."""


def service_entry(mode: int, how: str = "int4") -> int:
    """Guest address of the ``int 4`` (``how="int4"``) or ``syscall`` entry."""
    listing = {64: SERVICE64, 32: SERVICE32}.get(mode)
    if listing is None:
        raise ConfigError(f"kernel services exist in 32- and 64-bit mode, not {mode!r}")
    labels = listing.labels()
    if "." + how not in labels:
        raise ConfigError(f"no {how!r} entry in {mode}-bit mode")
    return SERVICE_ADDRESS + labels["." + how]


_Slotted = TypeVar("_Slotted", Regs, Segment, DescriptorTable)


@dataclass(frozen=True)
class BootState:
    """Everything a backend loads before the guest's first instruction.

    ``memory`` is ``((guest-physical address, bytes), ...)`` to write into
    zeroed RAM; ``regs``/``sregs`` go to ``KVM_SET_REGS``/``KVM_SET_SREGS``
    (or Unicorn's registers), ``msrs`` to ``KVM_SET_MSRS``.  Treat the
    mutable ``Regs``/``SRegs`` as read-only: copy before changing them.
    """

    mode: int
    entry: int
    user: bool
    memory: tuple[tuple[int, bytes], ...]
    regs: Regs
    sregs: SRegs
    msrs: dict[int, int] = field(default_factory=dict)


def boot_state(
    mode: int,
    entry: int,
    memory_size: int,
    *,
    user: bool = False,
    stack_top: int = layout.STACK_TOP,
) -> BootState:
    """The start state for a guest whose code is at ``entry`` (see the module docstring).

    Built once per argument set and process (a pure function of them; building the page
    tables and the IDT in Python took ~3 ms, a third of a KVM VM's whole life with hello64,
    ``benchmarks/bench_fleet.py``); each call gets its own copies of the registers.
    """
    _check(mode, entry, memory_size, user, stack_top)
    built = _built_boot_state(mode, entry, memory_size, user, stack_top)
    sregs = SRegs(*[_fresh(value) if type(value) in _FIELDS_OF else value for value in _SREGS_FIELDS(built.sregs)])
    return BootState(built.mode, built.entry, built.user, built.memory, _fresh(built.regs), sregs, dict(built.msrs))


_FIELDS_OF = {kind: attrgetter(*kind.__slots__) for kind in (Regs, Segment, DescriptorTable)}
_SREGS_FIELDS = attrgetter(*SRegs.__slots__)


def _fresh(value: _Slotted) -> _Slotted:
    """A copy of a slots dataclass (Regs, Segment, DescriptorTable) made by its constructor: ~0.6 µs, where
    ``copy.copy`` (``__reduce_ex__``) takes ~5 µs, and a KVM machine's boot state has eleven of them."""
    kind = type(value)
    return kind(*_FIELDS_OF[kind](value))


@lru_cache(maxsize=64)
def _built_boot_state(mode: int, entry: int, memory_size: int, user: bool, stack_top: int) -> BootState:
    segments = gdt_segments()
    memory: list[tuple[int, bytes]] = [(layout.GDT_ADDRESS, build_gdt())]
    stubs = b"".join(fault_stub(vector).code for vector in range(VECTORS))
    memory.append((layout.BOOT_AREA, stubs))
    sregs = SRegs(
        gdt=DescriptorTable(base=layout.GDT_ADDRESS, limit=gdt_limit()),
        tr=segments[layout.TSS_SELECTOR],
        ldt=Segment(base=0, limit=0, selector=0, type=LDT, present=0, s=0, unusable=1),
    )
    regs = Regs(rip=entry, rsp=stack_top, rflags=RFLAGS_FIXED)
    msrs = {MSR_EFER: 0}

    if mode == 16:
        ivt = build_ivt([(0, fault_stub_address(vector)) for vector in range(VECTORS)])
        memory.append((layout.IVT_ADDRESS, ivt))
        memory.append((layout.TSS_ADDRESS, build_tss32()))
        sregs.idt = DescriptorTable(base=layout.IVT_ADDRESS, limit=idt_limit(16))
        sregs.cr0 = CR0_ET
        stack_segment = 0 if stack_top <= 0x10000 else (stack_top - 0x10000) >> 4
        regs.rsp = stack_top - 2 - (stack_segment << 4)
        sregs.cs = _real_mode_segment(0, code=True)
        sregs.ss = _real_mode_segment(stack_segment)
        for name in ("ds", "es", "fs", "gs"):
            setattr(sregs, name, _real_mode_segment(0))
        return BootState(mode, entry, user, tuple(memory), regs, sregs, msrs)

    code_selector = layout.KERNEL_CS64 if mode == 64 else layout.KERNEL_CS32
    service = SERVICE64 if mode == 64 else SERVICE32
    memory.append((SERVICE_ADDRESS, service.code))
    gates = [
        Gate(offset=fault_stub_address(vector), selector=code_selector, type=INTERRUPT_GATE,
             dpl=3 if vector == 3 else 0)
        for vector in range(VECTORS)
    ]
    gates[KERNEL_SERVICE_VECTOR] = Gate(
        offset=service_entry(mode), selector=code_selector, type=INTERRUPT_GATE, dpl=3
    )
    memory.append((layout.IDT_ADDRESS, build_idt(gates, mode)))
    sregs.idt = DescriptorTable(base=layout.IDT_ADDRESS, limit=idt_limit(mode))
    sregs.cs = segments[code_selector]
    sregs.ss = segments[layout.KERNEL_DS]
    data = segments[layout.USER_DS if user else layout.KERNEL_DS]
    for name in ("ds", "es", "fs", "gs"):
        setattr(sregs, name, data)
    # Each register gets its own copy: SRegs fields are mutable.
    for name in ("cs", "ss", "ds", "es", "fs", "gs", "tr"):
        setattr(sregs, name, replace(getattr(sregs, name)))

    if mode == 32:
        memory.append((layout.TSS_ADDRESS, build_tss32()))
        sregs.cr0 = CR0_PE | CR0_ET | CR0_NE
    else:
        memory.append((layout.TSS_ADDRESS, build_tss64()))
        memory.extend(build_page_tables())
        sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_WP | CR0_PG
        sregs.cr3 = layout.PML4_ADDRESS
        sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
        sregs.efer = EFER_SCE | EFER_LME | EFER_LMA
        msrs = {
            MSR_EFER: sregs.efer,
            MSR_STAR: layout.STAR_USER_BASE << 48 | layout.KERNEL_CS64 << 32,
            MSR_LSTAR: service_entry(64, "syscall"),
            MSR_CSTAR: 0,
            MSR_SFMASK: SFMASK_VALUE,
        }

    if user and mode == 64:
        frame_values = (entry, layout.USER_CS64, RFLAGS_IF | RFLAGS_FIXED, stack_top, layout.USER_DS)
        frame = struct.pack("<5Q", *frame_values)
        memory.append((USER_TRAMPOLINE, TRAMPOLINE64.code))
        memory.append((layout.KERNEL_STACK_TOP - len(frame), frame))
        regs.rip = USER_TRAMPOLINE
        regs.rsp = layout.KERNEL_STACK_TOP - len(frame)
    elif user:
        # SYSEXIT: CS = SYSENTER_CS + 16 = USER_CS32, SS = SYSENTER_CS + 24 = USER_DS,
        # EIP = EDX, ESP = ECX; RFLAGS is kept (SDM vol. 2B, SYSEXIT).
        memory.append((USER_TRAMPOLINE, TRAMPOLINE32.code))
        msrs[MSR_SYSENTER_CS] = layout.USER_CS32 - 16 & ~3
        regs.rip = USER_TRAMPOLINE
        regs.rsp = layout.KERNEL_STACK_TOP
        regs.rcx, regs.rdx = stack_top, entry
        regs.rflags = RFLAGS_IF | RFLAGS_FIXED
    return BootState(mode, entry, user, tuple(memory), regs, sregs, msrs)


class BootTarget(Protocol):
    """What :func:`load_boot_state` needs of a backend (``labkit.backend.Backend`` has all of it)."""

    @property
    def memory(self) -> memoryview: ...

    def set_regs(self, regs: Regs) -> None: ...

    def set_sregs(self, sregs: SRegs) -> None: ...

    def set_msrs(self, msrs: Mapping[int, int]) -> None: ...


def load_boot_state(backend: BootTarget, boot: BootState, code: bytes, load_address: int | None = None, *,
                    name: str = "the guest") -> None:
    """Load ``boot`` into ``backend`` (zeroed RAM) and the guest's ``code`` at ``load_address`` (default: the entry).

    Writes the boot state's memory, then the code, then ``set_sregs``,
    ``set_msrs`` and ``set_regs`` (KVM_SET_SREGS, KVM_SET_MSRS, KVM_SET_REGS on
    KVM).  The one loader the machine, the tests and the benchmarks use.
    Raises :class:`ConfigError` when something would not fit in guest RAM.
    """
    memory = backend.memory
    start = boot.entry if load_address is None else load_address
    pieces = [("the boot state", address, data) for address, data in boot.memory] + [(name, start, code)]
    for what, address, data in pieces:
        end = address + len(data)
        if address < 0 or end > len(memory):
            raise ConfigError(f"{what} ends at {end:#x}, beyond guest RAM ({len(memory):#x} bytes)")
    for _, address, data in pieces:
        memory[address:address + len(data)] = data
    backend.set_sregs(boot.sregs)
    if boot.msrs:
        backend.set_msrs(boot.msrs)
    backend.set_regs(boot.regs)


def _real_mode_segment(selector: int, code: bool = False) -> Segment:
    """A real-mode segment register: base = selector * 16, 64 KiB limit (SDM vol. 3, 20.1.1)."""
    return Segment(
        base=selector << 4, limit=0xFFFF, selector=selector, type=CODE_RX_ACCESSED if code else DATA_RW_ACCESSED,
        present=1, dpl=0, db=0, s=1, l=0, g=0,
    )


def _check(mode: int, entry: int, memory_size: int, user: bool, stack_top: int) -> None:
    if mode not in MODES:
        raise ConfigError(f"mode must be 16, 32 or 64, not {mode!r}")
    layout.check_memory_size(memory_size)
    if not layout.LOAD_ADDRESS <= entry < memory_size:
        raise ConfigError(
            f"entry {entry:#x} must lie in guest RAM above the system area "
            f"[{layout.LOAD_ADDRESS:#x}, {memory_size:#x})"
        )
    if not layout.LOAD_ADDRESS < stack_top <= memory_size or stack_top % 16:
        raise ConfigError(
            f"stack_top {stack_top:#x} must be 16-byte aligned in ({layout.LOAD_ADDRESS:#x}, {memory_size:#x}]"
        )
    if mode == 16:
        if user:
            raise ConfigError("real mode has no rings: user=True needs mode 32 or 64")
        if entry > 0xFFFF:
            raise ConfigError(f"a real-mode entry must be below 64 KiB (CS = 0), not {entry:#x}")
        if stack_top > 0x10FFF0:
            raise ConfigError(f"a real-mode stack must end below 1 MiB + 64 KiB, not {stack_top:#x}")
