"""Classify an x86 instruction by running it in ring 0 and in ring 3: privileged, sensitive or innocuous.

Popek and Goldberg (1974): a machine can be virtualized by trap-and-emulate
when every *sensitive* instruction (one that reads or changes privileged state,
or behaves differently by privilege level) is *privileged* (traps when run
outside the most privileged mode).  Robin and Irvine (USENIX Security 2000)
listed the x86 instructions that are sensitive but do not trap in ring 3
(:data:`ROBIN_IRVINE`: one experiment per name in their list, MOV counted once).
:func:`classify` decides by experiment, never from a table::

    >>> classify("popfq", setup="pushfq\\n xor qword ptr [rsp], 0x200").verdict
    'sensitive'

How one classification runs.  The instruction is assembled into a small guest
(``_TEMPLATE``) whose 64-bit ring-0 prologue enters the code with ``iretq``,
so every run starts from the same registers (all GPRs 0, RSP = ``RUN_RSP``,
RFLAGS = IF|0x2, DS = ES = FS = GS = USER_DS) and differs only in the ring and
in the privileged state::

    run             entered with              privileged state
    ring 0          CS = KERNEL_CS (DPL 0)    labkit's boot state (GDT, IDT, TR, CR0)
    ring 3          CS = USER_CS (DPL 3)      the same
    ring 3 altered  CS = USER_CS, IF = 0      another GDT (GDTR base/limit), an IDT copy
                                              elsewhere, an LDT loaded, another TR, CR0.TS set
    ring 0 altered  CS = KERNEL_CS, IF = 0    the same other state
    ring 3 umip     CS = USER_CS (DPL 3)      labkit's, with CR4.UMIP (bit 11) set
                                              (only with ``umip=True``)

The altered runs happen only when ring 3 did not trap.  Each run executes
``setup`` (optional), the instruction, and ``ud2``: labkit's default #UD stub reports the registers at the ``ud2``, so "#UD at the ud2" means "the
instruction completed without trapping".  ``mode=32`` runs setup and
instruction as 32-bit code in compatibility mode (CS = KERNEL_CS32 or
USER_CS32 under the same 64-bit kernel, as a 64-bit OS runs a 32-bit program),
which is where IA-32-only forms such as ``push cs`` or ``call far`` exist.

Names the setup may use: ``scratch`` (64 bytes of zeroed RAM, read back after
each run), ``after`` (the address of the final ``ud2``: a far transfer's
target), ``RUN_RSP`` and the selectors ``KERNEL_CS64``, ``KERNEL_CS32``,
``KERNEL_DS``, ``USER_CS32``, ``USER_CS64``, ``USER_DS``.

Outcome of one run (:class:`RingRun`.outcome):

- ``completed``: reached the ``ud2`` (or, in ring 0, ended with ``hlt`` or a
  port write that ends the run);
- ``trapped``: an exception at the instruction (or a shutdown, should a host
  turn the fault into a triple fault);
- ``entered``: the instruction itself vectored through the IDT (``int n``,
  ``int3``): the default stub for that vector reported it with RIP after it;
- ``not run``: the backend could not run it (KVM's emulator under PVM fails
  on some ring-0 instructions: ``int n``, ``lar``), it timed out, or the setup
  or prologue faulted.

Verdict (:class:`Classification`.verdict), from the outcomes:

- ``privileged``: traps in ring 3 and not in ring 0 (or ring 0 could not run);
- ``faults in both rings``: the same exception in ring 0 and ring 3 (not a
  question of privilege: an invalid instruction or operand);
- ``sensitive``: does not trap in ring 3, but ring 0 and ring 3 differ (GPRs,
  RFLAGS without RF, bytes pushed, ``scratch``, or one of them traps) under
  either privileged state, or ring 3's result changes with the privileged state
  (IF, which the altered run sets on purpose, is left out of that comparison);
- ``innocuous``: no trap and no difference;
- ``undetermined``: ring 3 did not run to an answer, or only ring 3 ran and
  showed nothing (the note says why).

RFLAGS.RF (bit 16) is ignored in comparisons: KVM sets it in the frame of
every fault, Unicorn does not.  A run is one :class:`labkit.Machine`: about
5 ms on KVM, 50 ms on the emulator (a forked worker).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache

from labkit.errors import ConfigError, LabkitError
from labkit.x86 import layout
from labkit.x86.boot import RFLAGS_IF, RFLAGS_RF
from labkit.x86.gdt import TSS_AVAILABLE, LDT, build_gdt, encode_system_descriptor64, tss_segment
from labkit.x86.idt import ERROR_CODE_VECTORS
from labkit.x86.state import GPR_NAMES, Segment

PRIVILEGED = "privileged"
SENSITIVE = "sensitive"
INNOCUOUS = "innocuous"
BOTH_FAULT = "faults in both rings"
UNDETERMINED = "undetermined"
VERDICTS = (PRIVILEGED, SENSITIVE, INNOCUOUS, BOTH_FAULT, UNDETERMINED)

RUNS = ("ring 0", "ring 3", "ring 3 altered", "ring 0 altered", "ring 3 umip")
"""The runs, in the order of the guest's entry points (``ENTRY_STRIDE`` bytes apart)."""
RUN_RSP = 0x7F000
SCRATCH = 0x20000
SCRATCH_SIZE = 64
ALT_LDT = 0x20100
ALT_IDT = 0x21000
UMIP_CPUID = 0x20200
"""The umip run's prologue stores CPUID.(EAX=7,ECX=0):ECX here (bit 2: UMIP)."""
CR4_UMIP = 1 << 11
ALT_LDT_SELECTOR = 0x50
ALT_TSS_SELECTOR = 0x60
ALT_GDT_LIMIT = 0x6F
PUSHED_MAX = 64
ENTRY_STRIDE = 8
TIMEOUT_S = 2.0

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
ring0:
    mov eax, {ring0_cs}
    mov ebx, KERNEL_DS
    jmp enter
