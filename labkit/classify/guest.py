"""The classifier's guest: one program whose entry points run the instruction in each ring and state.

See :mod:`labkit.classify` for the runs; the template below is assembled once
per (instruction, setup, mode, layout) with GNU as.

Two GDT layouts.  ``relocated=False`` is labkit's own GDT.  ``relocated=True``
assembles the same program for a second layout (:func:`relocated_gdt`): every
code and data descriptor is copied :data:`RELOCATION` bytes higher, the ring-0
and ring-3 entries load that table first, and every selector name the program
and the setup use (``KERNEL_DS``, ``USER_CS32``, ...) means the copy.  A result
that comes from the guest's GDT follows the layout (a selector read in ring 0
changes from 0x8 to 0x50); one that comes from anywhere else does not.  The
original descriptors stay where they were, since labkit's IDT gates and TSS
name them.
"""

from __future__ import annotations

import struct
from functools import lru_cache

from labkit.errors import ConfigError, LabkitError
from labkit.x86 import layout
from labkit.x86.arch import CR0_TS, LDT, RFLAGS_FIXED, RFLAGS_IF, TSS_AVAILABLE
from labkit.x86.gdt import build_gdt, encode_system_descriptor64, tss_segment
from labkit.x86.state import Segment

RUNS = ("ring 0", "ring 3", "ring 3 altered", "ring 0 altered", "ring 3 umip")
"""The runs, in the order of the guest's entry points (``ENTRY_STRIDE`` bytes apart)."""
RUN_RSP = 0x7F000
SCRATCH = 0x20000
SCRATCH_SIZE = 64
ALT_LDT = 0x20100
ALT_IDT = 0x21000
UMIP_CPUID = 0x20200
"""The umip run's prologue stores CPUID.(EAX=7,ECX=0):ECX here (bit 2: UMIP)."""
ALT_LDT_SELECTOR = 0x50
ALT_TSS_SELECTOR = 0x60
ALT_GDT_LIMIT = 0x6F
PUSHED_MAX = 64
ENTRY_STRIDE = 8
RELOCATION = 0x48
"""How far the relocated layout moves each selector: descriptors 1-7 are copied to 10-16 (after the TSS)."""
RELOCATED_DESCRIPTORS = range(1, 8)

_TEMPLATE = """\
.set KERNEL_CS64, {kernel_cs64:#x}
.set KERNEL_CS32, {kernel_cs32:#x}
.set KERNEL_DS, {kernel_ds:#x}
.set USER_CS32, {user_cs32:#x}
.set USER_CS64, {user_cs64:#x}
.set USER_DS, {user_ds:#x}
.set RUN_RSP, {run_rsp:#x}
.set scratch, {scratch:#x}
    .balign 8
    jmp ring0                       # entry + 0
    .balign 8
    jmp ring3                       # entry + 8
    .balign 8
    jmp altered                     # entry + 16
    .balign 8
    jmp ring0_altered               # entry + 24
    .balign 8
    jmp umip                        # entry + 32
    .balign 8
    .quad target, instruction, after   # where the parts start (read by labkit.classify)
ring0:{relocate}
    mov eax, {ring0_cs}
    mov ebx, KERNEL_DS
    jmp enter
ring3:{relocate}
    mov eax, {ring3_cs}
    mov ebx, USER_DS
    jmp enter
ring0_altered:
    mov r12d, {ring0_cs}
    mov r13d, KERNEL_DS
    jmp alter
altered:
    mov r12d, {ring3_cs}
    mov r13d, USER_DS
alter:                              # other privileged state, then the ring in r12 with IF = 0
    lgdt [rip + alt_gdtr]
    mov ax, {alt_ldt_selector:#x}
    lldt ax
    mov ax, {alt_tss_selector:#x}
    ltr ax
    mov esi, {idt:#x}
    mov edi, {alt_idt:#x}
    mov ecx, 512
    cld
    rep movsq
    lidt [rip + alt_idtr]
    mov rax, cr0
    or eax, {cr0_ts:#x}                    # CR0.TS
    mov cr0, rax
    mov eax, r12d
    mov ebx, r13d
    mov edx, {rflags_closed:#x}                    # RFLAGS with IF = 0
    jmp enter_with_flags
umip:                               # CR4.UMIP = 1, then ring 3
    mov eax, 7
    xor ecx, ecx
    cpuid
    mov dword ptr [{umip_cpuid:#x}], ecx
    mov rax, cr4
    bts rax, 11
    mov cr4, rax
    jmp ring3
enter:
    mov edx, {rflags_open:#x}                  # RFLAGS with IF = 1
enter_with_flags:
    mov ecx, USER_DS
    mov ds, ecx
    mov es, ecx
    mov fs, ecx
    mov gs, ecx
    push rbx                        # SS
    push RUN_RSP                    # RSP
    push rdx                        # RFLAGS
    push rax                        # CS
    lea rax, [rip + target]
    push rax                        # RIP
    xor eax, eax
    xor ebx, ebx
    xor ecx, ecx
    xor edx, edx
    xor esi, esi
    xor edi, edi
    xor ebp, ebp
    xor r8d, r8d
    xor r9d, r9d
    xor r10d, r10d
    xor r11d, r11d
    xor r12d, r12d
    xor r13d, r13d
    xor r14d, r14d
    xor r15d, r15d
    iretq
    .balign 8
alt_gdtr:
    .word {alt_gdt_limit:#x}
    .quad alt_gdt
    .balign 8
alt_idtr:
    .word 0xfff
    .quad {alt_idt:#x}
    .balign 16
alt_gdt:
    .byte {alt_gdt_bytes}
    .balign 8
relocated_gdtr:
    .word {relocated_gdt_limit:#x}
    .quad relocated_gdt
    .balign 16
relocated_gdt:
    .byte {relocated_gdt_bytes}
.code{bits}
target:
{setup}
instruction:
{instruction}
after:
    ud2
"""


