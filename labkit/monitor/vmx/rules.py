"""Which instructions and events cause VM exits: the SDM's rules as plain functions of a :class:`Vmcs`.

A model of VMX non-root operation (Intel SDM vol. 3C, ch. 26.1 "Instructions
that cause VM exits" and 26.2 "Other causes of VM exits").  Each function takes
the VMCS and what the guest is doing and returns the :class:`VmExit` the CPU
would record, or None when the instruction runs in VMX non-root operation
without one.  No state, no guest: tests feed them hand-made instructions.

What exits, by rule (26.1.2 unconditionally, 26.1.3 by control):

==================================  ==================================================================
instruction / event                 VM exit when
==================================  ==================================================================
INVD                                always (13)
HLT                                 HLT exiting (12)
IN/OUT/INS/OUTS                     with "use I/O bitmaps": a bit of any port accessed is set in I/O
                                    bitmap A (0-7FFF) or B (8000-FFFF), or the access wraps past FFFF;
                                    without: "unconditional I/O exiting" (30)
MOV to CR0 / CR4                    a bit set in the guest/host mask differs between the source and
                                    the read shadow (28, access type 0)
MOV from CR0 / CR4, SMSW            never: host-owned bits read from the read shadow
CLTS                                TS is set in the CR0 guest/host mask and in the read shadow (28, 2)
LMSW                                for a masked bit of PE/MP/EM/TS the source differs from the shadow
                                    (PE only when setting it: LMSW cannot clear PE) (28, 3)
MOV to CR3                          CR3-load exiting, unless the value is one of the first
                                    CR3-target-count CR3-target values (28, 0)
MOV from CR3                        CR3-store exiting (28, 1)
MOV to / from CR8                   CR8-load / CR8-store exiting (28; no TPR shadow modelled)
MOV DR                              MOV-DR exiting (29)
RDMSR / WRMSR                       without "use MSR bitmaps": always; with it: the MSR's bit in the
                                    read/write bitmap is set, or the MSR is outside 0-1FFF and
                                    C0000000-C0001FFF (31 / 32)
RDTSC / RDPMC / INVLPG              RDTSC / RDPMC / INVLPG exiting (16 / 15 / 14)
LGDT LIDT SGDT SIDT                 descriptor-table exiting (secondary control) (46)
LLDT LTR SLDT STR                   descriptor-table exiting (47)
WBINVD                              WBINVD exiting (secondary control) (54)
exception with vector v < 32        bit v of the exception bitmap; for #PF (v = 14) compare the error
                                    code: (PFEC & mask) == match exits when bit 14 is set, and
                                    (PFEC & mask) != match exits when it is clear (0)
INT3 / INTO / INT1                  as the exceptions #BP / #OF / #DB (software exceptions); INT n
                                    never exits
external interrupt                  external-interrupt exiting (pin-based) (1), even with IF = 0
CLI STI PUSHF POPF IRETQ SGDT ...   never (they run on the guest's own state in non-root operation)
==================================  ==================================================================
"""

from __future__ import annotations

from typing import Callable

from labkit.monitor.vcpu import Decoded, Operand, effective_address, read_register
from labkit.monitor.vmx.exits import (GPR_NUMBERS, CrAccessType, ExitReason, InterruptionType, VmExit,
                                      cr_access_qualification, interruption_information, io_qualification,
                                      mov_dr_qualification)
from labkit.monitor.vmx.vmcs import BITMAP_BYTES, PinBased, Primary, Secondary, Vmcs, msr_bitmap_bit
from labkit.x86.arch import CR0_EM, CR0_MP, CR0_PE, CR0_TS, Vector
from labkit.x86.state import Regs

ReadMemory = Callable[[int, int], bytes]

# The controls as plain ints: IntFlag's & costs microseconds on every exit.
_HLT_EXITING = int(Primary.HLT_EXITING)
_RDTSC_EXITING = int(Primary.RDTSC_EXITING)
_RDPMC_EXITING = int(Primary.RDPMC_EXITING)
_INVLPG_EXITING = int(Primary.INVLPG_EXITING)
_MOV_DR_EXITING = int(Primary.MOV_DR_EXITING)
_CR3_LOAD_EXITING = int(Primary.CR3_LOAD_EXITING)
_CR3_STORE_EXITING = int(Primary.CR3_STORE_EXITING)
_CR8_LOAD_EXITING = int(Primary.CR8_LOAD_EXITING)
_CR8_STORE_EXITING = int(Primary.CR8_STORE_EXITING)
_USE_IO_BITMAPS = int(Primary.USE_IO_BITMAPS)
_UNCONDITIONAL_IO_EXITING = int(Primary.UNCONDITIONAL_IO_EXITING)
_USE_MSR_BITMAPS = int(Primary.USE_MSR_BITMAPS)
_ACTIVATE_SECONDARY_CONTROLS = int(Primary.ACTIVATE_SECONDARY_CONTROLS)
_WBINVD_EXITING = int(Secondary.WBINVD_EXITING)
_DESCRIPTOR_TABLE_EXITING = int(Secondary.DESCRIPTOR_TABLE_EXITING)
_EXTERNAL_INTERRUPT_EXITING = int(PinBased.EXTERNAL_INTERRUPT_EXITING)