ring3:
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
    or eax, 8                       # CR0.TS
    mov cr0, rax
    mov eax, r12d
    mov ebx, r13d
    mov edx, 0x2                    # RFLAGS with IF = 0
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
    mov edx, 0x202                  # RFLAGS with IF = 1
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
.code{bits}
target:
{setup}
instruction:
{instruction}
after:
    ud2
"""


@lru_cache(maxsize=1)
def _alt_gdt() -> bytes:
    """labkit's GDT plus an LDT descriptor (ALT_LDT_SELECTOR) and an available TSS descriptor (ALT_TSS_SELECTOR)."""
    ldt = Segment(base=ALT_LDT, limit=0xF, selector=ALT_LDT_SELECTOR, type=LDT, present=1, dpl=0, s=0)
    tss = tss_segment()
    tss = Segment(base=tss.base, limit=tss.limit, selector=ALT_TSS_SELECTOR, type=TSS_AVAILABLE,
                  present=1, dpl=0, s=0)
    table = build_gdt() + encode_system_descriptor64(ldt) + encode_system_descriptor64(tss)
    if len(table) != ALT_GDT_LIMIT + 1:
        raise LabkitError(f"the altered GDT is {len(table)} bytes, expected {ALT_GDT_LIMIT + 1}")
    return table


def guest_source(instruction: str, setup: str = "", mode: int = 64) -> str:
    """The classifier guest's source for ``instruction`` (see the module docstring)."""
    ring0_cs, ring3_cs = ((layout.KERNEL_CS64, layout.USER_CS64) if mode == 64
                          else (layout.KERNEL_CS32, layout.USER_CS32))
    return _TEMPLATE.format(
        kernel_cs64=layout.KERNEL_CS64, kernel_cs32=layout.KERNEL_CS32, kernel_ds=layout.KERNEL_DS,
        user_cs32=layout.USER_CS32, user_cs64=layout.USER_CS64, user_ds=layout.USER_DS,
        run_rsp=RUN_RSP, scratch=SCRATCH, ring0_cs=ring0_cs, ring3_cs=ring3_cs,
        alt_ldt_selector=ALT_LDT_SELECTOR, alt_tss_selector=ALT_TSS_SELECTOR,
        idt=layout.IDT_ADDRESS, alt_idt=ALT_IDT, umip_cpuid=UMIP_CPUID,
        alt_gdt_limit=ALT_GDT_LIMIT, alt_gdt_bytes=", ".join(f"{b:#x}" for b in _alt_gdt()),
        bits=mode, setup=_indent(setup), instruction=_indent(instruction),
    )


def _indent(text: str) -> str:
    return "\n".join("    " + line.strip() for line in text.strip().splitlines())


