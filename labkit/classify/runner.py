"""Running the classifier's guest: one :class:`labkit.Machine` per ring and privileged state.

:func:`classify` assembles the guest (:mod:`labkit.classify.guest`), runs it,
turns each run's result into a :class:`RingRun` and lets
:func:`labkit.classify.rules.decide` conclude.
"""

from __future__ import annotations

import struct
from dataclasses import replace
from functools import lru_cache
from typing import TYPE_CHECKING

from labkit.classify.guest import (ENTRY_STRIDE, PUSHED_MAX, RUN_RSP, RUNS, SCRATCH, SCRATCH_SIZE, UMIP_CPUID,
                                   assemble_guest)
from labkit.classify.rules import (AGAIN, RELOCATED, WITHOUT, Classification, Outcome, RingRun, RingTables, decide,
                                   host_evidence, umip_effect)
from labkit.errors import ConfigError, LabkitError
from labkit.exits import ExitReason
from labkit.vmm.status import Origin, RunResult, StatusKind
from labkit.x86 import layout
from labkit.x86.arch import CR4_UMIP, ERROR_CODE_VECTORS, RFLAGS_RF, RFLAGS_ZF, Vector
from labkit.x86.state import GPR_NAMES

if TYPE_CHECKING:
    from labkit.vmm.machine import Machine

TIMEOUT_S = 2.0
"""Seconds each run may take before it is stopped and reported as a hang."""


def classify(instruction: str, *, backend: str = "auto", mode: int = 64, setup: str = "",
             umip: bool = False, timeout: float = TIMEOUT_S) -> Classification:
    """Run ``instruction`` (GNU as, Intel syntax) in ring 0 and ring 3 on ``backend`` and classify it.

    ``setup`` is assembly run first in the same ring (say, loading a selector
    into ECX).  ``mode`` 64 or 32 (compatibility mode).  ``umip=True`` adds a
    ring-3 run with CR4.UMIP set.  Raises :class:`labkit.AssemblyError` with
    the assembler's message when the text does not assemble; an instruction
    that hangs is stopped after ``timeout`` seconds and reported as such.

    Ring 0 and ring 3 each run twice: a result that differs between the two
    is noise, and the verdict is ``nondeterministic``.  When ring 3 gets to an
    answer, up to three more runs look for results that came from the host
    (:func:`labkit.classify.rules.host_evidence`): ring 0 and ring 3 under a
    second GDT layout (where the rings differ), and (where KVM counts emulated
    instructions) ring 3 with ``nop`` in the instruction's place, once per
    setup.
    """
    from labkit.backend import choose_backend
    from labkit.x86.disasm import disassemble
    from labkit.x86.instructions import READS_DESCRIPTOR_TABLES

    if not isinstance(instruction, str) or not instruction.strip():
        raise ConfigError(f"give the instruction as assembly text, such as 'sgdt [scratch]', not {instruction!r}")
    if not isinstance(setup, str):
        raise ConfigError(f"setup must be assembly text, not {type(setup).__name__}")
    if mode not in (32, 64):
        raise ConfigError(f"mode must be 64 (long mode) or 32 (compatibility mode), not {mode!r}")
    instruction, setup = instruction.strip(), setup.strip()
    choice = choose_backend(backend)
    code, target, start, after = assemble_guest(instruction, setup, mode)
    origins: list[Origin | None] = []

    def run(name: str, entry: str | None = None, guest: tuple[bytes, int, int, int] | None = None) -> RingRun:
        ring_run, origin = _run(guest or (code, target, start, after), name, entry or name, choice.name, timeout)
        origins.append(origin)
        return ring_run

    runs = {name: run(name) for name in ("ring 3", "ring 0")}
    for ring in ("ring 3", "ring 0"):
        runs[AGAIN[ring]] = run(AGAIN[ring], ring)
    answered = runs["ring 3"].outcome in (Outcome.COMPLETED, Outcome.ENTERED)
    if answered:
        for name in ("ring 3 altered", "ring 0 altered"):
            runs[name] = run(name)
    umip_text = ""
    if umip:
        runs["ring 3 umip"] = run("ring 3 umip")
        umip_text = umip_effect(runs["ring 3 umip"], runs["ring 3"])
    tables = None
    if answered:
        ring0 = runs["ring 0"]
        if ring0.outcome in (Outcome.COMPLETED, Outcome.ENTERED) and differs(ring0, runs["ring 3"]):
            # Only a result that differs between the rings can be the host's selector: look at the layouts.
            relocated = assemble_guest(instruction, setup, mode, True)
            for ring, name in RELOCATED.items():
                runs[name] = run(name, ring, relocated)
        if runs["ring 3"].emulated is not None:
            runs[WITHOUT] = run_without(choice.name, setup, mode, timeout)
        decoded = disassemble(code[start - layout.LOAD_ADDRESS:after - layout.LOAD_ADDRESS], start, mode, count=1)
        if decoded and decoded[0][2].split(" ")[0] in READS_DESCRIPTOR_TABLES:
            tables = ring3_tables(choice.name)
    flavour = _flavour(choice.name, origins[0])
    host = host_evidence(runs, tables, reads_tables=tables is not None)
    verdict, reason, differences, notes = decide(runs, choice.name, flavour, host)
    order = [*RUNS, AGAIN["ring 0"], AGAIN["ring 3"], RELOCATED["ring 0"], RELOCATED["ring 3"], WITHOUT]
    ordered = tuple(runs[name] for name in order if name in runs)
    return Classification(instruction, setup, mode, choice.name, flavour, verdict, reason, ordered,
                          tuple(differences), tuple(notes), umip_text, host)


