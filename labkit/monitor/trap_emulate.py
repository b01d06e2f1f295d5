"""Trap-and-emulate: an unmodified guest kernel runs deprivileged in ring 3 under a monitor.

The kernel believes it is in ring 0.  Every privileged instruction it executes
in ring 3 faults (#GP; #UD for ``int n`` under PVM), the fault reaches
:meth:`TrapAndEmulate.on_trap` through labkit's trap forwarding
(:mod:`labkit.vmm.forwarding`), and the monitor carries the instruction
out on the kernel's :class:`~labkit.monitor.vcpu.VirtualCpu`
(:func:`~labkit.monitor.vcpu.emulate`).  The kernel's own exceptions (its
``ud2``, its page faults, its ``int n``) are reflected into its *virtual*
IDT (:func:`~labkit.monitor.vcpu.reflect`).  A privileged instruction the
monitor does not emulate stops the run with status ``error``
"unemulated instruction at RIP 0x...: <instruction>", never a loop.

Why x86 broke this (Popek and Goldberg, 1974): some sensitive instructions
(:data:`labkit.x86.instructions.SENSITIVE`) do not trap in ring 3.  ``pushf``
shows the real IF (1), not the virtual one; ``popf`` silently keeps IF as it
is; ``sgdt``/``sidt``/``smsw`` show the monitor's GDT, IDT and CR0.  The
monitor never sees them, so the kernel observes the difference:
:func:`run_deprivileged` next to a native run of the same binary shows it
line by line (:func:`compare_consoles`).

Memory: by default the monitor does not virtualize it.  A ``mov cr3`` only
sets the virtual CPU's CR3, and the kernel keeps running on labkit's identity
map whatever it loads (the shipped minikernel reloads the CR3 it found, so its
console does not show this).  ``TrapAndEmulate(shadow=ShadowPaging())`` makes
the kernel's CR3 and page tables virtual with shadow page tables
(:mod:`labkit.monitor.shadow`): run it with :func:`run_deprivileged`, which
lets the monitor take over before the kernel's first instruction.

Backends: the monitor runs the same on the emulator and on KVM.  Measured
on this project's PVM host (``kvm_pvm``): ring-3 ``cli``, ``hlt``, ``mov crN``,
``lgdt``, ``in``/``out`` and ``iretq`` to ring 0 raise #GP as on VT-x/AMD-V,
and ring-3 ``int n`` raises #UD (PVM's instruction emulator cannot do it),
which the monitor decodes and reflects all the same: the kernel's console is
identical on both backends.  Each trap is a round trip through the host: on
KVM, :attr:`TrapEmulateReport.kvm` counts the VM exits KVM handled itself
during the run (its binary stats), next to the exits that reached labkit.  A KVM host that turned ring-3 port I/O into a
triple fault instead of a #GP would hide it from the monitor; the run then
ends with status ``shutdown`` and :func:`run_deprivileged` says why in the
report's ``explanation``.

``minikernel(...)`` is the shipped kernel (``guests/minikernel64.S``) with a
chosen set of its routines (:data:`ROUTINES`), and optionally the student's
own assembly as one more routine.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field, replace
from html import escape
from typing import TYPE_CHECKING, Any, Iterable

from labkit.errors import ConfigError, LabkitError
from labkit.monitor.vcpu import (PF_USER, Decoded, VirtualCpu, VirtualTripleFault, after_emulation, decode, emulate,
                                 has_error_code, reflect, traps_when_deprivileged)
from labkit.monitor.shadow import KernelMemory, ShadowPaging, ShadowReport
from labkit.vmm.forwarding import GuestContext, Trap
from labkit.vmm.status import RunResult, Status, StatusKind, exception_name
from labkit.x86 import layout
from labkit.x86.arch import Vector
from labkit.x86.disasm import MAX_INSTRUCTION

if TYPE_CHECKING:
    from labkit.guest import Guest
    from labkit.vmm.machine import Machine

MAX_EVENTS = 4096
TIMER_PORT = layout.MONITOR_TIMER_PORT
"""The virtual timer's port (labkit's own: the PC's PIT is a real device at 0x40): a write arms it, the monitor then holds one pending interrupt."""
TIMER_VECTOR = 0x20


