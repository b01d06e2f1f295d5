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
from labkit.x86.instructions import InstructionClass


class Verdict(str, Enum):
    """What the classifier concludes about one instruction (a str-enum: it equals its text).

    The first three are the kinds :mod:`labkit.x86.instructions` defines (same names, same text).
    """

    PRIVILEGED = InstructionClass.PRIVILEGED.value
    """Traps in ring 3 and not in ring 0 (or ring 0 could not run)."""
    SENSITIVE = InstructionClass.SENSITIVE.value
    """Does not trap in ring 3, but its result depends on the ring or on the privileged state."""
    INNOCUOUS = InstructionClass.INNOCUOUS.value
    BOTH_FAULT = "faults in both rings"
    """The same exception in ring 0 and ring 3: not a question of privilege."""
    NONDETERMINISTIC = "nondeterministic"
    """Two runs of the same code in the same ring gave different results (``rdtsc``): a difference between
    the rings says nothing then."""
    HOST_DEPENDENT = "host-dependent"
    """Ring 0 and ring 3 differ only in values ring 3 got from the host, not from the guest
    (:attr:`Classification.host` has the evidence): this backend cannot show the instruction's own behaviour."""
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
NONDETERMINISTIC = Verdict.NONDETERMINISTIC
HOST_DEPENDENT = Verdict.HOST_DEPENDENT
UNDETERMINED = Verdict.UNDETERMINED
VERDICTS = tuple(Verdict)


