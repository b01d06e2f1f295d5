"""x86 architectural constants, in one place: flag and control-register bits, MSRs, vectors, selectors.

Each group cites the Intel SDM table it is taken from.  Everything in labkit that
tests or sets one of these bits imports it from here; labkit's own choices
(addresses, its GDT's selectors, its ports) live in :mod:`labkit.x86.layout`.
"""

from __future__ import annotations

from enum import IntEnum

# -- RFLAGS (SDM vol. 1, 3.4.3, figure 3-8) --------------------------------------------------------
RFLAGS_CF = 1 << 0
RFLAGS_FIXED = 1 << 1
"""Bit 1 always reads as 1."""
RFLAGS_PF = 1 << 2
RFLAGS_AF = 1 << 4
RFLAGS_ZF = 1 << 6
RFLAGS_SF = 1 << 7
RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_DF = 1 << 10
RFLAGS_OF = 1 << 11
RFLAGS_IOPL = 3 << 12
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
"""Resume flag: the CPU sets it in some fault frames (KVM does, Unicorn does not)."""
RFLAGS_VM = 1 << 17
RFLAGS_AC = 1 << 18
RFLAGS_VIF = 1 << 19
RFLAGS_VIP = 1 << 20
RFLAGS_ID = 1 << 21
RFLAGS_ARITHMETIC = RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF
"""The status flags arithmetic instructions set (SDM vol. 1, 3.4.3.1)."""

# -- CR0 and CR4 (SDM vol. 3, 2.5, figure 2-7) -----------------------------------------------------
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_EM = 1 << 2
CR0_TS = 1 << 3
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_AM = 1 << 18
CR0_NW = 1 << 29
CR0_CD = 1 << 30
CR0_PG = 1 << 31

CR4_VME = 1 << 0
CR4_PVI = 1 << 1
CR4_TSD = 1 << 2
CR4_DE = 1 << 3
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_MCE = 1 << 6
CR4_PGE = 1 << 7
CR4_PCE = 1 << 8
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
CR4_UMIP = 1 << 11
"""User-mode instruction prevention: SGDT, SIDT, SLDT, SMSW and STR fault in ring 3."""
CR4_LA57 = 1 << 12
CR4_VMXE = 1 << 13
CR4_SMXE = 1 << 14
CR4_FSGSBASE = 1 << 16
CR4_PCIDE = 1 << 17
CR4_OSXSAVE = 1 << 18
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
CR4_PKE = 1 << 22

# -- EFER and the MSRs labkit uses (SDM vol. 4, table 2-2) ------------------------------------------
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

MSR_APIC_BASE = 0x1B
MSR_SYSENTER_CS = 0x174
MSR_SYSENTER_ESP = 0x175
MSR_SYSENTER_EIP = 0x176
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SFMASK = 0xC0000084
MSR_FS_BASE = 0xC0000100
MSR_GS_BASE = 0xC0000101
MSR_KERNEL_GS_BASE = 0xC0000102


# -- exception vectors (SDM vol. 3, table 6-1) ------------------------------------------------------
class Vector(IntEnum):
    """The architecturally defined exception vectors (0-31); 32-255 are for interrupts and ``int n``."""

    DE = 0
    DB = 1
    NMI = 2
    BP = 3
    OF = 4
    BR = 5
    UD = 6
    NM = 7
    DF = 8
    TS = 10
    NP = 11
    SS = 12
    GP = 13
    PF = 14
    MF = 16
    AC = 17
    MC = 18
    XM = 19
    VE = 20
    CP = 21
    VC = 29
    SX = 30


EXCEPTION_NAMES: dict[int, tuple[str, str]] = {
    0: ("#DE", "divide error"), 1: ("#DB", "debug"), 2: ("NMI", "non-maskable interrupt"),
    3: ("#BP", "breakpoint"), 4: ("#OF", "overflow"), 5: ("#BR", "bound range exceeded"),
    6: ("#UD", "invalid opcode"), 7: ("#NM", "device not available"), 8: ("#DF", "double fault"),
    10: ("#TS", "invalid TSS"), 11: ("#NP", "segment not present"), 12: ("#SS", "stack-segment fault"),
    13: ("#GP", "general protection"), 14: ("#PF", "page fault"), 16: ("#MF", "x87 floating-point error"),
    17: ("#AC", "alignment check"), 18: ("#MC", "machine check"), 19: ("#XM", "SIMD floating-point"),
    20: ("#VE", "virtualization exception"), 21: ("#CP", "control protection"),
}
"""Mnemonic and name of each exception vector (Intel SDM vol. 3, table 6-1)."""

ERROR_CODE_VECTORS = frozenset({Vector.DF, Vector.TS, Vector.NP, Vector.SS, Vector.GP, Vector.PF, Vector.AC,
                                Vector.CP, Vector.VC, Vector.SX})
"""Exceptions for which the CPU pushes an error code (SDM vol. 3, table 6-1)."""

VECTORS = 256
"""Entries of an IDT (or the real-mode IVT)."""

# -- #PF error code (SDM vol. 3, 4.7, figure 4-12) --------------------------------------------------
PF_PRESENT = 1 << 0
"""Set: a protection violation on a present page; clear: the page was not present."""
PF_WRITE = 1 << 1
PF_USER = 1 << 2
"""The access came from CPL 3."""
PF_RESERVED = 1 << 3
PF_FETCH = 1 << 4

# -- selectors and descriptors (SDM vol. 3, 3.4.2, 3.4.5, table 3-2) ---------------------------------
SELECTOR_RPL = 0x3
"""Requested privilege level: bits 0-1 of a selector (CPL, for CS and SS)."""
SELECTOR_TI = 1 << 2
"""Table indicator: 0 GDT, 1 LDT."""
SELECTOR_INDEX_SHIFT = 3

# Bits of a descriptor's high doubleword (bits 32-63 of the 8-byte descriptor).
DESC_TYPE_SHIFT = 8
DESC_WRITABLE = 1 << 9
"""Data segment: writable; code segment: readable."""
DESC_CONFORMING = 1 << 10
DESC_CODE = 1 << 11
DESC_S = 1 << 12
"""Code or data segment (clear: a system descriptor)."""
DESC_DPL_SHIFT = 13
DESC_P = 1 << 15
DESC_L = 1 << 21
DESC_B = 1 << 22
DESC_G = 1 << 23

# Segment types (the type field, 4 bits).
DATA_RW_ACCESSED = 0x3
CODE_RX_ACCESSED = 0xB
# System descriptor and gate types in IA-32e mode (table 3-2).
LDT = 0x2
TSS_AVAILABLE = 0x9
TSS_BUSY = 0xB
INTERRUPT_GATE = 0xE
"""32-bit interrupt gate outside long mode, 64-bit interrupt gate in it; clears IF on entry."""
TRAP_GATE = 0xF

# -- page-table entries (SDM vol. 3, 4.5, tables 4-14 to 4-20) ----------------------------------------
PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_USER = 1 << 2
PTE_WRITE_THROUGH = 1 << 3
PTE_CACHE_DISABLE = 1 << 4
PTE_ACCESSED = 1 << 5
PTE_DIRTY = 1 << 6
PTE_PAGE_SIZE = 1 << 7
"""PS: in a PD entry, maps a 2 MiB page instead of pointing to a PT."""
PTE_GLOBAL = 1 << 8
PTE_NO_EXECUTE = 1 << 63
PTE_ADDRESS_MASK = 0x000F_FFFF_FFFF_F000