@dataclass(frozen=True)
class TrapEvent:
    """One trap the monitor handled: what it was, where, and what the monitor did (``emulated``,
    ``reflected``, ``delivered`` for a virtual interrupt, ``stopped``)."""

    vector: int
    rip: int
    action: str
    text: str
    monitor_ns: int


@dataclass
class TrapEmulateReport:
    """What :meth:`TrapAndEmulate.summary` returns with the run (``RunResult.monitor``); it pickles."""

    traps: dict[int, int]
    """Traps that reached the monitor, by vector."""
    emulated: dict[str, int]
    """Emulated instructions by mnemonic."""
    reflected: dict[int, int]
    """Exceptions and interrupts reflected into the guest's virtual IDT, by vector."""
    delivered: dict[int, int]
    """Virtual interrupts delivered (a subset of ``reflected``), by vector."""
    vcpu: VirtualCpu
    """The virtual CPU at the end of the run."""
    events: list[TrapEvent]
    events_dropped: int
    monitor_ns: int
    """Host time spent inside the monitor's ``on_trap`` (decoding, emulating), in total."""
    stopped: str = ""
    """Why the monitor ended the run, if it did."""
    explanation: str = ""
    """What the backend made of the run where it cannot trap everything (filled by :func:`run_deprivileged`)."""
    kvm: KvmCounts | None = None
    """What KVM counted during the run (filled by :func:`run_deprivileged` on KVM; None on the emulator)."""
    shadow: ShadowReport | None = None
    """What shadow paging counted (hidden and true page faults, page-table writes), if the monitor used it."""

    @property
    def trap_count(self) -> int:
        return sum(self.traps.values())

    def monitor_us_per_trap(self) -> float:
        return self.monitor_ns / 1e3 / self.trap_count if self.trap_count else 0.0


@dataclass(frozen=True)
class KvmCounts:
    """What KVM counted during one run, from the vCPU's binary stats (``KVM_GET_STATS_FD``, labkit.kvm.stats).

    ``exits`` is every VM exit (the stat ``exits``), ``userspace`` the ones that
    came back to labkit (its exit trace), ``emulated`` the instructions KVM's
    instruction emulator ran (``insn_emulation``: under PVM, all ring-0 code).
    """

    exits: int
    userspace: int
    emulated: int

    @property
    def in_kernel(self) -> int:
        """Exits KVM handled without returning to labkit."""
        return max(self.exits - self.userspace, 0)


def kvm_counts(result: RunResult) -> KvmCounts | None:
    """What KVM counted for ``result``'s run (its machine's counters since it was made); None off KVM."""
    stats = result.kvm_stats
    if stats is None:
        return None
    return KvmCounts(stats["exits"], len(result.trace.records), stats["insn_emulation"])


class VirtualTimer:
    """A one-shot timer only the monitor has: a write to its port makes vector ``vector`` pending."""

    def __init__(self, vcpu: VirtualCpu, vector: int = TIMER_VECTOR):
        self.vcpu = vcpu
        self.vector = vector
        self.armed = 0

    def write(self, port: int, size: int, value: int) -> None:
        self.armed += 1
        if self.vector not in self.vcpu.pending:
            self.vcpu.pending.append(self.vector)

    def read(self, port: int, size: int) -> int:
        return int(self.vector in self.vcpu.pending)


