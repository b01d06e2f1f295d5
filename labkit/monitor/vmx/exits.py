"""VM exits as a model of VMX reports them: basic exit reasons (SDM vol. 3D, appendix C) and exit qualifications.

A :class:`VmExit` holds what the CPU writes into the VMCS's exit-information
fields (SDM vol. 3C, 28.2 "Recording VM-exit information"): the basic exit
reason, the exit qualification, the VM-exit interruption information and error
code (exceptions, interrupts), the instruction length and the guest RIP.  The
qualifications are encoded bit for bit as in the SDM's tables and decoded by
:func:`describe_qualification`:

- control-register accesses (SDM table 28-3): bits 3:0 CR number, 5:4 access type
  (0 MOV to CR, 1 MOV from CR, 2 CLTS, 3 LMSW), 6 LMSW operand type (0 register,
  1 memory), 11:8 the general-purpose register, 31:16 the LMSW source data;
- MOV DR (table 28-4): bits 2:0 DR number, 4 direction (0 MOV to DR, 1 MOV from DR),
  11:8 the general-purpose register;
- I/O instructions (table 28-5): bits 2:0 size - 1, 3 direction (0 OUT, 1 IN),
  4 string instruction, 5 REP prefix, 6 operand encoding (0 DX, 1 immediate), 31:16 port;
- exceptions: the exit qualification holds the faulting linear address for #PF
  (CR2 is not written), 0 otherwise here; the vector and type are in the
  interruption information (table 25-19 layout: bits 7:0 vector, 10:8 type,
  11 error code valid, 31 valid).
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple


class ExitReason(IntEnum):
    """Basic VM-exit reasons (SDM vol. 3D, appendix C, table C-1); the ones this model produces and their
    neighbours.  The number is what the CPU puts in bits 15:0 of the exit-reason field."""

    EXCEPTION_OR_NMI = 0
    EXTERNAL_INTERRUPT = 1
    TRIPLE_FAULT = 2
    INTERRUPT_WINDOW = 7
    CPUID = 10
    HLT = 12
    INVD = 13
    INVLPG = 14
    RDPMC = 15
    RDTSC = 16
    VMCALL = 18
    CONTROL_REGISTER_ACCESS = 28
    MOV_DR = 29
    IO_INSTRUCTION = 30
    RDMSR = 31
    WRMSR = 32
    MWAIT = 36
    MONITOR = 39
    PAUSE = 40
    GDTR_OR_IDTR_ACCESS = 46
    LDTR_OR_TR_ACCESS = 47
    EPT_VIOLATION = 48
    RDTSCP = 51
    WBINVD = 54
    XSETBV = 55

    @property
    def sdm_name(self) -> str:
        """The SDM's words: "Control-register accesses", "I/O instruction", ..."""
        return _SDM_NAMES.get(self, self.name.replace("_", " ").capitalize())

    @property
    def short_name(self) -> str:
        """A few words for figure labels: "exception or NMI", "CR access", "I/O"."""
        return _SHORT_NAMES.get(self, self.sdm_name)


_SDM_NAMES = {
    ExitReason.EXCEPTION_OR_NMI: "Exception or non-maskable interrupt (NMI)",
    ExitReason.EXTERNAL_INTERRUPT: "External interrupt", ExitReason.TRIPLE_FAULT: "Triple fault",
    ExitReason.INTERRUPT_WINDOW: "Interrupt window", ExitReason.CPUID: "CPUID", ExitReason.HLT: "HLT",
    ExitReason.INVD: "INVD", ExitReason.INVLPG: "INVLPG", ExitReason.RDPMC: "RDPMC", ExitReason.RDTSC: "RDTSC",
    ExitReason.VMCALL: "VMCALL", ExitReason.CONTROL_REGISTER_ACCESS: "Control-register accesses",
    ExitReason.MOV_DR: "MOV DR", ExitReason.IO_INSTRUCTION: "I/O instruction", ExitReason.RDMSR: "RDMSR",
    ExitReason.WRMSR: "WRMSR", ExitReason.GDTR_OR_IDTR_ACCESS: "Access to GDTR or IDTR",
    ExitReason.LDTR_OR_TR_ACCESS: "Access to LDTR or TR", ExitReason.RDTSCP: "RDTSCP",
    ExitReason.WBINVD: "WBINVD", ExitReason.XSETBV: "XSETBV",
}

_SHORT_NAMES = {
    ExitReason.EXCEPTION_OR_NMI: "exception or NMI", ExitReason.CONTROL_REGISTER_ACCESS: "CR access",
    ExitReason.IO_INSTRUCTION: "I/O", ExitReason.GDTR_OR_IDTR_ACCESS: "GDTR/IDTR access",
    ExitReason.LDTR_OR_TR_ACCESS: "LDTR/TR access",
}

# -- exit qualifications ---------------------------------------------------------------------------