STRING_IO = {"insb": ("in", 1), "insw": ("in", 2), "insd": ("in", 4),
             "outsb": ("out", 1), "outsw": ("out", 2), "outsd": ("out", 4)}
LMSW_BITS = CR0_PE | CR0_MP | CR0_EM | CR0_TS
DESCRIPTOR_TABLE_IDENTITY = {"sgdt": 0, "sidt": 1, "lgdt": 2, "lidt": 3, "sldt": 0, "str": 1, "lldt": 2, "ltr": 3}
"""Bits 29:28 of the VM-exit instruction information for exits 46 and 47 (SDM table 28-10 and 28-11)."""
SOFTWARE_EXCEPTIONS = {"int3": (Vector.BP, InterruptionType.SOFTWARE_EXCEPTION),
                       "into": (Vector.OF, InterruptionType.SOFTWARE_EXCEPTION),
                       "int1": (Vector.DB, InterruptionType.PRIVILEGED_SOFTWARE_EXCEPTION)}


def mnemonic_of(decoded: Decoded) -> tuple[str, bool]:
    """The mnemonic without a ``rep`` prefix, and whether it had one (Capstone puts it in the mnemonic)."""
    name = decoded.mnemonic
    for prefix in ("rep ", "repe ", "repne "):
        if name.startswith(prefix):
            return name[len(prefix):], True
    return name, False


def instruction_exit(vmcs: Vmcs, decoded: Decoded, regs: Regs, read: ReadMemory) -> VmExit | None:
    """The VM exit that executing ``decoded`` in VMX non-root operation causes under ``vmcs``, or None.

    ``regs`` are the guest's registers before it (RIP at the instruction);
    ``read(address, size)`` reads guest memory (an LMSW memory operand).
    """
    mnemonic, rep = mnemonic_of(decoded)
    primary = int(vmcs.primary)
    secondary = int(vmcs.secondary) if primary & _ACTIVATE_SECONDARY_CONTROLS else 0

    def exit(reason: ExitReason, qualification: int = 0, info: int = 0) -> VmExit:
        return VmExit(reason, qualification, decoded.address, decoded.text, decoded.length, instruction_info=info)

    if mnemonic == "invd":
        return exit(ExitReason.INVD)
    if mnemonic == "hlt":
        return exit(ExitReason.HLT) if primary & _HLT_EXITING else None
    if mnemonic in ("in", "out") or mnemonic in STRING_IO:
        return _io_exit(vmcs, decoded, mnemonic, rep, regs, exit)
    if mnemonic == "mov" and any(op.kind == "reg" and op.reg[:2] in ("cr", "dr") for op in decoded.operands):
        return _mov_special_exit(vmcs, decoded, regs, exit)
    if mnemonic == "clts":
        owned = vmcs.cr0_guest_host_mask & CR0_TS and vmcs.cr0_read_shadow & CR0_TS
        return (exit(ExitReason.CONTROL_REGISTER_ACCESS, cr_access_qualification(0, CrAccessType.CLTS)) if owned
                else None)
    if mnemonic == "lmsw":
        return _lmsw_exit(vmcs, decoded, regs, read, exit)
    if mnemonic in ("rdmsr", "wrmsr"):
        return _msr_exit(vmcs, mnemonic, regs, exit)
    if mnemonic == "rdtsc":
        return exit(ExitReason.RDTSC) if primary & _RDTSC_EXITING else None
    if mnemonic == "rdpmc":
        return exit(ExitReason.RDPMC) if primary & _RDPMC_EXITING else None
    if mnemonic == "invlpg":
        if not primary & _INVLPG_EXITING:
            return None
        operand = decoded.operands[0]
        return exit(ExitReason.INVLPG, effective_address(operand, regs, decoded.address + decoded.length))
    if mnemonic == "wbinvd":
        return exit(ExitReason.WBINVD) if secondary & _WBINVD_EXITING else None
    if mnemonic in DESCRIPTOR_TABLE_IDENTITY:
        if not secondary & _DESCRIPTOR_TABLE_EXITING:
            return None
        reason = ExitReason.GDTR_OR_IDTR_ACCESS if mnemonic[1:] in ("gdt", "idt") else ExitReason.LDTR_OR_TR_ACCESS
        table_operand = decoded.operands[0] if decoded.operands else None
        in_memory = table_operand is not None and table_operand.kind == "mem"
        displacement = table_operand.disp & (1 << 64) - 1 if table_operand is not None and in_memory else 0
        return exit(reason, displacement, _instruction_information(mnemonic, table_operand))
    if mnemonic in SOFTWARE_EXCEPTIONS:
        vector, kind = SOFTWARE_EXCEPTIONS[mnemonic]
        if not vmcs.exception_bitmap >> vector & 1:
            return None
        return VmExit(ExitReason.EXCEPTION_OR_NMI, 0, decoded.address, decoded.text, decoded.length,
                      interruption_information(vector, kind, False))
    return None