class TrapAndEmulate:
    """The monitor: emulates the deprivileged kernel's privileged instructions, reflects its own faults.

    ``timer=True`` gives the kernel a virtual timer at :data:`TIMER_PORT`
    (see :class:`VirtualTimer`), delivered as vector :data:`TIMER_VECTOR`
    when the virtual IF allows: right after an emulated ``sti``, ``iretq``,
    ``popfq`` or ``hlt``, never after a ``popf`` the monitor did not see.
    """

    def __init__(self, *, timer: bool = False, max_events: int = MAX_EVENTS, shadow: ShadowPaging | None = None):
        self.vcpu = VirtualCpu()
        self.shadow = shadow
        """Shadow page tables, if the kernel's paging is virtualized (see :mod:`labkit.monitor.shadow`)."""
        if timer:
            self.vcpu.ports[TIMER_PORT] = VirtualTimer(self.vcpu)
        self.traps: dict[int, int] = {}
        self.delivered: dict[int, int] = {}
        self.events: list[TrapEvent] = []
        self.events_dropped = 0
        self.max_events = max_events
        self.monitor_ns = 0
        self.stopped = ""

    # -- the Monitor protocol ----------------------------------------------------------------

    def on_trap(self, trap: Trap, context: GuestContext) -> None:
        started = time.perf_counter_ns()
        rip = trap.regs.rip
        self.traps[trap.vector] = self.traps.get(trap.vector, 0) + 1
        try:
            if self.shadow is not None:
                action, text = self._handle_shadowed(self.shadow, trap, context)
            else:
                action, text = self._handle(trap, context)
        except VirtualTripleFault as fault:
            action, text = "stopped", f"virtual triple fault: {fault}"
            self._stop(context, Status(StatusKind.SHUTDOWN, message=text))
        except LabkitError as error:  # a memory operand or stack outside guest RAM
            action, text = "stopped", f"at RIP {rip:#x}: {error}"
            self._stop(context, Status(StatusKind.ERROR, message=text))
        spent = time.perf_counter_ns() - started
        self.monitor_ns += spent
        if len(self.events) < self.max_events:
            self.events.append(TrapEvent(trap.vector, rip, action, text, spent))
        else:
            self.events_dropped += 1

    def summary(self) -> TrapEmulateReport:
        return TrapEmulateReport(dict(self.traps), dict(self.vcpu.emulated), dict(self.vcpu.reflected),
                                 dict(self.delivered), self.vcpu.snapshot(), list(self.events),
                                 self.events_dropped, self.monitor_ns, self.stopped,
                                 shadow=self.shadow.summary() if self.shadow is not None else None)

    def _handle_shadowed(self, shadow: ShadowPaging, trap: Trap, context: GuestContext) -> tuple[str, str]:
        """:meth:`_handle` with shadow paging: its page faults first, the kernel's virtual addresses, then resume."""
        if not shadow.started and shadow.start(trap, context, self.vcpu):
            action, text = "started", "shadow paging set up at the kernel's first instruction"
        elif trap.vector == Vector.PF and (absorbed := shadow.page_fault(trap, context, self.vcpu)) is not None:
            action, text = absorbed
        else:
            action, text = self._handle(trap, shadow.view(context, self.vcpu))
        if not self.stopped:
            shadow.resume(trap, context)
        return action, text

    # -- handling ------------------------------------------------------------------------------

    def _handle(self, trap: Trap, context: GuestContext) -> tuple[str, str]:
        vcpu, vector = self.vcpu, trap.vector
        if vector not in (Vector.UD, Vector.GP):
            # The kernel's own exception (#PF, #DE, ...) or a software interrupt through a DPL-3
            # gate (int3, int 4: RIP is already past it): the kernel's virtual IDT handles it.
            error_code = trap.error_code if has_error_code(vector) else None
            if vector == Vector.PF and error_code is not None:
                error_code &= ~PF_USER  # the kernel believes it ran in ring 0
            reflect(vcpu, trap, context, vector, error_code)
            return "reflected", exception_name(vector)
        rip = trap.regs.rip
        code = self._code(context, rip)
        decoded = decode(code, rip)
        text = emulate(vcpu, trap, context, code) if decoded is not None else None
        if decoded is not None and text is not None:
            if self.shadow is not None:
                self.shadow.emulated(decoded, trap, context, self.vcpu)
            return self._after_emulation(trap, context, decoded.mnemonic, text)
        if decoded is not None and traps_when_deprivileged(decoded):
            message = f"unemulated instruction at RIP {rip:#x}: {decoded.text}"
            self._stop(context, Status(StatusKind.ERROR, message=message))
            return "stopped", message
        # An ordinary instruction that faults natively too (ud2, a bad address): the kernel's problem.
        reflect(vcpu, trap, context, vector, trap.error_code if vector == Vector.GP else None)
        return "reflected", f"{exception_name(vector)}: {decoded.text if decoded else 'undecodable'}"

    def _after_emulation(self, trap: Trap, context: GuestContext, mnemonic: str, text: str) -> tuple[str, str]:
        vector, halt = after_emulation(self.vcpu, trap, context, mnemonic)
        if vector is not None:
            self.delivered[vector] = self.delivered.get(vector, 0) + 1
            if len(self.events) < self.max_events:
                self.events.append(TrapEvent(vector, trap.regs.rip, "delivered", f"virtual interrupt {vector:#x}", 0))
        if halt is not None:
            self._stop(context, Status(StatusKind.HALTED, message=halt))
        return "emulated", text

    def _stop(self, context: GuestContext, status: Status) -> None:
        self.stopped = status.message
        context.stop(status)

    def _code(self, context: GuestContext, rip: int) -> bytes:
        """The (up to 15) bytes of the instruction at ``rip``: fewer where guest memory (or its mapping) ends."""
        if isinstance(context, KernelMemory):
            return context.read_at_most(rip, MAX_INSTRUCTION)
        return context.memory.read_at_most(rip, MAX_INSTRUCTION)