GPR_NUMBERS = {name: number for number, name in enumerate(
    ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"))}
"""The register numbering of the qualifications' GPR fields (SDM table 28-3: 0 RAX, 1 RCX, ..., 15 R15)."""
GPR_NAMES = {number: name for name, number in GPR_NUMBERS.items()}


class CrAccessType(IntEnum):
    """Bits 5:4 of a control-register-access qualification."""

    MOV_TO_CR = 0
    MOV_FROM_CR = 1
    CLTS = 2
    LMSW = 3


def cr_access_qualification(cr: int, access: CrAccessType, gpr: int = 0, *, lmsw_memory: bool = False,
                            lmsw_source: int = 0) -> int:
    """SDM table 28-3."""
    return (cr & 0xF) | int(access) << 4 | int(lmsw_memory) << 6 | (gpr & 0xF) << 8 | (lmsw_source & 0xFFFF) << 16


def mov_dr_qualification(dr: int, to_dr: bool, gpr: int) -> int:
    """SDM table 28-4: direction 0 is MOV to DR, 1 MOV from DR."""
    return (dr & 7) | int(not to_dr) << 4 | (gpr & 0xF) << 8


def io_qualification(port: int, size: int, is_in: bool, *, string: bool = False, rep: bool = False,
                     immediate: bool = False) -> int:
    """SDM table 28-5."""
    return ((size - 1) & 7 | int(is_in) << 3 | int(string) << 4 | int(rep) << 5 | int(immediate) << 6
            | (port & 0xFFFF) << 16)


class InterruptionType(IntEnum):
    """Bits 10:8 of the VM-exit interruption information (SDM 25.9.2)."""

    EXTERNAL_INTERRUPT = 0
    NMI = 2
    HARDWARE_EXCEPTION = 3
    PRIVILEGED_SOFTWARE_EXCEPTION = 5
    SOFTWARE_EXCEPTION = 6


def interruption_information(vector: int, kind: InterruptionType, error_code_valid: bool) -> int:
    """Valid (bit 31), error code valid (bit 11), type (10:8), vector (7:0)."""
    return 1 << 31 | int(error_code_valid) << 11 | int(kind) << 8 | (vector & 0xFF)


def describe_qualification(reason: int, qualification: int) -> dict[str, object]:
    """The qualification's fields by the SDM's names (empty for reasons whose qualification is 0 or unused)."""
    if reason == ExitReason.CONTROL_REGISTER_ACCESS:
        access = CrAccessType(qualification >> 4 & 3)
        fields: dict[str, object] = {"control register": f"CR{qualification & 0xF}",
                                     "access type": access.name.replace("_", " ")}
        if access in (CrAccessType.MOV_TO_CR, CrAccessType.MOV_FROM_CR):
            fields["register"] = GPR_NAMES[qualification >> 8 & 0xF].upper()
        if access == CrAccessType.LMSW:
            fields["LMSW operand"] = "memory" if qualification >> 6 & 1 else "register"
            fields["LMSW source data"] = f"{qualification >> 16 & 0xFFFF:#x}"
        return fields
    if reason == ExitReason.MOV_DR:
        return {"debug register": f"DR{qualification & 7}",
                "direction": "MOV from DR" if qualification >> 4 & 1 else "MOV to DR",
                "register": GPR_NAMES[qualification >> 8 & 0xF].upper()}
    if reason == ExitReason.IO_INSTRUCTION:
        return {"size": (qualification & 7) + 1, "direction": "IN" if qualification >> 3 & 1 else "OUT",
                "string": "yes" if qualification >> 4 & 1 else "no", "REP": "yes" if qualification >> 5 & 1 else "no",
                "operand": "immediate" if qualification >> 6 & 1 else "DX", "port": f"{qualification >> 16:#x}"}
    if reason in (ExitReason.GDTR_OR_IDTR_ACCESS, ExitReason.LDTR_OR_TR_ACCESS):
        return {"displacement": f"{qualification:#x}"}
    if reason in (ExitReason.EXCEPTION_OR_NMI, ExitReason.INVLPG) and qualification:
        return {"linear address": f"{qualification:#x}"}
    return {}


class VmExit(NamedTuple):
    """One VM exit as the model records it: the VMCS exit-information fields (SDM 28.2).

    A named tuple rather than a frozen dataclass, as labkit records its hot exits (DECISIONS 2): the model
    makes one per exit, and a tuple costs a fraction of a dataclass's ``__init__``.

    ``reason`` is the basic exit reason; ``qualification`` the exit
    qualification; ``interruption_info``/``interruption_error_code`` are set for
    exits caused by exceptions and interrupts; ``instruction_length`` for exits
    caused by an instruction (0 otherwise); ``instruction_info`` for descriptor-table
    exits (bits 29:28: 0 SGDT/SLDT, 1 SIDT/STR, 2 LGDT/LLDT, 3 LIDT/LTR).
    """

    reason: ExitReason
    qualification: int
    guest_rip: int
    instruction: str
    instruction_length: int = 0
    interruption_info: int = 0
    interruption_error_code: int = 0
    instruction_info: int = 0

    @property
    def fields(self) -> dict[str, object]:
        """The qualification decoded (see :func:`describe_qualification`), plus the vector for exceptions."""
        fields = describe_qualification(self.reason, self.qualification)
        if self.interruption_info >> 31:
            from labkit.vmm.status import exception_name

            vector = self.interruption_info & 0xFF
            fields = {"vector": exception_name(vector).split(" ")[0] if vector < 32 else f"{vector:#x}",
                      "type": InterruptionType(self.interruption_info >> 8 & 7).name.replace("_", " ").lower(),
                      **fields}
            if self.interruption_info >> 11 & 1:
                fields["error code"] = f"{self.interruption_error_code:#x}"
        if self.reason in (ExitReason.GDTR_OR_IDTR_ACCESS, ExitReason.LDTR_OR_TR_ACCESS):
            names = (("SGDT", "SIDT", "LGDT", "LIDT") if self.reason == ExitReason.GDTR_OR_IDTR_ACCESS
                     else ("SLDT", "STR", "LLDT", "LTR"))
            fields = {"instruction identity": names[self.instruction_info >> 28 & 3], **fields}
        return fields

    def qualification_text(self) -> str:
        """``size 1, direction IN, ..., port 0x3fd``; "-" when there is nothing to say."""
        fields = self.fields
        return ", ".join(f"{name} {value}" for name, value in fields.items()) if fields else "-"