class HostInfluence(str, Enum):
    """How a result came from the host rather than from the guest (see :func:`host_evidence`)."""

    INTERCEPTED = "intercepted by the host"
    """The host trapped the instruction in ring 3 (PVM: the host's CR4.UMIP) and KVM's instruction emulator
    produced its result."""
    HOST_SELECTORS = "host's segment selectors"
    """Ring 3 read a selector that does not follow the guest's GDT layout."""
    HOST_TABLES = "host's descriptor tables"
    """Ring 3 looks descriptors up in a GDT that is not the guest's."""
    HOST_IF = "host's interrupt flag"
    """Ring 3 stored RFLAGS with IF = 1 while the guest ran it with IF = 0."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class HostEvidence:
    """One way a result came from the host, the fields it concerns and the measurement that shows it."""

    kind: HostInfluence
    fields: tuple[str, ...]
    """Results that are the host's (``"rax"``, ``"pushed"``, ``"scratch"``); empty when the values are still
    the guest's (an intercepted instruction KVM emulated with the guest's state)."""
    evidence: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.evidence}"


@dataclass(frozen=True)
class RingTables:
    """Whether ring 3 on a backend looks descriptors up in the guest's GDT: one ``lar`` of the guest's own
    ring-3 code selector, from ring 3, against the guest's descriptor (see :func:`labkit.classify.ring3_tables`)."""

    backend: str
    guest_tables: bool
    evidence: str


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
    emulated: int | None = None
    """Instructions KVM's instruction emulator ran during the run (vCPU stat ``insn_emulation``); None where
    the backend has no such count (the emulator)."""

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
        if self.outcome is Outcome.ENTERED and self.vector is not None:
            return f"entered the handler for {exception_name(self.vector).split(' (')[0]}"
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
    host: tuple[HostEvidence, ...] = ()
    """Results that came from the host rather than from the guest, each with its evidence (empty: none seen)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "verdict", Verdict(self.verdict))  # "sensitive" becomes Verdict.SENSITIVE

    @property
    def host_influenced(self) -> bool:
        return bool(self.host)

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
            lines.append(f"  {run.run:<16} {run.describe()}")
        lines.extend(f"  differs: {text}" for text in self.differences)
        lines.extend(f"  from the host: {evidence}" for evidence in self.host)
        if self.umip:
            lines.append(f"  UMIP: {self.umip}")
        lines.extend(f"  note: {text}" for text in self.notes)
        return "\n".join(lines)


def _compare(a: RingRun, b: RingRun, ignore_flags: int = 0, skip: frozenset[str] = frozenset()) -> list[str]:
    """What differs between two runs that both got to an answer, in words.

    ``ignore_flags``: RFLAGS bits the two runs were entered with differently.
    ``skip``: fields (``"rax"``, ``"pushed"``, ...) not to compare (ring 3's came from the host).
    """
    texts = []
    if a.outcome != b.outcome or a.vector != b.vector:
        return [f"{a.run}: {a.describe()}; {b.run}: {b.describe()}"]
    for (name, left), (_, right) in zip(a.regs, b.regs):
        if name in skip:
            continue
        if name == "rflags":
            left, right = left & ~ignore_flags, right & ~ignore_flags
        if left != right:
            texts.append(f"{name}: {left:#x} ({a.run}) vs {right:#x} ({b.run})")
    if a.pushed != b.pushed and "pushed" not in skip:
        texts.append(f"pushed on the stack: {_words(a.pushed)} ({a.run}) vs {_words(b.pushed)} ({b.run})")
    if a.scratch != b.scratch and "scratch" not in skip:
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


AGAIN = {"ring 0": "ring 0 again", "ring 3": "ring 3 again"}
"""The second run of each ring, from the same entry point: a result that differs between the two is noise."""
RELOCATED = {"ring 0": "ring 0 relocated", "ring 3": "ring 3 relocated"}
"""The runs under the second GDT layout (:func:`labkit.classify.guest.relocated_gdt`)."""
WITHOUT = "ring 3 without it"
"""Ring 3 with the instruction replaced by ``nop`` (same setup): what KVM emulates without it."""


def _fields(run: RingRun) -> dict[str, object]:
    """A run's results by name: each register, ``"pushed"`` and ``"scratch"``."""
    fields: dict[str, object] = dict(run.regs)
    fields["pushed"] = run.pushed
    fields["scratch"] = run.scratch
    return fields


def _show(value: object) -> str:
    return f"{value:#x}" if isinstance(value, int) else _words(value) if isinstance(value, bytes) else str(value)


def _answered(run: RingRun | None) -> bool:
    return run is not None and run.outcome in (Outcome.COMPLETED, Outcome.ENTERED)


def host_evidence(runs: dict[str, RingRun], tables: RingTables | None = None,
                  reads_tables: bool = False) -> tuple[HostEvidence, ...]:
    """Which of ring 3's results came from the host rather than from the guest, and the evidence, from the runs.

    Four checks, each a measurement of this row (none names a host):

    - **intercepted**: ring 3 did not trap, yet KVM's instruction emulator ran more instructions in the
      ring-3 run than in the same run with ``nop`` in its place (:data:`WITHOUT`);
    - **host's selectors**: under a second guest GDT layout (:data:`RELOCATED`) ring 0's result moved with the
      layout and ring 3's stayed where it was;
    - **host's IF**: the ring-3 run entered with IF = 0 stored a value with IF = 1 where ring 0 stored IF = 0;
    - **host's tables**: the instruction reads descriptor tables (``reads_tables``) and the backend's ring 3
      does not use the guest's GDT (``tables``, :func:`labkit.classify.ring3_tables`).
    """
    found: list[HostEvidence] = []
    ring0, ring3 = runs.get("ring 0"), runs.get("ring 3")
    if ring3 is None or not _answered(ring3):
        return ()
    noisy = _noisy_fields(runs)
    without = runs.get(WITHOUT)
    again = runs.get(AGAIN["ring 3"])
    if without is not None and ring3.emulated is not None and without.emulated is not None \
            and ring3.emulated > without.emulated and (again is None or again.emulated == ring3.emulated):
        extra = ring3.emulated - without.emulated
        same = ""
        if _answered(ring0) and ring0 is not None:
            differs = _compare(ring0, ring3)
            same = (" Its result is the one ring 0 gets: KVM emulated it with the guest's values."
                    if not differs else " Its result differs from ring 0's: " + "; ".join(differs[:2]) + ".")
        found.append(HostEvidence(
            HostInfluence.INTERCEPTED, (),
            f"the guest saw no trap in ring 3, yet KVM's instruction emulator ran {extra} more instruction"
            f"{'s' if extra != 1 else ''} in that run than with nop in its place (vCPU stat insn_emulation: "
            f"{ring3.emulated} vs {without.emulated}): the host trapped it and KVM produced the result.{same}"))
    moved0, moved3 = runs.get(RELOCATED["ring 0"]), runs.get(RELOCATED["ring 3"])
    if _answered(moved3) and moved3 is not None:
        a3, b3 = _fields(ring3), _fields(moved3)
        a0 = _fields(ring0) if _answered(ring0) and ring0 is not None else None
        b0 = _fields(moved0) if _answered(moved0) and moved0 is not None else None
        stayed = []
        for name in a3:
            if name == "rflags" or name in noisy or a0 is None or b0 is None:
                continue
            if a0[name] != b0[name] and a3[name] == b3[name] and a3[name] != a0[name]:
                stayed.append((name, f"{name} = {_show(a3[name])} in ring 3 under both layouts, while ring 0 "
                                     f"read {_show(a0[name])}, then {_show(b0[name])}"))
        if stayed:
            found.append(HostEvidence(
                HostInfluence.HOST_SELECTORS, tuple(name for name, _ in stayed),
                "; ".join(text for _, text in stayed) + ". The second layout moved every guest descriptor: ring "
                "0's value follows the guest's GDT, ring 3's does not, so it is not the guest's."))
    closed0, closed3 = runs.get("ring 0 altered"), runs.get("ring 3 altered")
    if _answered(closed0) and _answered(closed3) and closed0 is not None and closed3 is not None \
            and (closed3.reg("rflags") or 0) & RFLAGS_IF == 0:
        flipped = [name for name, left, right in (("pushed", closed0.pushed, closed3.pushed),
                                                  ("scratch", closed0.scratch, closed3.scratch))
                   if _only_if_set(left, right)]
        if flipped:
            found.append(HostEvidence(
                HostInfluence.HOST_IF, tuple(flipped),
                f"entered with IF = 0, ring 3 stored {_words(getattr(closed3, flipped[0]))} where ring 0 stored "
                f"{_words(getattr(closed0, flipped[0]))}: the same value but for IF (bit 9) = 1, while the CPU's "
                "own frame at the end of the run says IF = 0. Ring 3 runs with the host's IF."))
    if reads_tables and tables is not None and not tables.guest_tables:
        found.append(HostEvidence(HostInfluence.HOST_TABLES, tuple(name for name, _ in ring3.regs),
                                  f"this instruction's result is a descriptor-table lookup, and {tables.evidence}"))
    return tuple(found)


def _only_if_set(ring0: bytes, ring3: bytes) -> bool:
    """``ring3`` equals ``ring0`` except for IF (bit 9) set in one little-endian word (or dword) of it."""
    if len(ring0) != len(ring3) or ring0 == ring3:
        return False
    size = 8 if len(ring0) % 8 == 0 else 4 if len(ring0) % 4 == 0 else 0
    if not size:
        return False
    words0 = struct.unpack(f"<{len(ring0) // size}{'Q' if size == 8 else 'I'}", ring0)
    words3 = struct.unpack(f"<{len(ring3) // size}{'Q' if size == 8 else 'I'}", ring3)
    return all(a == b or (a ^ b == RFLAGS_IF and b & RFLAGS_IF) for a, b in zip(words0, words3))


def _noisy_fields(runs: dict[str, RingRun]) -> set[str]:
    """Results that differed between two runs of the same ring."""
    noisy: set[str] = set()
    for ring, again in AGAIN.items():
        a, b = runs.get(ring), runs.get(again)
        if a is not None and b is not None:
            left, right = _fields(a), _fields(b)
            noisy |= {name for name in left if left[name] != right.get(name)}
    return noisy


def _noise(runs: dict[str, RingRun]) -> list[str]:
    """What differed between two runs of the same ring (:data:`AGAIN`), in words."""
    texts = []
    for ring, again in AGAIN.items():
        a, b = runs.get(ring), runs.get(again)
        if a is not None and b is not None and Outcome.NOT_RUN not in (a.outcome, b.outcome):
            texts += _compare(a, b)
    return texts


def decide(runs: dict[str, RingRun], backend: str, flavour: str | None,
           host: tuple[HostEvidence, ...] = ()) -> tuple[Verdict, str, list[str], list[str]]:
    """The verdict, its reason, the differences seen and notes, from the runs by name (``"ring 0"``, ...).

    ``flavour`` (``"kvm_pvm"``, ...) adds notes on what that KVM does differently.  Ring-3 results named
    in ``host`` (:func:`host_evidence`) came from the host: they are left out of every comparison.
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
    again3 = runs.get(AGAIN["ring 3"])
    if ring3.outcome is Outcome.TRAPPED and (again3 is None or _compare(ring3, again3) == []):
        what = ring3.describe().removeprefix("trapped: ")
        if ring0.outcome is Outcome.TRAPPED and ring0.vector == ring3.vector:
            return BOTH_FAULT, f"{what} in ring 0 as well: not a matter of privilege", [], notes
        if ring0.outcome is Outcome.NOT_RUN:
            notes.append(f"ring 0 reference: {ring0.note or ring0.status}")
            return PRIVILEGED, f"traps in ring 3 ({what})", [], notes
        return PRIVILEGED, f"traps in ring 3 ({what}); in ring 0 it {ring0.describe()}", [], notes
    noise = _noise(runs)
    if noise:
        return NONDETERMINISTIC, ("two runs of the same code in the same ring gave different results, so a "
                                  "difference between the rings says nothing about privilege"), noise, notes

    skip = frozenset(name for evidence in host for name in evidence.fields)
    by_ring: list[str] = []
    hidden = False
    for left, right in (("ring 0", "ring 3"), ("ring 0 altered", "ring 3 altered")):
        a, b = runs.get(left), runs.get(right)
        if a is not None and b is not None and Outcome.NOT_RUN not in (a.outcome, b.outcome):
            by_ring += _compare(a, b, skip=skip)
            hidden = hidden or bool(_compare(a, b)) != bool(_compare(a, b, skip=skip))
    altered = runs.get("ring 3 altered")
    by_state: list[str] = []
    if altered is not None and altered.outcome is not Outcome.NOT_RUN:
        by_state = _compare(ring3, altered, ignore_flags=RFLAGS_IF, skip=skip)
        hidden = hidden or bool(_compare(ring3, altered, ignore_flags=RFLAGS_IF)) != bool(by_state)
    for run in runs.values():
        if run.outcome is Outcome.NOT_RUN and run is not ring3 and run.run in ("ring 0", "ring 0 altered",
                                                                                "ring 3 altered", "ring 3 umip"):
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
    if hidden:
        return HOST_DEPENDENT, ("ring 0 and ring 3 differ only in values ring 3 got from the host, not from the "
                                "guest: this backend cannot show what the instruction itself does"), differences, notes
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