# -- running a kernel natively and deprivileged ---------------------------------------------------

PORT_IO_SHUTDOWN = (
    "KVM ({flavour}) turned the kernel's ring-3 '{instruction}' at RIP {rip:#x} into a triple fault "
    "instead of a #GP, so the monitor never saw it and could not emulate it; the run ended with status "
    "shutdown after {traps} trap(s). Where ring-3 port I/O raises #GP (VT-x, AMD-V, the emulator, and "
    "PVM as measured on labkit's development host) this monitor emulates it."
)


def run_deprivileged(guest: Guest | str, backend: str = "auto", timeout: float = 10.0, *,
                     monitor: TrapAndEmulate | None = None, **machine_options: Any) -> RunResult:
    """Run ``guest`` (a kernel written for ring 0) unmodified in ring 3 under ``monitor``; a ``RunResult``.

    The same code, started with ``iretq`` into ring 3 (``user=True``).  A KVM
    shutdown at a port access is explained in ``result.monitor.explanation``.
    """
    from labkit.guest import Guest
    from labkit.vmm.machine import Machine

    if isinstance(guest, str):
        guest = Guest.named(guest)
    if guest.mode != 64:
        raise ConfigError(f"trap-and-emulate runs 64-bit kernels; {guest.name!r} starts in {guest.mode}-bit mode")
    monitor = TrapAndEmulate() if monitor is None else monitor
    if monitor.shadow is not None:
        guest = monitor.shadow.boot_guest(guest)
    with Machine(replace(guest, user=True), backend=backend, monitor=monitor, **machine_options) as machine:
        result = machine.run(timeout)
        counts = kvm_counts(result)
        explanation = ""
        if result.status.kind == StatusKind.SHUTDOWN and result.backend == "kvm":
            explanation = _explain_shutdown(machine, result)
    if isinstance(result.monitor, TrapEmulateReport):
        result = replace(result, monitor=replace(result.monitor, explanation=explanation, kvm=counts))
    return result