@lru_cache(maxsize=256)
def _assemble(instruction: str, setup: str, mode: int) -> tuple[bytes, int, int, int]:
    """The guest's code and the addresses of target (setup), instruction and after (the ud2)."""
    from labkit.assembler import assemble
    from labkit.errors import AssemblyError

    try:
        code = assemble(guest_source(instruction, setup, mode), 64)
    except AssemblyError as error:
        raise AssemblyError(f"cannot assemble {instruction!r} for {mode}-bit code"
                            f"{' with its setup' if setup.strip() else ''}: {error}") from None
    target, start, after = struct.unpack_from("<3Q", code, len(RUNS) * ENTRY_STRIDE)
    if start == after:
        raise ConfigError(f"{instruction!r} assembles to no instruction at all")
    return code, target, start, after


@dataclass(frozen=True)
class RingRun:
    """One run of the instruction: in which ring and privileged state, and what happened."""

    run: str
    """One of :data:`RUNS`: ``"ring 0"``, ``"ring 3"``, ``"ring 3 altered"`` (other privileged state), ..."""
    outcome: str
    """``completed``, ``trapped``, ``entered`` or ``not run`` (see the module docstring)."""
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

    def reg(self, name: str) -> int | None:
        return dict(self.regs).get(name)

    def describe(self) -> str:
        """One line: ``#GP(0x0) at the instruction`` or ``completed: rax=0x1b``."""
        from labkit.vmm.status import exception_name

        if self.outcome == "trapped":
            if self.vector is None:
                return f"trapped: {self.status}"
            code = f"({self.error_code:#x})" if self.error_code is not None else ""
            return f"trapped: {exception_name(self.vector).split(' ')[0]}{code}"
        if self.outcome == "entered":
            return f"entered the handler for vector {self.vector:#x}"
        if self.outcome == "not run":
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
    verdict: str
    reason: str
    runs: tuple[RingRun, ...]
    differences: tuple[str, ...] = ()
    """``"rax: 0x0 (ring 0) vs 0x2b (ring 3)"``, one per differing register or memory area."""
    notes: tuple[str, ...] = ()
    umip: str = ""
    """With ``umip=True``: what setting CR4.UMIP did (or why it could not be set)."""

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


def classify(instruction: str, *, backend: str = "auto", mode: int = 64, setup: str = "",
             umip: bool = False, timeout: float = TIMEOUT_S) -> Classification:
    """Run ``instruction`` (GNU as, Intel syntax) in ring 0 and ring 3 on ``backend`` and classify it.

    ``setup`` is assembly run first in the same ring (say, loading a selector
    into ECX).  ``mode`` 64 or 32 (compatibility mode).  ``umip=True`` adds a
    ring-3 run with CR4.UMIP set.  Raises :class:`labkit.AssemblyError` with
    the assembler's message when the text does not assemble; an instruction
    that hangs is stopped after ``timeout`` seconds and reported as such.
    """
    from labkit.backend import choose_backend

    if not isinstance(instruction, str) or not instruction.strip():
        raise ConfigError(f"give the instruction as assembly text, such as 'sgdt [scratch]', not {instruction!r}")
    if not isinstance(setup, str):
        raise ConfigError(f"setup must be assembly text, not {type(setup).__name__}")
    if mode not in (32, 64):
        raise ConfigError(f"mode must be 64 (long mode) or 32 (compatibility mode), not {mode!r}")
    instruction, setup = instruction.strip(), setup.strip()
    choice = choose_backend(backend)
    code, target, start, after = _assemble(instruction, setup, mode)
    flavour = _flavour(choice.name)

    names = ["ring 3", "ring 0"]
    runs = {name: _run(code, name, choice.name, target, start, after, timeout) for name in names}
    if runs["ring 3"].outcome in ("completed", "entered"):
        for name in ("ring 3 altered", "ring 0 altered"):
            runs[name] = _run(code, name, choice.name, target, start, after, timeout)
    umip_text = ""
    if umip:
        runs["ring 3 umip"] = _run(code, "ring 3 umip", choice.name, target, start, after, timeout)
        umip_text = _umip_effect(runs["ring 3 umip"], runs["ring 3"])
    verdict, reason, differences, notes = _decide(runs, choice.name, flavour)
    ordered = tuple(runs[name] for name in RUNS if name in runs)
    return Classification(instruction, setup, mode, choice.name, flavour, verdict, reason, ordered,
                          tuple(differences), tuple(notes), umip_text)


def _flavour(backend: str) -> str | None:
    if backend != "kvm":
        return None
    from labkit.kvm.system import kvm_flavour

    flavour = kvm_flavour()
    return None if flavour == "unknown" else flavour