def _io_exit(vmcs: Vmcs, decoded: Decoded, mnemonic: str, rep: bool, regs: Regs,
             exit: Callable[..., VmExit]) -> VmExit | None:
    operands = decoded.operands
    if mnemonic in STRING_IO:
        direction, size = STRING_IO[mnemonic]
        port, immediate = regs.rdx & 0xFFFF, False
    else:
        direction = mnemonic
        port_operand, data = (operands[1], operands[0]) if mnemonic == "in" else (operands[0], operands[1])
        size = data.size
        immediate = port_operand.kind == "imm"
        port = port_operand.imm & 0xFF if immediate else read_register(regs, port_operand.reg) & 0xFFFF
    if not io_exits(vmcs, port, size):
        return None
    return exit(ExitReason.IO_INSTRUCTION, io_qualification(port, size, direction == "in", string=mnemonic in STRING_IO,
                                                            rep=rep, immediate=immediate))


def io_exits(vmcs: Vmcs, port: int, size: int) -> bool:
    """Whether an access of ``size`` bytes at ``port`` exits (SDM 26.1.3, "I/O instructions")."""
    if int(vmcs.primary) & _USE_IO_BITMAPS:
        if port + size > 0x10000:
            return True  # wraps around to port 0
        for each in range(port, port + size):
            bitmap = vmcs.io_bitmap_a if each < 0x8000 else vmcs.io_bitmap_b
            bit = each & 0x7FFF
            if bitmap[bit >> 3] >> (bit & 7) & 1:
                return True
        return False
    return bool(int(vmcs.primary) & _UNCONDITIONAL_IO_EXITING)


def _mov_special_exit(vmcs: Vmcs, decoded: Decoded, regs: Regs, exit: Callable[..., VmExit]) -> VmExit | None:
    target, source = decoded.operands
    to_special = target.reg[:2] in ("cr", "dr")
    special, gpr = (target, source) if to_special else (source, target)
    number = int(special.reg[2:])
    gpr_number = GPR_NUMBERS.get(gpr.reg, 0)
    if special.reg.startswith("dr"):
        if not int(vmcs.primary) & _MOV_DR_EXITING:
            return None
        return exit(ExitReason.MOV_DR, mov_dr_qualification(number, to_special, gpr_number))
    access = CrAccessType.MOV_TO_CR if to_special else CrAccessType.MOV_FROM_CR
    qualification = cr_access_qualification(number, access, gpr_number)
    value = read_register(regs, gpr.reg) if to_special else 0
    if number in (0, 4):
        if not to_special:
            return None  # reads come from the read shadow
        mask, shadow = ((vmcs.cr0_guest_host_mask, vmcs.cr0_read_shadow) if number == 0
                        else (vmcs.cr4_guest_host_mask, vmcs.cr4_read_shadow))
        return exit(ExitReason.CONTROL_REGISTER_ACCESS, qualification) if (value ^ shadow) & mask else None
    if number == 3:
        if to_special:
            targets = vmcs.cr3_target_values
            exits = bool(int(vmcs.primary) & _CR3_LOAD_EXITING) and value not in targets
        else:
            exits = bool(int(vmcs.primary) & _CR3_STORE_EXITING)
        return exit(ExitReason.CONTROL_REGISTER_ACCESS, qualification) if exits else None
    if number == 8:
        control = _CR8_LOAD_EXITING if to_special else _CR8_STORE_EXITING
        return exit(ExitReason.CONTROL_REGISTER_ACCESS, qualification) if int(vmcs.primary) & control else None
    return None  # CR2: no control intercepts it