def run_native(guest: Guest | str, backend: str = "auto", timeout: float = 10.0) -> tuple[RunResult, KvmCounts | None]:
    """Run ``guest`` as written (its kernel in ring 0, no monitor), with what KVM counted (None on the emulator)."""
    from labkit.vmm.machine import Machine

    with Machine(guest, backend=backend) as machine:
        result = machine.run(timeout)
        return result, kvm_counts(result)


def _explain_shutdown(machine: Machine, result: RunResult) -> str:
    from labkit.kvm.system import kvm_flavour
    from labkit.x86.disasm import instruction_text

    flavour = result.origin.flavour if result.origin is not None else kvm_flavour()  # where it ran
    rip = result.regs.rip
    try:
        instruction = instruction_text(machine.read_memory(rip, MAX_INSTRUCTION), rip, 64)
    except LabkitError:
        instruction = "?"
    traps = result.monitor.trap_count if isinstance(result.monitor, TrapEmulateReport) else 0
    if instruction.split(" ")[0] in ("in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd"):
        return PORT_IO_SHUTDOWN.format(flavour=flavour, instruction=instruction, rip=rip, traps=traps)
    return f"the guest shut down (triple fault) at RIP {rip:#x} ({instruction}) under KVM ({flavour})"


# -- the shipped kernel ---------------------------------------------------------------------------

ROUTINES = ("cli_pushf", "popf", "sgdt", "sidt", "smsw", "fault", "page_fault", "control_registers",
            "int", "timer", "student")
"""The minikernel's routines, in the order it runs them; bit ``i`` of its routine mask selects ``ROUTINES[i]``."""
DEFAULT_ROUTINES = ("cli_pushf", "popf", "sgdt", "sidt", "smsw", "fault", "page_fault", "control_registers")
"""What the kernel runs unless told otherwise: the routines that run natively on every backend
(``int`` is left out: PVM cannot emulate a ring-0 ``int n``; ``timer`` needs the monitor's timer)."""
ROUTINE_MASK_OFFSET = 16
"""Offset of the 64-bit routine mask in ``minikernel64.bin``, after the 8-byte magic at 8."""
ROUTINE_MAGIC = b"ROUTINES"
STUDENT_MARKER = "# student routine goes here"


def routine_mask(routines: Iterable[str]) -> int:
    mask = 0
    for name in routines:
        if name not in ROUTINES:
            raise ConfigError(f"the minikernel has no routine {name!r}; it has: {', '.join(ROUTINES)}")
        mask |= 1 << ROUTINES.index(name)
    return mask


def minikernel(routines: Iterable[str] = DEFAULT_ROUTINES, *, student: str | None = None) -> Guest:
    """The shipped ``minikernel64`` running ``routines`` (a :class:`labkit.Guest`).

    ``student`` is Intel-syntax assembly run as the ``student`` routine (added
    to ``routines``): the kernel prints RAX after it.  It needs GNU binutils;
    without ``student`` the prebuilt binary is patched, no assembler needed.
    """
    from labkit.assembler import splice
    from labkit.guest import Guest, guests_dir

    routines = tuple(routines)
    if student is not None:
        routines += ("student",) if "student" not in routines else ()
        source_path = guests_dir() / "minikernel64.S"
        source = source_path.read_text()
        if STUDENT_MARKER not in source:
            raise ConfigError(f"{source_path} has no line {STUDENT_MARKER!r}")
        start = source.index(STUDENT_MARKER)
        spliced, insertion = splice(source, start, start + len(STUDENT_MARKER), student, "your routine")
        base = Guest.from_asm(spliced, mode=64, name="minikernel64+student",
                              description="minikernel64 with the student's routine", insertion=insertion)
    else:
        base = Guest.named("minikernel64")
    code = bytearray(base.code)
    if code[8:16] != ROUTINE_MAGIC:
        raise ConfigError("minikernel64.bin does not carry its routine mask at offset 16; rebuild the guests")
    struct.pack_into("<Q", code, ROUTINE_MASK_OFFSET, routine_mask(routines))
    return replace(base, code=bytes(code))