@lru_cache(maxsize=64)
def run_without(backend: str, setup: str, mode: int, timeout: float) -> RingRun:
    """Ring 3 with ``nop`` for the instruction (:data:`~labkit.classify.rules.WITHOUT`): the same for every
    instruction with this setup, so it runs once per process (KVM's count of it does not change: measured)."""
    return _run(assemble_guest("nop", setup, mode), WITHOUT, "ring 3", backend, timeout)[0]


def differs(a: RingRun, b: RingRun) -> bool:
    """Whether two answered runs differ in any register, the stack or ``scratch``."""
    return a.regs != b.regs or a.pushed != b.pushed or a.scratch != b.scratch


@lru_cache(maxsize=4)
def ring3_tables(backend: str) -> RingTables:
    """Does ring 3 on ``backend`` look descriptors up in the guest's GDT?  Measured once per backend and process.

    Ring 3 runs ``lar`` of its own code selector (``USER_CS64``); the answer is compared with the access
    rights the guest's GDT holds there (Intel SDM Vol. 2A, LAR: the descriptor's second doubleword
    masked with 0x00F0FF00), ignoring the accessed bit, which the CPU may set.
    """
    from labkit.x86.gdt import build_gdt

    selector = layout.USER_CS64
    guest = assemble_guest("lar eax, ecx", f"mov ecx, {selector:#x}", 64)
    ring3, _ = _run(guest, "ring 3", "ring 3", backend, TIMEOUT_S)
    descriptor = struct.unpack_from("<I", build_gdt(), (selector & ~7) + 4)[0]
    expected = descriptor & 0x00F0FF00
    rax, rflags = ring3.reg("rax"), ring3.reg("rflags")
    if ring3.outcome is not Outcome.COMPLETED or rax is None or rflags is None:
        return RingTables(backend, True, f"the probe did not complete ({ring3.describe()}): nothing seen")
    found = rflags & RFLAGS_ZF != 0
    seen = f"{rax:#x}" if found else "no descriptor (ZF = 0)"
    if found and (rax ^ expected) & ~ACCESSED_BIT == 0:
        return RingTables(backend, True, f"in ring 3, lar of the guest's own code selector {selector:#x} gives "
                                         f"{seen}, the access rights of the guest's descriptor")
    return RingTables(backend, False, f"in ring 3, lar of the guest's own code selector {selector:#x} gives {seen}, "
                                      f"but the guest's GDT holds {expected:#x} there: ring 3 looks descriptors "
                                      "up in another table (the host's)")


ACCESSED_BIT = 0x100
"""Bit 8 of LAR's result: the descriptor's accessed bit (type bit 0), set by the CPU when it loads the segment."""


def _flavour(backend: str, origin: Origin | None) -> str | None:
    """The KVM flavour the runs had: from where they ran (``RunResult.origin``); this host's, for results
    that do not say."""
    if backend != "kvm":
        return None
    if origin is not None:
        return origin.flavour
    from labkit.kvm.system import kvm_flavour

    flavour = kvm_flavour()
    return None if flavour == "unknown" else flavour


