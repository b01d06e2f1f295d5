"""Privileged, sensitive, innocuous: the three kinds of x86 instruction the lessons talk about, defined once.

Popek and Goldberg (1974), in x86 terms (Intel SDM Vol. 3A 5.9 "Privileged
Instructions", 2.8 "System Instruction Summary"):

- **privileged** (:data:`PRIVILEGED`): raises an exception (#GP, or #UD for a
  few newer ones) when run outside ring 0, in the state labkit's guests run in
  (RFLAGS.IOPL = 0, no I/O permission bitmap, CR4.TSD = CR4.PCE = 0).
  ``iret`` is here in the form a kernel uses it: returning to ring 0, which
  ring 3 may not do.
- **sensitive** (:data:`SENSITIVE`): reads or changes privileged state, or
  behaves differently by privilege level, **without** raising an exception in
  ring 3 (with CR4.UMIP = 0).  These are Robin and Irvine's (USENIX Security
  2000) Pentium instructions; a trap-and-emulate monitor never sees them.
- **innocuous**: every other instruction.  There is no set of them to list:
  :func:`instruction_class` answers ``INNOCUOUS`` for any instruction in
  neither set.  ``rdtsc`` is innocuous here (privileged only with CR4.TSD = 1),
  and so is ``cpuid`` (a hypervisor intercepts it, the CPU's rings do not).

In these terms the rule is: trap-and-emulate works when no instruction is
sensitive, since then every instruction that could show the guest it is not
in ring 0 traps.  x86 before VT-x broke it with the instructions in
:data:`SENSITIVE`.

Mnemonics are Capstone's (``pushfq``, ``lcall``, ``retfq``); ``mov``, ``push``
and ``pop`` depend on their operands (control, debug or segment registers) and
are decided by :func:`instruction_class`.  :mod:`labkit.classify` measures the
same three kinds by running an instruction in ring 0 and ring 3; the names of
its verdicts are these.
"""

from __future__ import annotations

import re
from enum import Enum


class InstructionClass(str, Enum):
    """Privileged, sensitive or innocuous (a str-enum: it equals its text)."""

    PRIVILEGED = "privileged"
    """Traps (an exception) when run in ring 3."""
    SENSITIVE = "sensitive"
    """Reads or changes privileged state, or depends on the ring, without trapping in ring 3."""
    INNOCUOUS = "innocuous"
    """Neither: the same in every ring, and it touches no privileged state."""

    def __str__(self) -> str:
        return self.value


PRIVILEGED_ALWAYS = frozenset({
    # Intel SDM Vol. 3A 5.9: "can be executed only when the CPL is 0"
    "lgdt", "lidt", "lldt", "ltr", "lmsw", "clts", "invd", "wbinvd", "invlpg", "hlt", "rdmsr", "wrmsr",
    "rdpmc",  # with CR4.PCE = 0
    # newer system instructions, #GP or #UD at CPL > 0
    "wbnoinvd", "invpcid", "xsetbv", "swapgs", "sysret", "sysretq", "sysexit", "sysexitq", "monitor", "mwait",
    # IOPL-sensitive (#GP when CPL > IOPL = 0; no I/O bitmap grants ports)
    "cli", "sti", "in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd",
    # a return to ring 0 (as a kernel's) from ring 3
    "iret", "iretd", "iretq",
})
"""Mnemonics that trap in ring 3 whatever their operands (``mov`` to or from CRn/DRn: see :data:`PRIVILEGED`)."""

PRIVILEGED = PRIVILEGED_ALWAYS | frozenset({"mov crN", "mov drN"})
"""Privileged instructions: :data:`PRIVILEGED_ALWAYS` plus ``mov`` to or from a control or debug register
(listed by those names; use :func:`instruction_class` for a decoded instruction)."""

SENSITIVE_ALWAYS = frozenset({
    # "sensitive register instructions": they show privileged registers to ring 3 (CR4.UMIP = 0)
    "sgdt", "sidt", "sldt", "smsw", "str",
    # the flags: ring 3 sees the real IF, and a POPF there leaves IF (and IOPL) unchanged without a fault
    "pushf", "pushfd", "pushfq", "popf", "popfd", "popfq",
    # "protection system references": their result depends on CPL and the descriptor tables
    "lar", "lsl", "verr", "verw",
    "lcall", "ljmp", "retf", "retfq", "int", "int3", "into",
})
"""Mnemonics that are sensitive but do not trap in ring 3 whatever their operands (Robin & Irvine's list;
``mov``/``push``/``pop`` of a segment register: see :data:`SENSITIVE`)."""

SENSITIVE = SENSITIVE_ALWAYS | frozenset({"mov Sreg", "push Sreg", "pop Sreg"})
"""Sensitive, unprivileged instructions: :data:`SENSITIVE_ALWAYS` plus ``mov``, ``push`` and ``pop`` of a
segment register (whose low two bits are the ring, or whose load checks it)."""

READS_DESCRIPTOR_TABLES = frozenset({"lar", "lsl", "verr", "verw"})
"""Instructions whose whole result is looked up in the GDT or LDT the CPU uses (SDM Vol. 2A LAR, LSL; 2B
VERR/VERW): where ring 3 does not use the guest's tables, their ring-3 result is not the guest's."""

SEGMENT_REGISTERS = ("cs", "ds", "es", "fs", "gs", "ss")
_CONTROL = re.compile(r"\b(cr\d+|dr\d+)\b")
_SEGMENT = re.compile(r"\b(cs|ds|es|fs|gs|ss)\b")


def instruction_class(mnemonic: str, operands: str = "") -> InstructionClass:
    """Privileged, sensitive or innocuous, for a Capstone mnemonic and its operand text.

    >>> instruction_class("mov", "rax, cr3"), instruction_class("mov", "eax, cs"), instruction_class("add", "eax, 1")
    (<InstructionClass.PRIVILEGED: 'privileged'>, <InstructionClass.SENSITIVE: 'sensitive'>, \
<InstructionClass.INNOCUOUS: 'innocuous'>)
    """
    mnemonic = mnemonic.strip().lower()
    operands = operands.lower()
    if mnemonic in PRIVILEGED_ALWAYS:
        return InstructionClass.PRIVILEGED
    if mnemonic in SENSITIVE_ALWAYS:
        return InstructionClass.SENSITIVE
    if mnemonic == "mov" and _CONTROL.search(operands):
        return InstructionClass.PRIVILEGED
    if mnemonic in ("mov", "push", "pop") and _is_segment_register_operand(operands):
        return InstructionClass.SENSITIVE
    return InstructionClass.INNOCUOUS


def _is_segment_register_operand(operands: str) -> bool:
    """A segment register as an operand itself (``eax, cs``), not as a memory operand's override (``fs:[rax]``)."""
    for operand in operands.split(","):
        operand = operand.strip()
        if "[" not in operand and _SEGMENT.fullmatch(operand):
            return True
    return False


def is_privileged(mnemonic: str, operands: str = "") -> bool:
    return instruction_class(mnemonic, operands) is InstructionClass.PRIVILEGED


def is_sensitive(mnemonic: str, operands: str = "") -> bool:
    """Sensitive and unprivileged: does not trap in ring 3 (the lesson's "sensitive")."""
    return instruction_class(mnemonic, operands) is InstructionClass.SENSITIVE
