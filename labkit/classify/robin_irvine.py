"""Robin and Irvine's list (USENIX Security 2000): the x86 instructions that are sensitive but unprivileged.

Their analysis of the Pentium names these mnemonics in two groups:

- sensitive register instructions: SGDT, SIDT, SLDT, SMSW, PUSHF, POPF;
- protection system references: LAR, LSL, VERR, VERW, POP, PUSH, CALL, JMP,
  INT n, RET, STR, MOV.

That is eighteen names (:data:`ROBIN_IRVINE` has one row per name, in this
order but for STR, listed with the other stores of system registers).  The
paper's own total, as it is usually quoted, is seventeen; labkit does not
carry the paper's text, so it does not say how the paper counts to seventeen,
and keeps every name the groups list.  Several names stand for more than one
form: MOV is run once, as a read of CS (a read of any segment register is the
same case, see :data:`labkit.x86.instructions.SENSITIVE`), PUSH and POP as
``push cs`` and ``pop ss``.

One :class:`Experiment` per name, with the setup it needs;
:func:`robin_irvine_table` classifies each one by running it.  The paper's
verdict is the only thing typed in.
"""

from __future__ import annotations

from dataclasses import dataclass

from labkit.classify.rules import Classification, Verdict
from labkit.classify.runner import classify
from labkit.progress import tracked

@dataclass(frozen=True)
class Experiment:
    """One of Robin & Irvine's instructions as labkit runs it."""

    name: str
    """The paper's name, e.g. ``"SGDT"``."""
    instruction: str
    setup: str = ""
    mode: int = 64
    umip: bool = False
    why: str = ""
    """What the setup arranges, in a few words."""


PAPER_COUNT = 17
"""The total the paper's list is usually quoted with (its groups name :data:`ROBIN_IRVINE`'s eighteen)."""

PAPER_VERDICT = Verdict.SENSITIVE
"""Robin & Irvine (2000), section 4.3: every instruction on their list is sensitive and unprivileged (it
does not trap in user mode).  The only typed-in verdict here: the reference the measured ones are compared with."""

ROBIN_IRVINE = (
    Experiment("SGDT", "sgdt [scratch]", umip=True, why="stores GDTR; the altered run moves the GDT"),
    Experiment("SIDT", "sidt [scratch]", umip=True, why="stores IDTR; the altered run moves the IDT"),
    Experiment("SLDT", "sldt eax", umip=True, why="stores LDTR; the altered run loads an LDT"),
    Experiment("SMSW", "smsw eax", umip=True,
               why="stores CR0 (in 64-bit mode, into a 32-bit register: CR0[31:0]); the altered run sets CR0.TS"),
    Experiment("PUSHF", "pushfq", why="pushes RFLAGS; the altered run enters ring 3 with IF = 0"),
    Experiment("POPF", "popfq", setup="pushfq\nxor qword ptr [rsp], 0x200",
               why="pops RFLAGS with IF toggled: ring 3 may not change IF"),
    Experiment("LAR", "lar eax, ecx", setup="mov ecx, KERNEL_DS", why="a DPL-0 selector"),
    Experiment("LSL", "lsl eax, ecx", setup="mov ecx, KERNEL_DS", why="a DPL-0 selector"),
    Experiment("VERR", "verr cx", setup="mov ecx, KERNEL_DS", why="a DPL-0 selector"),
    Experiment("VERW", "verw cx", setup="mov ecx, KERNEL_DS", why="a DPL-0 selector"),
    Experiment("PUSH", "push cs", mode=32, why="pushes CS, whose low two bits are the CPL"),
    Experiment("POP", "pop ss", setup="push USER_DS", mode=32,
               why="pops a DPL-3 stack selector: allowed only where CPL = 3"),
    Experiment("CALL", "call USER_CS32:after", mode=32, why="a far call to the DPL-3 code segment"),
    Experiment("JMP", "jmp USER_CS32:after", mode=32, why="a far jump to the DPL-3 code segment"),
    Experiment("INT n", "int3", why="a gate with DPL 3 (vector 3)"),
    Experiment("RET", "retf", mode=32,
               setup="push USER_DS\npush RUN_RSP - 0x100\npush USER_CS32\npush offset after",
               why="a far return with an outer-ring (RPL 3) frame"),
    Experiment("STR", "str eax", umip=True, why="stores TR; the altered run loads another TSS"),
    Experiment("MOV", "mov eax, cs", why="reads CS, whose low two bits are the CPL"),
)


def robin_irvine_table(backend: str = "auto", *, umip: bool = True) -> list[Classification]:
    """Classify each of Robin & Irvine's problematic instructions on ``backend``, by running them.

    Each comes with the small setup it needs (see :data:`ROBIN_IRVINE`; MOV
    appears once, as a read of CS).  ``umip=False`` skips the CR4.UMIP runs.
    """
    return [classify(exp.instruction, backend=backend, mode=exp.mode, setup=exp.setup,
                     umip=umip and exp.umip)
            for exp in tracked(ROBIN_IRVINE, f"classifying on {backend}")]