def _run(guest: tuple[bytes, int, int, int], run: str, entry: str, backend: str,
         timeout: float) -> tuple[RingRun, Origin | None]:
    """One run of the classifier's guest from ``entry``'s entry point, reported as ``run``: what it showed,
    and where it ran."""
    from labkit.guest import Guest
    from labkit.vmm.machine import Machine  # lazy: `import labkit.classify` stays light

    code, target, start, after = guest
    address = layout.LOAD_ADDRESS + RUNS.index(entry) * ENTRY_STRIDE
    image = Guest.from_bytes(code, mode=64, name=f"classify ({run})", entry=address)
    with Machine(image, backend=backend) as machine:
        result = machine.run(timeout=timeout)
        ring_run = _ring_run(machine, result, run, target, start, after, timeout)
        if result.kvm_stats is not None:  # KVM's counters since the machine was made: this run's
            ring_run = replace(ring_run, emulated=result.kvm_stats["insn_emulation"])
        return ring_run, result.origin


def _ring_run(machine: Machine, result: RunResult, run: str, target: int, start: int, after: int,
              timeout: float) -> RingRun:
    """What one run showed: its outcome and the evidence (registers, stack, scratch memory, the fault)."""
    status = result.status
    umip_note = _umip_state(machine) if run == "ring 3 umip" else ""
    regs = tuple((name, getattr(result.regs, name)) for name in GPR_NAMES) + \
        (("rflags", result.regs.rflags & ~RFLAGS_RF),)
    kind = status.kind
    if kind == StatusKind.FAULT and status.fault is not None:
        fault = status.fault
        where = fault.rip
        if fault.vector == Vector.UD and where == after:
            rsp = result.regs.rsp
            pushed = machine.read_memory(rsp, RUN_RSP - rsp) if RUN_RSP - PUSHED_MAX <= rsp < RUN_RSP else b""
            return RingRun(run, Outcome.COMPLETED, str(status), regs=regs, pushed=pushed,
                           scratch=machine.read_memory(SCRATCH, SCRATCH_SIZE), note=umip_note)
        if start <= where < after:
            return RingRun(run, Outcome.TRAPPED, str(status), fault.vector, fault.error_code, where, regs,
                           note=umip_note)
        if where == after or (fault.vector not in ERROR_CODE_VECTORS and start < where <= after):
            stack, cs = _handler_frame(machine, fault.vector)
            return RingRun(run, Outcome.ENTERED, str(status), fault.vector, fault.error_code, where, regs,
                           scratch=machine.read_memory(SCRATCH, SCRATCH_SIZE),
                           handler_stack=stack, pushed_cs=cs)
        part = "the setup" if target <= where < start else \
            "the classifier's ring-0 prologue" if where < target else "code after the instruction"
        return RingRun(run, Outcome.NOT_RUN, str(status), fault.vector, fault.error_code, where, regs,
                       note=f"{status} in {part}", in_prologue=where < target)
    if kind in (StatusKind.HALTED, StatusKind.EXITED):
        return RingRun(run, Outcome.COMPLETED, str(status), regs=regs,
                       scratch=machine.read_memory(SCRATCH, SCRATCH_SIZE),
                       note="hlt ended the run" if kind == StatusKind.HALTED else f"the run ended: {status}")
    if kind == StatusKind.SHUTDOWN:
        return RingRun(run, Outcome.TRAPPED, str(status), rip=result.regs.rip, regs=regs,
                       note="triple fault: the exception could not be delivered")
    if kind == StatusKind.TIMEOUT:
        return RingRun(run, Outcome.NOT_RUN, str(status), regs=regs,
                       note=f"did not reach the ud2 after it within {timeout:g} s (a loop or a hang?)")
    emulation_failed = ExitReason.INTERNAL_ERROR.name in result.trace.by_reason()
    return RingRun(run, Outcome.NOT_RUN, str(status), regs=regs, note=str(status),
                   emulation_failed=emulation_failed)


def _umip_state(machine: Machine) -> str:
    """What the umip run's prologue found: CPUID's UMIP bit, and whether CR4.UMIP stuck."""
    cpuid_ecx = struct.unpack("<I", machine.read_memory(UMIP_CPUID, 4))[0]
    try:
        cr4 = machine.sregs().cr4
    except LabkitError:
        return ""
    return (f"CPUID.7:ECX.UMIP = {cpuid_ecx >> 2 & 1}, "
            f"CR4.UMIP = {1 if cr4 & CR4_UMIP else 0} after the guest set it")


def _handler_frame(machine: Machine, vector: int) -> tuple[int | None, int | None]:
    """Where the default stub's frame lies and the CS the CPU pushed into it."""
    rsp = machine.regs().rsp  # the stub pushed RAX below the CPU's frame
    index = 2 if vector in ERROR_CODE_VECTORS else 1
    try:
        raw = machine.read_memory(rsp, 8 * (index + 2))
    except LabkitError:
        return None, None
    return rsp + 8, struct.unpack_from("<Q", raw, 8 * (index + 1))[0]