def _run(code: bytes, run: str, backend: str, target: int, start: int, after: int, timeout: float) -> RingRun:
    from labkit.guest import Guest
    from labkit.vmm.machine import Machine

    entry = layout.LOAD_ADDRESS + RUNS.index(run) * ENTRY_STRIDE
    guest = Guest.from_bytes(code, mode=64, name=f"classify ({run})", entry=entry)
    with Machine(guest, backend=backend) as machine:
        result = machine.run(timeout=timeout)
        status = result.status
        umip_note = _umip_state(machine) if run == "ring 3 umip" else ""
        regs = tuple((name, getattr(result.regs, name)) for name in GPR_NAMES) + \
            (("rflags", result.regs.rflags & ~RFLAGS_RF),)
        kind = status.kind
        if kind == "fault" and status.fault is not None:
            fault = status.fault
            where = fault.rip
            if fault.vector == 6 and where == after:
                rsp = result.regs.rsp
                pushed = machine.read_memory(rsp, RUN_RSP - rsp) if RUN_RSP - PUSHED_MAX <= rsp < RUN_RSP else b""
                return RingRun(run, "completed", str(status), regs=regs, pushed=pushed,
                               scratch=machine.read_memory(SCRATCH, SCRATCH_SIZE), note=umip_note)
            if start <= where < after:
                return RingRun(run, "trapped", str(status), fault.vector, fault.error_code, where, regs,
                               note=umip_note)
            if where == after or (fault.vector not in ERROR_CODE_VECTORS and start < where <= after):
                stack, cs = _handler_frame(machine, fault.vector)
                return RingRun(run, "entered", str(status), fault.vector, fault.error_code, where, regs,
                               scratch=machine.read_memory(SCRATCH, SCRATCH_SIZE),
                               handler_stack=stack, pushed_cs=cs)
            part = "the setup" if target <= where < start else \
                "the classifier's ring-0 prologue" if where < target else "code after the instruction"
            return RingRun(run, "not run", str(status), fault.vector, fault.error_code, where, regs,
                           note=f"{status} in {part}")
        if kind in ("halted", "exited"):
            return RingRun(run, "completed", str(status), regs=regs,
                           scratch=machine.read_memory(SCRATCH, SCRATCH_SIZE),
                           note="hlt ended the run" if kind == "halted" else f"the run ended: {status}")
        if kind == "shutdown":
            return RingRun(run, "trapped", str(status), rip=result.regs.rip, regs=regs,
                           note="triple fault: the exception could not be delivered")
        if kind == "timeout":
            return RingRun(run, "not run", str(status), regs=regs,
                           note=f"did not reach the ud2 after it within {timeout:g} s (a loop or a hang?)")
        return RingRun(run, "not run", str(status), regs=regs, note=str(status))


def _umip_state(machine) -> str:
    """What the umip run's prologue found: CPUID's UMIP bit, and whether CR4.UMIP stuck."""
    cpuid_ecx = struct.unpack("<I", machine.read_memory(UMIP_CPUID, 4))[0]
    try:
        cr4 = machine.sregs().cr4
    except LabkitError:
        return ""
    return (f"CPUID.7:ECX.UMIP = {cpuid_ecx >> 2 & 1}, "
            f"CR4.UMIP = {1 if cr4 & CR4_UMIP else 0} after the guest set it")


def _handler_frame(machine, vector: int) -> tuple[int | None, int | None]:
    """Where the default stub's frame lies and the CS the CPU pushed into it."""
    rsp = machine.regs().rsp  # the stub pushed RAX below the CPU's frame
    index = 2 if vector in ERROR_CODE_VECTORS else 1
    try:
        raw = machine.read_memory(rsp, 8 * (index + 2))
    except LabkitError:
        return None, None
    return rsp + 8, struct.unpack_from("<Q", raw, 8 * (index + 1))[0]


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
    if a.outcome == "entered":
        if a.pushed_cs is not None and b.pushed_cs is not None and (a.pushed_cs & 3) != (b.pushed_cs & 3):
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