# -- comparing consoles --------------------------------------------------------------------------

@dataclass(frozen=True)
class ConsoleComparison:
    """Two consoles line by line; ``divergent`` holds ``(line number, left, right)`` where they differ."""

    left_title: str
    right_title: str
    rows: tuple[tuple[str, str], ...]
    divergent: tuple[tuple[int, str, str], ...] = field(default=())

    @property
    def identical(self) -> bool:
        return not self.divergent

    def __str__(self) -> str:
        width = max([len(self.left_title)] + [len(left) for left, _ in self.rows])
        lines = [f"  {self.left_title:<{width}} | {self.right_title}"]
        for left, right in self.rows:
            mark = "≠" if left != right else " "
            lines.append(f"{mark} {left:<{width}} | {right}")
        return "\n".join(lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython's text/plain
        printer.text(str(self))

    def _repr_html_(self) -> str:
        cells = []
        for left, right in self.rows:
            style = ' style="background:#ffe0b2;font-weight:bold"' if left != right else ""
            cells.append(f"<tr{style}><td>{'≠' if style else ''}</td><td><code>{escape(left)}</code></td>"
                         f"<td><code>{escape(right)}</code></td></tr>")
        return (f"<table><thead><tr><th></th><th>{escape(self.left_title)}</th><th>{escape(self.right_title)}</th>"
                f"</tr></thead><tbody>{''.join(cells)}</tbody></table>"
                f"<p>{len(self.divergent)} of {len(self.rows)} lines differ (highlighted).</p>")


def compare_consoles(left: str, right: str, left_title: str = "native (ring 0)",
                     right_title: str = "trap-and-emulate (ring 3)") -> ConsoleComparison:
    """Line ``i`` of ``left`` next to line ``i`` of ``right``; a missing line shows as empty."""
    a, b = left.splitlines(), right.splitlines()
    rows = tuple((a[i] if i < len(a) else "", b[i] if i < len(b) else "") for i in range(max(len(a), len(b))))
    divergent = tuple((i + 1, l, r) for i, (l, r) in enumerate(rows) if l != r)
    return ConsoleComparison(left_title, right_title, rows, divergent)


# -- what a trap costs ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TrapCosts:
    """Host time per trap of a deprivileged run next to the native run's port exits (medians, µs).

    ``trap_us`` is one round trip: guest running since the last exit, the fault,
    labkit's forwarding stub (ring-0 code: emulated by KVM under PVM), the exit to
    the host, the monitor, and the way back.  ``monitor_us`` is the monitor's own
    share (decoding with Capstone, emulating).  On the emulator all of it is
    emulator time, not hardware time.
    """

    backend: str
    traps: int
    trap_us: float
    monitor_us: float
    native_exit_us: float
    native_s: float
    deprivileged_s: float

    @property
    def slowdown(self) -> float:
        """Run time deprivileged over run time native."""
        return self.deprivileged_s / self.native_s if self.native_s else float("nan")


def trap_costs(native: RunResult, deprivileged: RunResult) -> TrapCosts:
    """Measure from two ``RunResult``s of the same kernel: native and under :class:`TrapAndEmulate`."""
    from statistics import median

    from labkit.x86 import layout

    report = deprivileged.monitor
    if not isinstance(report, TrapEmulateReport):
        raise ConfigError("trap_costs needs a run under TrapAndEmulate as its second argument")
    traps = [r.host_ns for r in deprivileged.trace if r.reason == "IO" and r.address == layout.TRAP_PORT]
    exits = [r.host_ns for r in native.trace if r.reason == "IO"]
    monitor = [event.monitor_ns for event in report.events if event.action != "delivered"]
    return TrapCosts(deprivileged.backend, report.trap_count, median(traps) / 1e3 if traps else float("nan"),
                     median(monitor) / 1e3 if monitor else float("nan"),
                     median(exits) / 1e3 if exits else float("nan"), native.elapsed_s, deprivileged.elapsed_s)
