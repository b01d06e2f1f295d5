"""How the classifier decides: the outcome of each run, compared across rings and privileged state.

:func:`decide` is a plain function of the runs (:class:`RingRun`), so the rules
are tested with hand-made runs; :mod:`labkit.classify.runner` makes the real ones.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

from labkit.vmm.status import exception_name
from labkit.x86 import layout
from labkit.x86.arch import RFLAGS_IF, SELECTOR_RPL, Vector


class Verdict(str, Enum):
    """What the classifier concludes about one instruction (a str-enum: it equals its text)."""

    PRIVILEGED = "privileged"
    """Traps in ring 3 and not in ring 0 (or ring 0 could not run)."""
    SENSITIVE = "sensitive"
    """Does not trap in ring 3, but its result depends on the ring or on the privileged state."""
    INNOCUOUS = "innocuous"
    BOTH_FAULT = "faults in both rings"
    """The same exception in ring 0 and ring 3: not a question of privilege."""
    UNDETERMINED = "undetermined"

    def __str__(self) -> str:
        return self.value


class Outcome(str, Enum):
    """What one run of the instruction did (see :mod:`labkit.classify`)."""

    COMPLETED = "completed"
    TRAPPED = "trapped"
    ENTERED = "entered"
    NOT_RUN = "not run"

    def __str__(self) -> str:
        return self.value


PRIVILEGED = Verdict.PRIVILEGED
SENSITIVE = Verdict.SENSITIVE
INNOCUOUS = Verdict.INNOCUOUS
BOTH_FAULT = Verdict.BOTH_FAULT
UNDETERMINED = Verdict.UNDETERMINED
VERDICTS = tuple(Verdict)


@dataclass(frozen=True)
class RingRun:
    """One run of the instruction: in which ring and privileged state, and what happened."""

    run: str
    """One of :data:`RUNS`: ``"ring 0"``, ``"ring 3"``, ``"ring 3 altered"`` (other privileged state), ..."""
    outcome: Outcome
    """``completed``, ``trapped``, ``entered`` or ``not run`` (see :mod:`labkit.classify`)."""
    status: str
    """labkit's status of the run, as text."""
    vector: int | None = None
    error_code: int | None = None
    rip: int | None = None
    regs: tuple[tuple[str, int], ...] = ()
    """GPRs and RFLAGS (RF masked) at the ``ud2`` or at the fault."""
    pushed: bytes = b""
    """Bytes the instruction left on the stack below RUN_RSP (at most 64)."""
    scratch: bytes = b""
    handler_stack: int | None = None
    """For ``entered``: where the handler's frame lies (RSP0 from the TSS when coming from ring 3)."""
    pushed_cs: int | None = None
    """For ``entered``: the CS in the frame the CPU pushed (its low two bits: the caller's ring)."""
    note: str = ""
    emulation_failed: bool = False
    """KVM ended the run with ``KVM_EXIT_INTERNAL_ERROR``: its instruction emulator could not run the code."""
    in_prologue: bool = False
    """The run faulted in the classifier's own ring-0 prologue, before the setup."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "outcome", Outcome(self.outcome))  # "trapped" becomes Outcome.TRAPPED

    def reg(self, name: str) -> int | None:
        return dict(self.regs).get(name)

    def describe(self) -> str:
        """One line: ``#GP(0x0) at the instruction`` or ``completed: rax=0x1b``."""
        if self.outcome is Outcome.TRAPPED:
            if self.vector is None:
                return f"trapped: {self.status}"
            code = f"({self.error_code:#x})" if self.error_code is not None else ""
            return f"trapped: {exception_name(self.vector).split(' ')[0]}{code}"
        if self.outcome is Outcome.ENTERED:
            return f"entered the handler for vector {self.vector:#x}"
        if self.outcome is Outcome.NOT_RUN:
            return f"not run: {self.note or self.status}"
        return "completed" + (f" ({self.note})" if self.note else "")