def _decide(runs: dict[str, RingRun], backend: str, flavour: str | None):
    ring0, ring3 = runs["ring 0"], runs["ring 3"]
    notes: list[str] = []
    if flavour == "kvm_pvm":
        if any(run.outcome == "not run" and "KVM_EXIT_INTERNAL_ERROR" in run.status for run in runs.values()):
            notes.append("under PVM, ring-0 code is run by KVM's instruction emulator, which cannot run this "
                         "instruction here; with VT-x or AMD-V the CPU runs it")
        if ring3.outcome == "trapped" and ring3.vector == 6:
            notes.append("under PVM a ring-3 `int n` (other than int3 and int 4) raises #UD; "
                         "VT-x, AMD-V and the emulator raise #GP for a gate with DPL 0")
        if ring3.outcome == "trapped" and ring3.vector is None:
            notes.append("under PVM this ring-3 instruction ended in a triple fault (a shutdown) rather than "
                         "an exception delivered to the guest; VT-x, AMD-V and the emulator deliver it")
    if ring3.outcome == "not run":
        return UNDETERMINED, f"ring 3 gave no answer: {ring3.note or ring3.status}", [], notes
    if ring3.outcome == "trapped":
        what = ring3.describe().removeprefix("trapped: ")
        if ring0.outcome == "trapped" and ring0.vector == ring3.vector:
            return BOTH_FAULT, f"{what} in ring 0 as well: not a matter of privilege", [], notes
        if ring0.outcome == "not run":
            notes.append(f"ring 0 reference: {ring0.note or ring0.status}")
            return PRIVILEGED, f"traps in ring 3 ({what})", [], notes
        return PRIVILEGED, f"traps in ring 3 ({what}); in ring 0 it {ring0.describe()}", [], notes

    by_ring: list[str] = []
    for left, right in (("ring 0", "ring 3"), ("ring 0 altered", "ring 3 altered")):
        a, b = runs.get(left), runs.get(right)
        if a is not None and b is not None and "not run" not in (a.outcome, b.outcome):
            by_ring += _compare(a, b)
    altered = runs.get("ring 3 altered")
    by_state = _compare(ring3, altered, ignore_flags=RFLAGS_IF) \
        if altered is not None and altered.outcome != "not run" else []
    for run in runs.values():
        if run.outcome == "not run" and run is not ring3:
            notes.append(f"{run.run} run: {run.note or run.status}")
    differences = by_ring + by_state
    if by_ring:
        trapped = [run for run in runs.values() if run.outcome == "trapped" and run.run.startswith("ring 0")]
        if trapped:
            reason = f"no trap in ring 3, but in ring 0 it {trapped[0].describe()}: the outcome depends on the ring"
        else:
            reason = "no trap in ring 3, yet the result differs between ring 0 and ring 3"
        return SENSITIVE, reason, differences, notes
    if by_state:
        return SENSITIVE, "no trap in ring 3, and its result there changes with the privileged state", \
            differences, notes
    if ring0.outcome == "not run":
        return UNDETERMINED, "does not trap in ring 3 (unprivileged), and ring 3 saw no privileged state; " \
            "whether it behaves differently in ring 0 is unknown: ring 0 could not run", differences, notes
    return INNOCUOUS, "no trap, and the same result in ring 0 and ring 3 and under other privileged state", \
        differences, notes


def _umip_effect(umip: RingRun, ring3: RingRun) -> str:
    state = f" ({umip.note})" if umip.note and umip.outcome != "not run" else ""
    if umip.outcome == "not run" and "prologue" in umip.note:
        return f"this backend does not let the guest set CR4.UMIP: {umip.status}"
    if umip.outcome == "trapped":
        return f"with CR4.UMIP = 1 it traps in ring 3: {umip.describe().removeprefix('trapped: ')}{state}"
    if umip.outcome == ring3.outcome:
        return f"CR4.UMIP = 1 changes nothing: not modelled{state}"
    return f"with CR4.UMIP = 1: {umip.describe()}{state}"


# --- Robin & Irvine's list --------------------------------------------------------------------------

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


PAPER_VERDICT = SENSITIVE
"""Robin & Irvine (2000), section 4.3: every instruction on their list is sensitive and unprivileged (it
does not trap in user mode).  The only typed-in verdict here: the reference the measured ones are compared with."""

ROBIN_IRVINE = (
    Experiment("SGDT", "sgdt [scratch]", umip=True, why="stores GDTR; the altered run moves the GDT"),
    Experiment("SIDT", "sidt [scratch]", umip=True, why="stores IDTR; the altered run moves the IDT"),
    Experiment("SLDT", "sldt eax", umip=True, why="stores LDTR; the altered run loads an LDT"),
    Experiment("SMSW", "smsw eax", umip=True, why="stores CR0[15:0]; the altered run sets CR0.TS"),
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
            for exp in ROBIN_IRVINE]