@lru_cache(maxsize=1)
def altered_gdt() -> bytes:
    """labkit's GDT plus an LDT descriptor (ALT_LDT_SELECTOR) and an available TSS descriptor (ALT_TSS_SELECTOR)."""
    ldt = Segment(base=ALT_LDT, limit=0xF, selector=ALT_LDT_SELECTOR, type=LDT, present=1, dpl=0, s=0)
    tss = tss_segment()
    tss = Segment(base=tss.base, limit=tss.limit, selector=ALT_TSS_SELECTOR, type=TSS_AVAILABLE,
                  present=1, dpl=0, s=0)
    table = build_gdt() + encode_system_descriptor64(ldt) + encode_system_descriptor64(tss)
    if len(table) != ALT_GDT_LIMIT + 1:
        raise LabkitError(f"the altered GDT is {len(table)} bytes, expected {ALT_GDT_LIMIT + 1}")
    return table


@lru_cache(maxsize=1)
def relocated_gdt() -> bytes:
    """labkit's GDT followed by copies of its code and data descriptors: selector ``s`` is also ``s + RELOCATION``."""
    table = build_gdt()
    copies = b"".join(table[8 * index:8 * index + 8] for index in RELOCATED_DESCRIPTORS)
    if len(table) != 8 * RELOCATED_DESCRIPTORS.start + RELOCATION:
        raise LabkitError(f"labkit's GDT is {len(table)} bytes: the relocated copies would not start after it")
    return table + copies


def relocate(selector: int) -> int:
    """The relocated layout's selector for labkit's ``selector`` (its RPL kept)."""
    return selector + RELOCATION if (selector >> 3) in RELOCATED_DESCRIPTORS else selector


def guest_source(instruction: str, setup: str = "", mode: int = 64, *, relocated: bool = False) -> str:
    """The classifier guest's source for ``instruction`` (see the module docstring)."""
    moved = relocate if relocated else (lambda selector: selector)
    ring0_cs, ring3_cs = ((layout.KERNEL_CS64, layout.USER_CS64) if mode == 64
                          else (layout.KERNEL_CS32, layout.USER_CS32))
    return _TEMPLATE.format(
        kernel_cs64=moved(layout.KERNEL_CS64), kernel_cs32=moved(layout.KERNEL_CS32),
        kernel_ds=moved(layout.KERNEL_DS), user_cs32=moved(layout.USER_CS32), user_cs64=moved(layout.USER_CS64),
        user_ds=moved(layout.USER_DS), run_rsp=RUN_RSP, scratch=SCRATCH, ring0_cs=moved(ring0_cs),
        ring3_cs=moved(ring3_cs), relocate="\n    lgdt [rip + relocated_gdtr]" if relocated else "",
        relocated_gdt_limit=len(relocated_gdt()) - 1,
        relocated_gdt_bytes=", ".join(f"{b:#x}" for b in relocated_gdt()),
        alt_ldt_selector=ALT_LDT_SELECTOR, alt_tss_selector=ALT_TSS_SELECTOR,
        idt=layout.IDT_ADDRESS, alt_idt=ALT_IDT, umip_cpuid=UMIP_CPUID,
        alt_gdt_limit=ALT_GDT_LIMIT, alt_gdt_bytes=", ".join(f"{b:#x}" for b in altered_gdt()),
        bits=mode, setup=_indent(setup), instruction=_indent(instruction),
        cr0_ts=CR0_TS, rflags_closed=RFLAGS_FIXED, rflags_open=RFLAGS_IF | RFLAGS_FIXED,
    )


def _indent(text: str) -> str:
    return "\n".join("    " + line.strip() for line in text.strip().splitlines())


@lru_cache(maxsize=256)
def assemble_guest(instruction: str, setup: str, mode: int, relocated: bool = False) -> tuple[bytes, int, int, int]:
    """The guest's code and the addresses of target (setup), instruction and after (the ud2)."""
    from labkit.assembler import assemble
    from labkit.errors import AssemblyError

    try:
        code = assemble(guest_source(instruction, setup, mode, relocated=relocated), 64)
    except AssemblyError as error:
        raise AssemblyError(f"cannot assemble {instruction!r} for {mode}-bit code"
                            f"{' with its setup' if setup.strip() else ''}: {error}") from None
    target, start, after = struct.unpack_from("<3Q", code, len(RUNS) * ENTRY_STRIDE)
    if start == after:
        raise ConfigError(f"{instruction!r} assembles to no instruction at all")
    return code, target, start, after