@dataclass(frozen=True)
class Classification:
    """What :func:`classify` found: the verdict, a one-line reason and the evidence per run."""

    instruction: str
    setup: str
    mode: int
    backend: str
    """``"kvm"`` or ``"emu"``."""
    flavour: str | None
    """``kvm_intel``, ``kvm_amd``, ``kvm_pvm`` for KVM; None for the emulator."""
    verdict: Verdict
    reason: str
    runs: tuple[RingRun, ...]
    differences: tuple[str, ...] = ()
    """``"rax: 0x0 (ring 0) vs 0x2b (ring 3)"``, one per differing register or memory area."""
    notes: tuple[str, ...] = ()
    umip: str = ""
    """With ``umip=True``: what setting CR4.UMIP did (or why it could not be set)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "verdict", Verdict(self.verdict))  # "sensitive" becomes Verdict.SENSITIVE

    def run(self, name: str) -> RingRun | None:
        for run in self.runs:
            if run.run == name:
                return run
        return None

    @property
    def backend_label(self) -> str:
        return f"KVM ({self.flavour})" if self.backend == "kvm" and self.flavour else \
            "KVM" if self.backend == "kvm" else "emulator (Unicorn)"

    def __str__(self) -> str:
        lines = [f"{self.instruction} ({self.mode}-bit) on {self.backend_label}: {self.verdict.upper()}",
                 f"  why: {self.reason}"]
        for run in self.runs:
            lines.append(f"  {run.run:<8} {run.describe()}")
        lines.extend(f"  differs: {text}" for text in self.differences)
        if self.umip:
            lines.append(f"  UMIP: {self.umip}")
        lines.extend(f"  note: {text}" for text in self.notes)
        return "\n".join(lines)


def _compare(a: RingRun, b: RingRun, ignore_flags: int = 0) -> list[str]:
    """What differs between two runs that both got to an answer, in words.

    ``ignore_flags``: RFLAGS bits the two runs were entered with differently.
    """
    texts = []
    if a.outcome != b.outcome or a.vector != b.vector:
        return [f"{a.run}: {a.describe()}; {b.run}: {b.describe()}"]
    for (name, left), (_, right) in zip(a.regs, b.regs):
        if name == "rflags":
            left, right = left & ~ignore_flags, right & ~ignore_flags
        if left != right:
            texts.append(f"{name}: {left:#x} ({a.run}) vs {right:#x} ({b.run})")
    if a.pushed != b.pushed:
        texts.append(f"pushed on the stack: {_words(a.pushed)} ({a.run}) vs {_words(b.pushed)} ({b.run})")
    if a.scratch != b.scratch:
        texts.append(f"scratch memory: {_bytes(a.scratch, b.scratch)} ({a.run}) vs {_bytes(b.scratch, a.scratch)} ({b.run})")
    if a.outcome is Outcome.ENTERED:
        if a.pushed_cs is not None and b.pushed_cs is not None and (a.pushed_cs & SELECTOR_RPL) != (b.pushed_cs & SELECTOR_RPL):
            texts.append(f"CS pushed for the handler: {a.pushed_cs:#x} ({a.run}) vs {b.pushed_cs:#x} ({b.run})")
        if a.handler_stack != b.handler_stack and a.handler_stack and b.handler_stack:
            texts.append(f"handler's stack: {a.handler_stack:#x} ({a.run}) vs {b.handler_stack:#x} ({b.run}, "
                         f"RSP0 from the TSS is {layout.KERNEL_STACK_TOP:#x})")
    return texts


def _words(data: bytes) -> str:
    if not data:
        return "nothing"
    if len(data) % 4:
        return data.hex()
    return " ".join(f"{word:#x}" for word in struct.unpack(f"<{len(data) // 4}I", data))


def _bytes(data: bytes, other: bytes) -> str:
    """The non-zero prefix of a scratch area, long enough to show where it differs from ``other``."""
    end = max((i + 1 for i in range(len(data)) if data[i] or (i < len(other) and other[i])), default=0)
    return data[:end].hex(" ") or "zeros"


def decide(runs: dict[str, RingRun], backend: str,
           flavour: str | None) -> tuple[Verdict, str, list[str], list[str]]:
    """The verdict, its reason, the differences seen and notes, from the runs by name (``"ring 0"``, ...).

    ``flavour`` (``"kvm_pvm"``, ...) adds notes on what that KVM does differently.
    """
    ring0, ring3 = runs["ring 0"], runs["ring 3"]
    notes: list[str] = []
    if flavour == "kvm_pvm":
        if any(run.outcome is Outcome.NOT_RUN and run.emulation_failed for run in runs.values()):
            notes.append("under PVM, ring-0 code is run by KVM's instruction emulator, which cannot run this "
                         "instruction here; with VT-x or AMD-V the CPU runs it")
        if ring3.outcome is Outcome.TRAPPED and ring3.vector == Vector.UD:
            notes.append("under PVM a ring-3 `int n` (other than int3 and int 4) raises #UD; "
                         "VT-x, AMD-V and the emulator raise #GP for a gate with DPL 0")
        if ring3.outcome is Outcome.TRAPPED and ring3.vector is None:
            notes.append("under PVM this ring-3 instruction ended in a triple fault (a shutdown) rather than "
                         "an exception delivered to the guest; VT-x, AMD-V and the emulator deliver it")
    if ring3.outcome is Outcome.NOT_RUN:
        return UNDETERMINED, f"ring 3 gave no answer: {ring3.note or ring3.status}", [], notes
    if ring3.outcome is Outcome.TRAPPED:
        what = ring3.describe().removeprefix("trapped: ")
        if ring0.outcome is Outcome.TRAPPED and ring0.vector == ring3.vector:
            return BOTH_FAULT, f"{what} in ring 0 as well: not a matter of privilege", [], notes
        if ring0.outcome is Outcome.NOT_RUN:
            notes.append(f"ring 0 reference: {ring0.note or ring0.status}")
            return PRIVILEGED, f"traps in ring 3 ({what})", [], notes
        return PRIVILEGED, f"traps in ring 3 ({what}); in ring 0 it {ring0.describe()}", [], notes

    by_ring: list[str] = []
    for left, right in (("ring 0", "ring 3"), ("ring 0 altered", "ring 3 altered")):
        a, b = runs.get(left), runs.get(right)
        if a is not None and b is not None and Outcome.NOT_RUN not in (a.outcome, b.outcome):
            by_ring += _compare(a, b)
    altered = runs.get("ring 3 altered")
    by_state = _compare(ring3, altered, ignore_flags=RFLAGS_IF) \
        if altered is not None and altered.outcome is not Outcome.NOT_RUN else []
    for run in runs.values():
        if run.outcome is Outcome.NOT_RUN and run is not ring3:
            notes.append(f"{run.run} run: {run.note or run.status}")
    differences = by_ring + by_state
    if by_ring:
        trapped = [run for run in runs.values() if run.outcome is Outcome.TRAPPED and run.run.startswith("ring 0")]
        if trapped:
            reason = f"no trap in ring 3, but in ring 0 it {trapped[0].describe()}: the outcome depends on the ring"
        else:
            reason = "no trap in ring 3, yet the result differs between ring 0 and ring 3"
        return SENSITIVE, reason, differences, notes
    if by_state:
        return SENSITIVE, "no trap in ring 3, and its result there changes with the privileged state", \
            differences, notes
    if ring0.outcome is Outcome.NOT_RUN:
        return UNDETERMINED, "does not trap in ring 3 (unprivileged), and ring 3 saw no privileged state; " \
            "whether it behaves differently in ring 0 is unknown: ring 0 could not run", differences, notes
    return INNOCUOUS, "no trap, and the same result in ring 0 and ring 3 and under other privileged state", \
        differences, notes


def umip_effect(umip: RingRun, ring3: RingRun) -> str:
    """What CR4.UMIP = 1 changed for ring 3, in words (the umip run against the plain ring-3 run)."""
    state = f" ({umip.note})" if umip.note and umip.outcome is not Outcome.NOT_RUN else ""
    if umip.outcome is Outcome.NOT_RUN and umip.in_prologue:
        return f"this backend does not let the guest set CR4.UMIP: {umip.status}"
    if umip.outcome is Outcome.TRAPPED:
        return f"with CR4.UMIP = 1 it traps in ring 3: {umip.describe().removeprefix('trapped: ')}{state}"
    if umip.outcome == ring3.outcome:
        return f"CR4.UMIP = 1 changes nothing: not modelled{state}"
    return f"with CR4.UMIP = 1: {umip.describe()}{state}"