def _lmsw_exit(vmcs: Vmcs, decoded: Decoded, regs: Regs, read: ReadMemory,
               exit: Callable[..., VmExit]) -> VmExit | None:
    operand = decoded.operands[0]
    source = lmsw_source(operand, regs, read, decoded.address + decoded.length)
    mask, shadow = vmcs.cr0_guest_host_mask, vmcs.cr0_read_shadow
    sets_pe = mask & CR0_PE and source & CR0_PE and not shadow & CR0_PE
    differs = (source ^ shadow) & mask & (CR0_MP | CR0_EM | CR0_TS)
    if not (sets_pe or differs):
        return None
    # Bits 11:8 name a register only for MOV CR; for LMSW they are 0 (SDM table 28-3).
    return exit(ExitReason.CONTROL_REGISTER_ACCESS,
                cr_access_qualification(0, CrAccessType.LMSW, lmsw_memory=operand.kind == "mem", lmsw_source=source))


def lmsw_source(operand: Operand, regs: Regs, read: ReadMemory, next_rip: int) -> int:
    """The 16-bit source of LMSW: a register's low word or a word in memory."""
    if operand.kind == "reg":
        return read_register(regs, operand.reg) & 0xFFFF
    return int.from_bytes(read(effective_address(operand, regs, next_rip), 2), "little")


def _msr_exit(vmcs: Vmcs, mnemonic: str, regs: Regs, exit: Callable[..., VmExit]) -> VmExit | None:
    reason = ExitReason.RDMSR if mnemonic == "rdmsr" else ExitReason.WRMSR
    return exit(reason) if msr_exits(vmcs, regs.rcx & 0xFFFF_FFFF, write=mnemonic == "wrmsr") else None


def msr_exits(vmcs: Vmcs, msr: int, *, write: bool) -> bool:
    """Whether RDMSR (``write=False``) or WRMSR of ``msr`` exits (SDM 26.1.3 and 25.6.9)."""
    if not int(vmcs.primary) & _USE_MSR_BITMAPS:
        return True
    bit = msr_bitmap_bit(msr)
    if bit is None:
        return True
    byte = (BITMAP_BYTES // 2 if write else 0) + (bit >> 3)
    return bool(vmcs.msr_bitmap[byte] >> (bit & 7) & 1)


def _instruction_information(mnemonic: str, operand: Operand | None) -> int:
    """VM-exit instruction information for exits 46/47 (SDM tables 28-10, 28-11), 64-bit addressing."""
    info = DESCRIPTOR_TABLE_IDENTITY[mnemonic] << 28 | 2 << 7  # address size 64-bit
    if operand is None or operand.kind != "mem":
        # Register operand (SLDT/STR/LLDT/LTR): bit 10 set, register in bits 6:3.
        return info | 1 << 10 | (GPR_NUMBERS.get(operand.reg[:3] if operand else "", 0) & 0xF) << 3
    scale = {1: 0, 2: 1, 4: 2, 8: 3}.get(operand.scale, 0)
    info |= scale | 3 << 15  # segment: DS
    info |= (GPR_NUMBERS[operand.index] << 18) if operand.index in GPR_NUMBERS else 1 << 22
    info |= (GPR_NUMBERS[operand.base] << 23) if operand.base in GPR_NUMBERS else 1 << 27
    return info


def exception_exit(vmcs: Vmcs, vector: int, error_code: int | None, guest_rip: int, *, cr2: int = 0,
                   instruction: str = "") -> VmExit | None:
    """The exit a hardware exception ``vector`` causes (exception bitmap, and the #PF error-code filter)."""
    if not 0 <= vector < 32:
        return None
    bit = bool(vmcs.exception_bitmap >> vector & 1)
    if vector == Vector.PF:
        matches = (error_code or 0) & vmcs.page_fault_error_code_mask == vmcs.page_fault_error_code_match
        exits = matches if bit else not matches
    else:
        exits = bit
    if not exits:
        return None
    info = interruption_information(vector, InterruptionType.HARDWARE_EXCEPTION, error_code is not None)
    return VmExit(ExitReason.EXCEPTION_OR_NMI, cr2 if vector == Vector.PF else 0, guest_rip, instruction,
                  interruption_info=info, interruption_error_code=error_code or 0)


def interrupt_exit(vmcs: Vmcs, vector: int, guest_rip: int) -> VmExit | None:
    """An external interrupt arriving: exit 1 with external-interrupt exiting, whatever the guest's IF.

    The model does not set "acknowledge interrupt on exit", so the interruption information is not valid
    (the VMM finds the vector at its interrupt controller, SDM 28.2.2)."""
    if not int(vmcs.pin_based) & _EXTERNAL_INTERRUPT_EXITING:
        return None
    return VmExit(ExitReason.EXTERNAL_INTERRUPT, 0, guest_rip, f"external interrupt, vector {vector:#x}")
