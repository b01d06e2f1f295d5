"""Exercises with automatic feedback: run the student's answer on a real backend and compare.

Each notebook from 00 to 09 ends with tasks that make the student write or
change guest code or monitor code.  Each ``check_*`` function here runs the
answer on ``backend`` (``"auto"``: the session's backend; ``LABKIT_BACKEND``
can force one) and returns a :class:`Verdict`: whether it passed, what was
expected, what the guest did, and what ran it.  A check never judges by the
answer's text, only by what the guest did, so every correct answer passes, and
it asks only for what both backends agree on (the rings kernel's system calls
under PVM arrive as #UD, labkit's ``int 0x80`` turned into a system call by the
kernel: a check counts them as the system calls they are), so the verdict is
the same on KVM and on the emulator (tests/classroom/test_exercises.py runs
the reference answers and wrong ones on both).

An nbgrader test cell calls ``check_...(answer).require()``: it raises
:class:`labkit.errors.ExerciseFailed` (an ``AssertionError``) with the
verdict's message when the answer fails, so the cell gets no points.

=========  =====================================  ==================================
notebook   check                                   the student writes
=========  =====================================  ==================================
00         :func:`check_print_ok`                  a guest that prints ``OK``
00         :func:`check_five_exits`                a guest that makes exactly five IO exits, silently
01         :func:`check_write_without_fault`       ring-3 code that prints through the kernel
01         :func:`check_page_fault`                ring-3 code the kernel sees one chosen #PF from
02         :func:`check_wbinvd_monitor`            a monitor subclass that emulates ``wbinvd``
02         :func:`check_sensitive_routine`         a kernel routine that tells ring 0 from ring 3
03         :func:`check_translation_set`           the instructions binary translation must replace
03         :func:`check_self_modifying`            a kernel routine that changes code it already ran
04         :func:`check_one_notification`          virtqueue buffer sizes: one notification per write
04         :func:`check_paravirtual_port`          a kernel fragment ported to hypercalls
05         :func:`check_output_exits_only`         a VMCS under which only the console's ``out``s exit
05         :func:`check_cr3_loads_only`            a VMCS under which only the CR3 loads exit
06         :func:`check_page_walk`                 the monitor's walk of the kernel's page tables
06         :func:`check_shadow_leaf`               the shadow page-table entry the monitor writes
07         :func:`check_bounded_fifo`              a device model that bounds the guest's FIFO index
07         :func:`check_secret_scanner`            a guest that finds a secret in its own RAM only
08         :func:`check_dirty_pages`               a guest whose diff snapshot holds exactly three pages
08         :func:`check_changed_pages`             a VMM's page comparison that builds a diff snapshot
09         :func:`check_cluster_lookup`            the qcow2 lookup from a guest offset to the delta file's
09         :func:`check_damaged_files`             the check a restore runs: which files are damaged
=========  =====================================  ==================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Collection

from labkit.errors import ExerciseFailed, LabkitError
from labkit.vmm.status import RunResult, StatusKind
from labkit.x86.arch import Vector

if TYPE_CHECKING:
    from labkit.guest import Guest
    from labkit.monitor.trap_emulate import TrapAndEmulate
    from labkit.monitor.vmx import Vmcs
    from labkit.monitor.vmx.model import VmxReport
    from labkit.vmm.status import Origin

TIMEOUT = 5.0
"""Seconds each run of an answer may take: a guest that never stops is stopped and the verdict says so."""
LONG_TIMEOUT = 30.0
"""For the runs that take a second or two on an idle host (pagingkernel64 under shadow paging, a scan of every
byte of RAM on the emulator), so that a loaded host does not turn a right answer into a timeout."""


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check: ``passed``, what was ``expected``, what the guest did (``observed``), and where."""

    exercise: str
    passed: bool
    expected: str
    observed: str
    where: str
    """What ran the answer: ``KVM (kvm_pvm)`` or ``the emulator (Unicorn 2.1.4)``."""

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        head = "passed" if self.passed else "not yet"
        return (f"{self.exercise}: {head} (run on {self.where})\n  expected: {self.expected}\n"
                f"  the guest: {self.observed}")

    def _repr_markdown_(self) -> str:
        mark = "✅ **passed**" if self.passed else "❌ **not yet**"
        return (f"{mark}: {self.exercise} (run on {self.where})\n\n* expected: {self.expected}\n"
                f"* the guest: {self.observed}")

    def require(self) -> None:
        """Nothing when it passed; else raises :class:`ExerciseFailed` with its message (for nbgrader's test cells)."""
        if not self.passed:
            raise ExerciseFailed(str(self))


def _where(origin: Origin | None, backend: str) -> str:
    if origin is None:
        return backend
    if origin.backend == "kvm":
        return f"KVM ({origin.flavour})"
    if origin.backend == "emu":
        return f"the emulator (Unicorn {origin.unicorn})"
    return origin.backend


def _backend_name(backend: str) -> str:
    from labkit.backend import choose_backend

    return choose_backend(backend).name if backend == "auto" else backend


def _refused(exercise: str, expected: str, error: LabkitError, backend: str) -> Verdict:
    """A verdict for an answer labkit could not even run (it does not assemble, a bad parameter)."""
    first = str(error).strip().splitlines()
    where = {"kvm": "KVM", "emu": "the emulator"}.get(backend, backend)
    return Verdict(exercise, False, expected, f"could not run: {type(error).__name__}: {' / '.join(first[:3])}",
                   where)


def _status(result: RunResult) -> str:
    return f"{result.status.kind.value}" + (f" ({result.status.message})" if result.status.message else "")


def _run(guest: Guest, backend: str, timeout: float = TIMEOUT) -> RunResult:
    from labkit.vmm.machine import Machine

    with Machine(guest, backend=backend) as machine:
        return machine.run(timeout=timeout)


# -- 00 welcome: a guest of your own ----------------------------------------------------------------

OK_TEXT = "OK\n"


def check_print_ok(source: str, backend: str = "auto") -> Verdict:
    """Notebook 00: a 64-bit ring-0 guest (Intel-syntax assembly) that prints ``OK`` and a newline on COM1, then halts."""
    from labkit.guest import Guest

    exercise, expected = "print OK", f"console {OK_TEXT!r}, then the guest halts"
    backend = _backend_name(backend)
    try:
        result = _run(Guest.from_asm(source, mode=64, name="your guest"), backend)
    except LabkitError as error:
        return _refused(exercise, expected, error, backend)
    halted = result.status.kind == StatusKind.HALTED
    problems = []
    if result.console != OK_TEXT:
        problems.append(f"printed {result.console!r}")
    if not halted:
        problems.append(f"ended {_status(result)}")
    observed = "; ".join(problems) or f"printed {result.console!r} and halted"
    return Verdict(exercise, not problems, expected, observed, _where(result.origin, backend))


FIVE = 5


def check_five_exits(source: str, backend: str = "auto") -> Verdict:
    """Notebook 00: a guest that makes exactly five port-I/O exits, prints nothing, and halts."""
    from labkit.guest import Guest

    exercise, expected = "five silent exits", f"exactly {FIVE} IO exits, an empty console, then the guest halts"
    backend = _backend_name(backend)
    try:
        result = _run(Guest.from_asm(source, mode=64, name="your guest"), backend)
    except LabkitError as error:
        return _refused(exercise, expected, error, backend)
    exits = result.exits
    io = exits.get("IO", 0)
    problems = []
    if io != FIVE:
        problems.append(f"made {io} IO exit(s)")
    others = {reason: count for reason, count in exits.items() if reason not in ("IO", "HLT")}
    if others:
        problems.append("other exits: " + ", ".join(f"{reason} x {count}" for reason, count in sorted(others.items())))
    if result.console:
        problems.append(f"printed {result.console!r}")
    if result.status.kind != StatusKind.HALTED:
        problems.append(f"ended {_status(result)}")
    observed = "; ".join(problems) or f"made {io} IO exits, printed nothing and halted"
    return Verdict(exercise, not problems, expected, observed, _where(result.origin, backend))


# -- 01 protection rings: ring 3 asks the kernel ----------------------------------------------------

MESSAGE = "hello from ring 3\n"
"""rings64's ``message``..``message_end``."""
INT80 = b"\xcd\x80"


def _ring3_faults(result: RunResult, guest: Guest) -> list[str]:
    """The ring-3 faults the kernel reported, less PVM's #UD at an ``int 0x80`` (the kernel's system call)."""
    from labkit.rings import ring_events

    faults = []
    for event in ring_events(result):
        if event.kind != "entry" or event.from_cpl != 3 or event.vector == 0x80:
            continue
        offset = event.rip - guest.load_address
        if event.vector == Vector.UD and guest.code[offset:offset + 2] == INT80:
            continue  # PVM: int 0x80 from ring 3 raises #UD and the kernel completes it as the system call
        faults.append(event.label)
    return faults


def _run_task(experiments: str, backend: str) -> tuple[RunResult, Guest]:
    from labkit.rings import rings_guest, rings_machine

    guest = rings_guest(experiments)
    with rings_machine(guest, backend) as machine:
        return machine.run(timeout=TIMEOUT), guest


def check_write_without_fault(experiments: str, backend: str = "auto") -> Verdict:
    """Notebook 01: ring-3 task code (rings64's experiments) that prints ``message`` with no fault from ring 3."""
    exercise = "write from ring 3"
    expected = f"console {MESSAGE!r}, no fault from ring 3, the task's exit(0)"
    backend = _backend_name(backend)
    try:
        result, guest = _run_task(experiments, backend)
    except LabkitError as error:
        return _refused(exercise, expected, error, backend)
    problems = []
    faults = _ring3_faults(result, guest)
    if faults:
        problems.append("the kernel saw " + ", ".join(faults))
    if result.console != MESSAGE:
        problems.append(f"printed {result.console!r}")
    if result.status.kind != StatusKind.EXITED or result.status.code != 0:
        problems.append(f"ended {_status(result)}")
    observed = "; ".join(problems) or f"printed {result.console!r} with no fault and exited with 0"
    return Verdict(exercise, not problems, expected, observed, _where(result.origin, backend))


WANTED_PF = 0x6
"""A write from ring 3 to a page that is not there: P=0, W/R=1, U/S=1 (Intel SDM vol. 3, 4.7)."""


def check_page_fault(experiments: str, backend: str = "auto") -> Verdict:
    """Notebook 01: ring-3 task code after which the kernel saw exactly one fault: a #PF with error code 0x6."""
    from labkit.rings import decode_page_fault_error

    exercise = "one chosen page fault"
    expected = (f"exactly one fault from ring 3, a #PF with error code {WANTED_PF:#x} "
                f"({decode_page_fault_error(WANTED_PF)}), then the task's exit(0)")
    backend = _backend_name(backend)
    try:
        result, guest = _run_task(experiments, backend)
    except LabkitError as error:
        return _refused(exercise, expected, error, backend)
    from labkit.rings import ring_events

    faults = _ring3_faults(result, guest)
    page_faults = [event for event in ring_events(result)
                   if event.kind == "entry" and event.vector == Vector.PF and event.from_cpl == 3]
    problems = []
    if len(faults) != 1 or len(page_faults) != 1 or page_faults[0].error_code != WANTED_PF:
        decoded = {event.label: f"{event.label} ({decode_page_fault_error(event.error_code)})" for event in page_faults}
        seen = [decoded.get(label, label) for label in faults]
        problems.append("the kernel saw " + (", ".join(seen) if seen else "no fault from ring 3"))
    if result.status.kind != StatusKind.EXITED or result.status.code != 0:
        problems.append(f"ended {_status(result)}")
    observed = "; ".join(problems) or f"the kernel saw {faults[0]} and the task exited with 0"
    return Verdict(exercise, not problems, expected, observed, _where(result.origin, backend))


# -- 02 trap-and-emulate: the monitor, and what it cannot see ------------------------------------------

WBINVD_ROUTINE = "wbinvd\nmov rax, 0x600d"
"""The kernel routine of :func:`check_wbinvd_monitor`: ``wbinvd`` traps in ring 3 and the stock monitor stops there."""


def check_wbinvd_monitor(monitor_class: type[TrapAndEmulate], backend: str = "auto") -> Verdict:
    """Notebook 02: a :class:`~labkit.monitor.trap_emulate.TrapAndEmulate` subclass under which the kernel's
    ``wbinvd`` routine prints what it prints natively."""
    from labkit.monitor.trap_emulate import TrapAndEmulate, minikernel, run_deprivileged, run_native

    exercise = "emulate wbinvd"
    expected = "the kernel's console under your monitor equals its native console, and it halts"
    backend = _backend_name(backend)
    if not (isinstance(monitor_class, type) and issubclass(monitor_class, TrapAndEmulate)):
        return Verdict(exercise, False, expected, f"the answer is {monitor_class!r}, not a subclass of TrapAndEmulate",
                       backend)
    try:
        kernel = minikernel([], student=WBINVD_ROUTINE)
        native, _ = run_native(kernel, backend, timeout=TIMEOUT)
        monitored = run_deprivileged(kernel, backend, timeout=TIMEOUT, monitor=monitor_class())
    except LabkitError as error:
        return _refused(exercise, expected, error, backend)
    problems = []
    difference = _first_difference(native.console, monitored.console)
    if difference:
        problems.append(difference)
    if monitored.status.kind != StatusKind.HALTED:
        problems.append(f"the run ended {_status(monitored)}")
    observed = "; ".join(problems) or "printed the native console line for line and halted"
    return Verdict(exercise, not problems, expected, observed, _where(monitored.origin, backend))


def _first_difference(native: str, monitored: str) -> str:
    """'' when equal; else the first line that differs, both ways (or which console is shorter)."""
    if native == monitored:
        return ""
    left, right = native.splitlines(), monitored.splitlines()
    for number, (a, b) in enumerate(zip(left, right), start=1):
        if a != b:
            return f"line {number} is {b.strip()!r} under the monitor, {a.strip()!r} natively"
    if len(right) < len(left):
        return f"the console stops after line {len(right)}; natively line {len(right) + 1} is {left[len(right)].strip()!r}"
    return f"line {len(left) + 1} is {right[len(left)].strip()!r} under the monitor; natively the console ends before it"


def _rax_line(console: str) -> str | None:
    """The ``rax = ...`` line the minikernel prints after the student routine."""
    lines = console.splitlines()
    if "student routine" not in lines:
        return None
    after = lines[lines.index("student routine") + 1:]
    return after[0].strip() if after and after[0].strip().startswith("rax =") else None


def check_sensitive_routine(routine: str, backend: str = "auto") -> Verdict:
    """Notebook 02: a kernel routine (assembly, its result in RAX) that leaves a different RAX natively and under
    the monitor, the same in two native runs, with no instruction the monitor cannot emulate."""
    from labkit.monitor.trap_emulate import minikernel, run_deprivileged, run_native

    exercise = "a sensitive instruction that does not trap"
    expected = ("RAX natively differs from RAX under trap-and-emulate, two native runs agree, and both runs halt")
    backend = _backend_name(backend)
    try:
        kernel = minikernel([], student=routine)
        first, _ = run_native(kernel, backend, timeout=TIMEOUT)
        second, _ = run_native(kernel, backend, timeout=TIMEOUT)
        monitored = run_deprivileged(kernel, backend, timeout=TIMEOUT)
    except LabkitError as error:
        return _refused(exercise, expected, error, backend)
    where = _where(monitored.origin, backend)
    native_rax, again, under = _rax_line(first.console), _rax_line(second.console), _rax_line(monitored.console)
    for name, run in (("natively", first), ("under the monitor", monitored)):
        if run.status.kind != StatusKind.HALTED:
            return Verdict(exercise, False, expected, f"the run {name} ended {_status(run)}", where)
    if native_rax is None or under is None:
        return Verdict(exercise, False, expected, "the kernel did not print RAX after your routine", where)
    if native_rax != again:
        return Verdict(exercise, False, expected, f"two native runs disagree ({native_rax} and {again}): "
                       "that is nondeterminism, not sensitivity", where)
    if native_rax == under:
        return Verdict(exercise, False, expected, f"{native_rax} both natively and under the monitor: the monitor "
                       "saw (or did not need to see) your instruction", where)
    return Verdict(exercise, True, expected, f"natively {native_rax}, under the monitor {under}", where)


# -- 03 binary translation: what must be replaced ------------------------------------------------------

TRANSLATION_ROUTINES = ("cli_pushf", "popf", "sgdt", "smsw")


def check_translation_set(translate: Collection[str], backend: str = "auto") -> Verdict:
    """Notebook 03: the smallest set of instructions binary translation must replace (from ``TRANSLATABLE``) so
    that the kernel's ``cli_pushf``, ``popf``, ``sgdt`` and ``smsw`` routines print their native lines.

    Every instruction that would trap anyway may be left out (the monitor emulates it when it faults);
    each sensitive one that does not trap must be in.  The answer passes when the console is native and
    leaving out any one of its instructions breaks it (it is minimal).
    """
    from labkit.monitor.binary_translation import TRANSLATABLE, run_translated
    from labkit.monitor.trap_emulate import minikernel, run_native

    exercise = "what binary translation must replace"
    expected = ("the native console with your set, and a different one with any one instruction of it left out")
    backend = _backend_name(backend)
    chosen = frozenset(translate) if not isinstance(translate, str) else frozenset({translate})
    unknown = sorted(chosen - frozenset(TRANSLATABLE))
    if unknown:
        return Verdict(exercise, False, expected, f"not translatable: {', '.join(unknown)} "
                       f"(choose from {', '.join(sorted(TRANSLATABLE))})", backend)
    try:
        kernel = minikernel(TRANSLATION_ROUTINES)
        native, _ = run_native(kernel, backend, timeout=TIMEOUT)
        translated = run_translated(kernel, backend=backend, translate=chosen, timeout=TIMEOUT)
        where = _where(translated.origin, backend)
        difference = _first_difference(native.console, translated.console)
        if translated.status.kind != StatusKind.HALTED:
            difference = "; ".join(filter(None, (difference, f"the run ended {_status(translated)}")))
        if difference:
            return Verdict(exercise, False, expected, f"with {{{', '.join(sorted(chosen))}}}: {difference}", where)
        for name in sorted(chosen):
            fewer = run_translated(kernel, backend=backend, translate=chosen - {name}, timeout=TIMEOUT)
            if fewer.console == native.console:
                return Verdict(exercise, False, expected, f"the console is native without {name!r} too: it traps "
                               "in ring 3 or the kernel never runs it, so it need not be translated", where)
    except LabkitError as error:
        return _refused(exercise, expected, error, backend)
    return Verdict(exercise, True, expected, f"native with {{{', '.join(sorted(chosen))}}}, and not without "
                   "any one of them", where)


# -- 04 paravirtualization: one notification per write -------------------------------------------------

WRITES_KIB = (4, 16, 64)
PAGE = 4096


def check_one_notification(buffers: Callable[[int], tuple[int, int]], backend: str = "auto") -> Verdict:
    """Notebook 04: ``buffers(kib) -> (buffer_bytes, batch)`` for ``ring_console64`` such that writing 4, 16 and
    64 KiB each costs exactly one virtqueue notification, every buffer within one 4 KiB page."""
    from labkit.virtio import measure_console

    exercise = "one notification per write"
    expected = (f"for {', '.join(map(str, WRITES_KIB))} KiB: the whole text on the console with one notification, "
                f"buffers of at most {PAGE} bytes")
    backend = _backend_name(backend)
    seen, where = [], backend
    for kib in WRITES_KIB:
        try:
            buffer_bytes, batch = buffers(kib)
            if buffer_bytes > PAGE:
                return Verdict(exercise, False, expected, f"for {kib} KiB: buffers of {buffer_bytes} bytes, "
                               f"more than a page ({PAGE})", where)
            measured = measure_console(kib, "ring", batch=batch, backend=backend, buffer_bytes=buffer_bytes,
                                       timeout=TIMEOUT)
        except LabkitError as error:
            return _refused(exercise, expected, error, where)
        except (TypeError, ValueError) as error:
            return Verdict(exercise, False, expected, f"buffers({kib}) did not give two whole numbers: {error}", where)
        where = _where(measured.origin, backend)
        seen.append(f"{kib} KiB: {measured.notifications} notification(s)")
        if not measured.console_ok:
            return Verdict(exercise, False, expected, f"for {kib} KiB the console is not the text ({measured.status})",
                           where)
        if measured.notifications != 1:
            return Verdict(exercise, False, expected, "; ".join(seen) + f" (buffer_bytes={buffer_bytes}, "
                           f"batch={batch})", where)
    return Verdict(exercise, True, expected, "; ".join(seen), where)


# -- 05 hardware-assisted: choose the VM exits -------------------------------------------------------------

UART_DATA_PORT = 0x3F8


def _vmx_answer(exercise: str, expected: str, vmcs: Vmcs, backend: str,
                wanted: int) -> tuple[RunResult, VmxReport, str, list[str]] | Verdict:
    """Run ``minikernel64`` under the VMX model with the student's ``vmcs``: the result, its
    :class:`~labkit.monitor.vmx.model.VmxReport`, where it ran and, as the first problem, the exits of
    any reason but ``wanted``; or the verdict when it could not run or gave no report."""
    from labkit.monitor.vmx.exits import ExitReason
    from labkit.monitor.vmx.model import VmxReport, run_vmx

    backend = _backend_name(backend)
    try:
        result = run_vmx("minikernel64", vmcs, backend, timeout=TIMEOUT)
    except LabkitError as error:
        return _refused(exercise, expected, error, backend)
    where = _where(result.origin, backend)
    report = result.monitor
    if not isinstance(report, VmxReport):
        return Verdict(exercise, False, expected, f"the run ended {_status(result)} with no VMX report", where)
    problems = []
    others = {ExitReason(reason).name: count for reason, count in report.exit_counts.items() if reason != wanted}
    if others:
        problems.append("also exits: " + ", ".join(f"{name} x {count}" for name, count in sorted(others.items())))
    return result, report, where, problems


def check_output_exits_only(vmcs: Vmcs, backend: str = "auto") -> Verdict:
    """Notebook 05: a VMCS under which ``minikernel64`` exits only for its ``out``s to the UART (port 0x3f8).

    Read from each exit's qualification (Intel SDM vol. 3C, 28.2.1, table 28-5): bit 3 is the direction
    (0 = ``out``), bits 31:16 the port.
    """
    from labkit.monitor.vmx.exits import ExitReason

    exercise = "only the console's out exits"
    expected = f"VM exits only for I/O instructions, each an out to port {UART_DATA_PORT:#x}, one per console byte"
    answered = _vmx_answer(exercise, expected, vmcs, backend, ExitReason.IO_INSTRUCTION)
    if isinstance(answered, Verdict):
        return answered
    result, report, where, problems = answered
    io = [exit_ for exit_ in report.exits if exit_.reason == ExitReason.IO_INSTRUCTION]
    not_out = [exit_ for exit_ in io if exit_.qualification & 0x8 or exit_.qualification >> 16 != UART_DATA_PORT]
    if not_out:
        problems.append(f"{len(not_out)} of its I/O exits are not an out to {UART_DATA_PORT:#x} (the first: "
                        f"{not_out[0].instruction!r}, port {not_out[0].qualification >> 16:#x})")
    console_bytes = len(result.console.encode())
    outs = len(io) - len(not_out)
    if outs != console_bytes:
        problems.append(f"{outs} out exits for {console_bytes} console bytes")
    if result.status.kind != StatusKind.HALTED:
        problems.append(f"the run ended {_status(result)}")
    observed = "; ".join(problems) or f"{outs} exits, each an out to {UART_DATA_PORT:#x}"
    return Verdict(exercise, not problems, expected, observed, where)


def check_cr3_loads_only(vmcs: Vmcs, backend: str = "auto") -> Verdict:
    """Notebook 05: a VMCS under which ``minikernel64`` exits at every load of CR3 and at nothing else.

    Read from each exit's qualification (Intel SDM vol. 3C, 28.2.1, table 28-3): bits 3:0 the control register,
    bits 5:4 the access type (0 = MOV to CR); a CR3 load that ran in non-root operation is in the report's
    ``non_root`` by its text (``mov cr3, rax``).
    """
    from labkit.monitor.vmx.exits import ExitReason

    exercise = "exit at CR3 loads only"
    expected = "a VM exit at every mov to CR3 and at nothing else"
    answered = _vmx_answer(exercise, expected, vmcs, backend, ExitReason.CONTROL_REGISTER_ACCESS)
    if isinstance(answered, Verdict):
        return answered
    result, report, where, problems = answered
    cr_exits = [exit_ for exit_ in report.exits if exit_.reason == ExitReason.CONTROL_REGISTER_ACCESS]
    not_loads = [exit_.instruction for exit_ in cr_exits if exit_.qualification & 0xF != 3 or exit_.qualification >> 4 & 3]
    if not_loads:
        problems.append(f"{len(not_loads)} control-register exit(s) that are not a CR3 load (the first: {not_loads[0]!r})")
    unseen = sum(count for text, count in report.non_root.items() if text.startswith("mov cr3"))
    if unseen:
        problems.append(f"{unseen} CR3 load(s) ran with no exit")
    loads = len(cr_exits) - len(not_loads)
    if not loads and not unseen:
        problems.append("no CR3 load at all")
    if result.status.kind != StatusKind.HALTED:
        problems.append(f"the run ended {_status(result)}")
    observed = "; ".join(problems) or f"{loads} exit(s), each a load of CR3"
    return Verdict(exercise, not problems, expected, observed, where)




# -- 03 binary translation: code that changes itself ------------------------------------------------

def check_self_modifying(routine: str, backend: str = "auto") -> Verdict:
    """Notebook 03: a kernel routine (assembly, its result in RAX) that changes code it has already run and runs
    it again: under binary translation RAX must be the native one, and the translator must have dropped at least
    one translation (``TranslationSummary.invalidated``) because the routine's store changed the code it came from.

    A routine that changes no code, or only code that has not run yet (nothing translated from it), passes
    natively and under translation alike but shows nothing about the translation cache: the check says so.
    """
    from labkit.monitor.binary_translation import TranslationSummary, run_translated
    from labkit.monitor.trap_emulate import minikernel, run_native

    exercise = "self-modifying code under binary translation"
    expected = ("RAX under binary translation equals native RAX, and the translator dropped at least one "
                "translation because your routine changed code that had run")
    backend = _backend_name(backend)
    try:
        kernel = minikernel([], student=routine)
        native, _ = run_native(kernel, backend, timeout=TIMEOUT)
        translated = run_translated(kernel, backend=backend, timeout=TIMEOUT)
    except LabkitError as error:
        return _refused(exercise, expected, error, backend)
    where = _where(translated.origin, backend)
    for name, run in (("natively", native), ("under binary translation", translated)):
        if run.status.kind != StatusKind.HALTED:
            return Verdict(exercise, False, expected, f"the run {name} ended {_status(run)}", where)
    native_rax, translated_rax = _rax_line(native.console), _rax_line(translated.console)
    if native_rax is None or translated_rax is None:
        return Verdict(exercise, False, expected, "the kernel did not print RAX after your routine", where)
    if native_rax != translated_rax:
        return Verdict(exercise, False, expected, f"natively {native_rax}, under binary translation "
                       f"{translated_rax}", where)
    summary = translated.monitor
    dropped = summary.invalidated if isinstance(summary, TranslationSummary) else 0
    if not dropped:
        return Verdict(exercise, False, expected, f"{native_rax} both ways, but the translator dropped no "
                       "translation: your routine changed no code that had already run (code changed before it "
                       "first runs is translated as changed)", where)
    return Verdict(exercise, True, expected, f"{native_rax} natively and under binary translation; {dropped} "
                   "translation(s) dropped when your routine changed its code", where)


# -- 04 paravirtualization: port a kernel fragment to hypercalls --------------------------------------

PV_TEXT = "pv ok\n"
PV_MOST_ENTRIES = 2
"""A paravirtual port of the fragment may enter the hypervisor at most this often (the line, the power-off)."""


def check_paravirtual_port(source: str, backend: str = "auto") -> Verdict:
    """Notebook 04: a paravirtual kernel (Intel-syntax assembly, started in ring 3 under
    :class:`~labkit.monitor.paravirt.Paravirtual`) that prints ``PV_TEXT`` and powers the VM off
    (``sched_op(shutdown, poweroff)``: status exited with code 0), with no privileged instruction and at most
    ``PV_MOST_ENTRIES`` entries into the hypervisor."""
    from labkit.guest import Guest
    from labkit.monitor.paravirt import run_paravirtual

    exercise = "a paravirtual port"
    expected = (f"console {PV_TEXT!r}, powered off (exited 0), no privileged-instruction trap, at most "
                f"{PV_MOST_ENTRIES} entries into the hypervisor")
    backend = _backend_name(backend)
    try:
        report = run_paravirtual(guest=Guest.from_asm(source, mode=64, name="your paravirtual kernel"),
                                 backend=backend, timeout=TIMEOUT)
    except LabkitError as error:
        return _refused(exercise, expected, error, backend)
    result = report.result
    problems = []
    if report.traps:
        problems.append(f"{report.traps} privileged instruction(s) trapped ({result.status.message})")
    if result.console != PV_TEXT:
        problems.append(f"printed {result.console!r}")
    if report.entries > PV_MOST_ENTRIES:
        calls = ", ".join(f"{name} x {count}" for name, count in sorted(report.hypercalls.items()))
        problems.append(f"{report.entries} entries into the hypervisor ({calls})")
    if report.errors:
        problems.append("refused: " + ", ".join(sorted(report.errors)))
    if not report.traps and (result.status.kind != StatusKind.EXITED or result.status.code != 0):
        problems.append(f"ended {_status(result)}, not powered off")
    observed = "; ".join(problems) or (f"printed {result.console!r} in {report.entries} hypervisor entries and "
                                       "powered off")
    return Verdict(exercise, not problems, expected, observed, _where(result.origin, backend))


# -- 06 memory virtualization: the monitor's walk and its shadow entries -------------------------------

PAGING_EDITS, PAGING_SEED = 30, 5
"""The ``pagingkernel64`` both checks of notebook 06 run: 30 random page-table edits from seed 5 (among them a
write to a page first mapped by a read, whose D bit the kernel then reads back)."""
PAGING_ROOTS = (0x100000, 0x105000)
"""pagingkernel64's two address spaces: the PML4s of processes A and B (guests/pagingkernel64.S)."""
WALK_ADDRESSES = ((0x0, 0x8123, 0x123456, 0x1FFFF8)
                  + tuple(0x40000000 + page * 0x1000 + 0x123 for page in range(0x40))
                  + (0x40200000, 0x80000000, 0x7F0000001000, 0xFFFF800000000000))
"""Where :func:`check_page_walk` compares walks: the kernel half (one 2 MiB page), the window with its
remapped, read-only, demand-paged and randomly edited pages, and addresses no table maps."""


def _paging_ram(backend: str) -> tuple[bytes, RunResult]:
    """pagingkernel64 (``PAGING_EDITS``, ``PAGING_SEED``) run natively to its end: its RAM and the run."""
    from labkit.monitor.shadow import paging_kernel
    from labkit.vmm.machine import Machine

    with Machine(paging_kernel(PAGING_EDITS, PAGING_SEED), backend=backend) as machine:
        result = machine.run(timeout=LONG_TIMEOUT)
        return machine.read_memory(0, machine.memory_size), result


def check_page_walk(walk: Callable[[Callable[[int], int], int, int], int | None],
                    backend: str = "auto") -> Verdict:
    """Notebook 06: ``walk(read_entry, cr3, address)``, the monitor's walk of the kernel's own page tables
    (Intel SDM vol. 3A, 4.5: four levels, 2 MiB and 1 GiB pages): the guest-physical address a read of
    ``address`` reaches, or None when the read faults.  ``read_entry(at)`` is the 8-byte entry at guest-physical
    ``at``.  Compared with :func:`labkit.monitor.shadow.walk_kernel` on pagingkernel64's tables as the kernel left
    them, under both of its CR3s, at every address of ``WALK_ADDRESSES``.
    """
    import struct

    from labkit.memory import GuestMemory
    from labkit.monitor.shadow import walk_kernel

    exercise = "walk the kernel's page tables"
    expected = (f"the address the kernel's tables give (or None) for {len(WALK_ADDRESSES)} addresses under each "
                f"of its CR3s {', '.join(f'{root:#x}' for root in PAGING_ROOTS)}")
    backend = _backend_name(backend)
    try:
        ram, result = _paging_ram(backend)
    except LabkitError as error:
        return _refused(exercise, expected, error, backend)
    where = _where(result.origin, backend)
    if result.status.kind != StatusKind.HALTED:
        return Verdict(exercise, False, expected, f"pagingkernel64 ended {_status(result)}", where)

    memory = GuestMemory([(0, memoryview(ram), True)])

    def read_entry(at: int) -> int:
        """The entry at guest-physical ``at``; GuestMemoryError (which the verdict reports) outside RAM."""
        return int(struct.unpack("<Q", memory.read(at, 8))[0])

    wrong, first = 0, ""
    for cr3 in PAGING_ROOTS:
        for address in WALK_ADDRESSES:
            truth = walk_kernel(read_entry, cr3, address)
            try:
                answer = walk(read_entry, cr3, address)
            except Exception as error:  # the student's code: any exception is an answer to report
                return Verdict(exercise, False, expected, f"walk(read_entry, {cr3:#x}, {address:#x}) raised "
                               f"{type(error).__name__}: {error}", where)
            if answer == truth.physical and (answer is None) == (truth.physical is None):
                continue
            wrong += 1
            if not first:
                last = truth.steps[-1]
                gave = "None" if answer is None else f"{answer:#x}" if isinstance(answer, int) else repr(answer)
                should = "None (the read faults)" if truth.physical is None else f"{truth.physical:#x}"
                first = (f"for {address:#x} under CR3 {cr3:#x} your walk gives {gave}, the kernel's tables "
                         f"{should} (its last step: {last.level} entry {last.entry:#x} at {last.address:#x})")
    total = len(PAGING_ROOTS) * len(WALK_ADDRESSES)
    if wrong:
        return Verdict(exercise, False, expected, f"{wrong} of {total} walks differ; {first}", where)
    return Verdict(exercise, True, expected, f"all {total} walks agree with the kernel's tables", where)


SHADOW_LEAF_HELP = "shadow_leaf(page, writable, dirty, page_table) -> the shadow PTE"


def _student_shadow(shadow_leaf: Callable[[int, bool, bool, bool], int]) -> Any:
    """A :class:`~labkit.monitor.shadow.ShadowPaging` whose leaf entries are ``shadow_leaf``'s."""
    from labkit.monitor.shadow import KernelWalk, ShadowPaging
    from labkit.x86.paging import ACCESSED, DIRTY, PRESENT, USER, WRITABLE

    class StudentShadow(ShadowPaging):
        """ShadowPaging with the leaf value the student computes (the rest of the fill as labkit's own)."""

        def _fill(self, walk: KernelWalk, write: bool) -> None:
            page, root = walk.address & ~(PAGE - 1), self.live_root
            if walk.page is None:
                raise AssertionError("filling a faulting walk")
            for step in walk.steps:
                self._track(step.table)
            dirty = bool((walk.steps[-1].entry | (DIRTY if write else 0)) & DIRTY)
            value = shadow_leaf(walk.page, walk.writable, dirty, walk.page in self.tables)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
                raise LabkitError(f"shadow_leaf({walk.page:#x}, ...) returned {value!r}, not a 64-bit entry")
            if value & (PRESENT | USER) != PRESENT | USER:
                # The kernel runs in ring 3: without P and U/S every access faults again, for ever.
                raise LabkitError(f"shadow_leaf({walk.page:#x}, ...) returned {value:#x}, without "
                                  f"{' and '.join(n for n, b in (('P', PRESENT), ('U/S', USER)) if not value & b)}: "
                                  "the kernel runs in ring 3, so it faults on that entry again and again")
            if write and walk.writable and walk.page not in self.tables and not value & WRITABLE:
                raise LabkitError(f"shadow_leaf({walk.page:#x}, writable=True, dirty=True, page_table=False) "
                                  f"returned {value:#x}, without R/W: the kernel's store, which its own tables "
                                  "allow, faults on that entry again and again")
            self._write_leaf(root, page, value | ACCESSED, None)
            self._by_physical.setdefault(walk.page, set()).add((root, page))
            for depth, step in enumerate(walk.steps):
                self._derived.setdefault(step.address, set()).add((root, page, depth))

    return StudentShadow()


def _kernel_pt_stores(console: str) -> int | None:
    marker = "page-table stores while paging: "
    if marker not in console:
        return None
    return int(console.split(marker)[1].split()[0], 16)


def check_shadow_leaf(shadow_leaf: Callable[[int, bool, bool, bool], int], backend: str = "auto") -> Verdict:
    """Notebook 06: ``shadow_leaf(page, writable, dirty, page_table)``, the shadow page-table entry the monitor
    writes for a kernel page: ``page`` the guest-physical page the kernel's tables map, ``writable`` whether they
    allow writes, ``dirty`` whether the kernel's leaf has D set (after this access), ``page_table`` whether the
    page holds one of the kernel's page tables.  The kernel runs in ring 3 under the monitor.

    Run with shadow paging that uses it, pagingkernel64 must print its native console and the monitor must have
    trapped every page-table store the kernel counted (Intel SDM vol. 3A, 4.8: D set on the first write).  An
    entry the kernel would fault on for ever (no P or U/S; no R/W for a store its tables allow) is refused when
    the monitor fills it, with the entry named.
    """
    from labkit.monitor.shadow import paging_kernel
    from labkit.monitor.trap_emulate import TrapAndEmulate, TrapEmulateReport, run_deprivileged, run_native

    exercise = "the shadow page-table entry"
    expected = ("pagingkernel64's native console under shadow paging with your entries, every page-table store "
                "trapped, and the run halts")
    backend = _backend_name(backend)
    if not callable(shadow_leaf):
        return Verdict(exercise, False, expected, f"the answer is {shadow_leaf!r}, not a function "
                       f"{SHADOW_LEAF_HELP}", backend)
    try:
        kernel = paging_kernel(PAGING_EDITS, PAGING_SEED)
        native, _ = run_native(kernel, backend, timeout=LONG_TIMEOUT)
        shadowed = run_deprivileged(kernel, backend, LONG_TIMEOUT, monitor=TrapAndEmulate(shadow=_student_shadow(
            shadow_leaf)))
    except LabkitError as error:
        return _refused(exercise, expected, error, backend)
    where = _where(shadowed.origin, backend)
    problems = []
    difference = _first_difference(native.console, shadowed.console)
    if difference:
        problems.append(difference)
    report = shadowed.monitor
    trapped = report.shadow.pt_writes if isinstance(report, TrapEmulateReport) and report.shadow else 0
    counted = _kernel_pt_stores(native.console)
    if counted is not None and trapped != counted:
        problems.append(f"the monitor trapped {trapped} page-table store(s), the kernel made {counted}")
    if shadowed.status.kind != StatusKind.HALTED:
        problems.append(f"the run ended {_status(shadowed)}")
    observed = "; ".join(problems) or (f"the native console line for line, {trapped} page-table stores trapped, "
                                       "and halted")
    return Verdict(exercise, not problems, expected, observed, where)


# -- 07 isolation: a device model that bounds the guest's index, a scanner that finds only its own ------

def _fifo_run(device_class: type, backend: str) -> tuple[RunResult, dict[str, Any]]:
    """venom64 (17 bytes into a 16-byte FIFO) against ``device_class`` in a worker process: the run and the
    device's state after it."""
    from labkit.vmm.devices import vulnerable
    from labkit.vmm.devices.spec import DeviceContext, DeviceSpec
    from labkit.vmm.machine import Machine
    from labkit.vmm.worker import in_worker

    def build(context: DeviceContext) -> Any:
        if not in_worker():  # as vulnerable.py's own factories: what the guest corrupts stays in the worker
            raise LabkitError("the exercise's FIFO device runs only in a machine's worker process")
        return device_class()

    spec = DeviceSpec("your FIFO device", "pio", vulnerable.BASE_PORT, vulnerable.PORTS, build)
    with Machine("venom64", backend=backend, isolate=True, devices=[spec]) as machine:
        result = machine.run(timeout=TIMEOUT)
        return result, machine.device_state(spec.name)


def check_bounded_fifo(device_class: type, backend: str = "auto") -> Verdict:
    """Notebook 07: a subclass of :class:`labkit.vmm.devices.vulnerable.FifoDevice` whose ``store(value)`` keeps
    the guest's data bytes inside the 16-byte FIFO.  venom64 writes 17 bytes and asks the device to execute its
    command: the device's state after it (every field of ``STATE_LAYOUT``), the handlers it called and what the
    guest read back must be those of the VENOM fix (a byte past the FIFO is dropped), and the run must end as the
    guest ends it (exit 0), not with an error in the device.
    """
    from labkit.vmm.devices import vulnerable

    exercise = "bound the FIFO index"
    expected = ("after venom64's 17 bytes: the first 16 in the FIFO, handler, result_len and owner untouched, "
                "only the checksum handler called, and the guest exits 0")
    backend = _backend_name(backend)
    if not (isinstance(device_class, type) and issubclass(device_class, vulnerable.FifoDevice)):
        return Verdict(exercise, False, expected, f"the answer is {device_class!r}, not a subclass of FifoDevice",
                       backend)
    try:
        reference, fixed = _fifo_run(vulnerable.BoundedFifo, backend)
        result, state = _fifo_run(device_class, backend)
    except LabkitError as error:
        return _refused(exercise, expected, error, backend)
    where = _where(result.origin, backend)
    problems = []
    for name, offset, size in vulnerable.STATE_LAYOUT:
        theirs, ours = state["state"][offset:offset + size], fixed["state"][offset:offset + size]
        if theirs != ours:
            problems.append(f"{name} holds {theirs.hex(' ')} after the attack, the bounded device's {ours.hex(' ')}")
    if state["calls"] != fixed["calls"]:
        problems.append(f"the device called {', '.join(state['calls']) or 'no handler'}, the bounded one "
                        f"{', '.join(fixed['calls'])}")
    if result.status.kind != StatusKind.EXITED or result.status.code != 0:
        problems.append(f"the run ended {_status(result)}")
    elif result.console != reference.console:
        problems.append(f"the guest printed {result.console.strip()!r}")
    observed = "; ".join(problems) or (f"the 17th byte was dropped, handler stayed {state['state'][vulnerable.HANDLER]}"
                                       f" and the guest read back {result.console.split('answered: ')[-1].strip()!r}")
    return Verdict(exercise, not problems, expected, observed, where)


SECRET = b"TOPSECRT"
SECRET_AT = 0x1C3A5D
"""Where the check plants ``SECRET`` in the scanner's own RAM: not 8-byte aligned, above 1 MiB."""
SCAN_RAM = 2 << 20
"""The scanner VM's RAM (labkit's default): the scan covers every byte of [0, SCAN_RAM)."""


def check_secret_scanner(source: str, backend: str = "auto") -> Verdict:
    """Notebook 07: a 64-bit guest, run in ring 3 as scan64 is (under PVM ring-0 code is emulated instruction by
    instruction, ring-3 code runs natively), that searches every byte of its RAM (``SCAN_RAM``, which labkit's page
    tables map for ring 3 too) for ``SECRET`` and ends through labkit's exit service (``xor eax, eax; int 4``) with
    the address of the first match in RDI, or 0.  Run twice: with ``SECRET`` planted by the host at
    ``SECRET_AT`` (RDI must be it: the scanner *can* find a secret), and without it beside a second VM that holds
    ``SECRET`` at the same guest-physical address (RDI must be 0: one VM's RAM is not another's, and the scanner
    does not count its own copy of the pattern).
    """
    from labkit.guest import Guest
    from labkit.vmm.machine import Machine

    exercise = "a scanner that finds only its own VM's secret"
    expected = (f"RDI = {SECRET_AT:#x} at the exit with {SECRET!r} planted there, RDI = 0 in a VM without it "
                "beside a VM holding it")
    backend = _backend_name(backend)
    found: dict[str, int] = {}
    try:
        guest = Guest.from_asm(source, mode=64, name="your scanner", user=True)
        with Machine(guest, backend=backend, memory=SCAN_RAM) as planted:
            planted.write_memory(SECRET_AT, SECRET)
            runs = {"planted": planted.run(timeout=LONG_TIMEOUT)}
        with Machine(guest, backend=backend, memory=SCAN_RAM) as other:
            other.write_memory(SECRET_AT, SECRET)  # the neighbour holds the secret; the scanner's VM does not
            with Machine(guest, backend=backend, memory=SCAN_RAM) as alone:
                runs["beside"] = alone.run(timeout=LONG_TIMEOUT)
    except LabkitError as error:
        return _refused(exercise, expected, error, backend)
    where = _where(runs["planted"].origin, backend)
    for name, run in runs.items():
        if run.status.kind != StatusKind.EXITED:
            return Verdict(exercise, False, expected, f"the run {name} ended {_status(run)}, not through the exit "
                           "service", where)
        found[name] = run.regs.rdi
    own = guest.load_address <= found["beside"] < guest.load_address + len(guest.code)
    if found["beside"]:
        return Verdict(exercise, False, expected, f"RDI = {found['beside']:#x} in a VM without the secret"
                       + (": that is your own code's copy of the pattern" if own else ""), where)
    if found["planted"] != SECRET_AT:
        return Verdict(exercise, False, expected, f"RDI = {found['planted']:#x} with the secret planted at "
                       f"{SECRET_AT:#x}", where)
    return Verdict(exercise, True, expected, f"RDI = {SECRET_AT:#x} with the secret planted, 0 beside the VM "
                   "holding it", where)


# -- 08 snapshots: what a diff holds, and how to find it without dirty logging ------------------------

DIRTY_WANTED = 3
"""Pages :func:`check_dirty_pages` wants written between the two snapshots."""


def _snapshot_pair(guest: Guest, backend: str) -> tuple[RunResult, Any, Any]:
    """A full snapshot before ``guest`` runs, the run (to its end), and a diff snapshot after it."""
    from labkit.vmm.machine import Machine

    with Machine(guest, backend=backend) as machine:
        first = machine.snapshot()
        result = machine.run(timeout=TIMEOUT)
        return result, first, machine.snapshot(parent=first)


def check_dirty_pages(source: str, backend: str = "auto") -> Verdict:
    """Notebook 08: a 64-bit ring-0 guest that changes guest RAM so that the diff snapshot taken after it halts
    holds exactly ``DIRTY_WANTED`` pages (the snapshot before it ran is the parent), and that prints nothing.

    A diff holds whole 4 KiB pages, those the guest wrote since the parent (KVM's dirty log, the emulator's write
    hooks): three bytes in one page are one page, a quadword across a page boundary two.
    """
    from labkit.guest import Guest

    exercise = "dirty exactly three pages"
    expected = f"a diff snapshot of exactly {DIRTY_WANTED} pages after the guest halts, and an empty console"
    backend = _backend_name(backend)
    try:
        result, _, diff = _snapshot_pair(Guest.from_asm(source, mode=64, name="your guest"), backend)
    except LabkitError as error:
        return _refused(exercise, expected, error, backend)
    pages = sorted(diff.diff.pages) if diff.diff is not None else []
    problems = []
    if len(pages) != DIRTY_WANTED:
        listed = ", ".join(f"{page * PAGE:#x}" for page in pages[:8]) + (" ..." if len(pages) > 8 else "")
        problems.append(f"the diff holds {len(pages)} page(s)" + (f" (at {listed})" if pages else ""))
    if result.console:
        problems.append(f"printed {result.console[:40]!r}")
    if result.status.kind != StatusKind.HALTED:
        problems.append(f"ended {_status(result)}")
    observed = "; ".join(problems) or ("the diff holds the pages at " + ", ".join(f"{page * PAGE:#x}" for page in pages))
    return Verdict(exercise, not problems, expected, observed, _where(result.origin, backend))


CHANGING_GUEST = """
    mov byte ptr [0x100000], 0x11       # the first byte of a page
    mov word ptr [0x101ffe], 0x2222     # the last two bytes of the next one
    mov dword ptr [0x104800], 0x33333333
    mov rcx, 0x120000                   # one byte in each of eight pages, at a different offset each
    mov rdx, 0x100
1:  mov byte ptr [rcx + rdx], 0x44
    add rcx, 0x1000
    add rdx, 0x1f0
    cmp rcx, 0x128000
    jb 1b
    mov qword ptr [0x130000], 0         # written, but with the bytes it held: no change
    hlt
"""
"""The guest :func:`check_changed_pages` snapshots: it changes eleven pages at the start, the end and the middle."""


def check_changed_pages(changed_pages: Callable[[bytes, bytes], Collection[int]], backend: str = "auto") -> Verdict:
    """Notebook 08: ``changed_pages(before, after)``, the page numbers (address // 4096) where two copies of guest
    RAM differ: how a VMM builds a diff snapshot where it has no dirty log.  Checked on ``CHANGING_GUEST``'s RAM
    before and after it ran: the answer must be exactly the changed pages, and writing those pages of ``after``
    into a machine restored from the first snapshot must give the second snapshot's RAM.
    """
    from labkit.guest import Guest
    from labkit.vmm.machine import Machine

    exercise = "find the changed pages"
    expected = "exactly the pages whose bytes changed, and the first snapshot plus those pages equals the second"
    backend = _backend_name(backend)
    try:
        result, first, second = _snapshot_pair(Guest.from_asm(CHANGING_GUEST, mode=64, name="changing guest"),
                                               backend)
        with Machine.from_snapshot(first, backend=backend) as restored:
            size = restored.memory_size
            before = restored.read_memory(0, size)
            with Machine.from_snapshot(second, backend=backend) as later:
                after = later.read_memory(0, size)
            where = _where(result.origin, backend)
            truth = sorted(page for page in range(size // PAGE)
                           if before[page * PAGE:(page + 1) * PAGE] != after[page * PAGE:(page + 1) * PAGE])
            try:
                answer = sorted(changed_pages(before, after))
            except Exception as error:  # the student's code: any exception is an answer to report
                return Verdict(exercise, False, expected, f"changed_pages raised {type(error).__name__}: {error}",
                               where)
            if any(isinstance(page, bool) or not isinstance(page, int) for page in answer):
                return Verdict(exercise, False, expected, f"changed_pages gave {answer[:4]!r}..., not page numbers",
                               where)
            for page in answer:
                if not 0 <= page < size // PAGE:
                    return Verdict(exercise, False, expected, f"page {page} (address {page * PAGE:#x}) is outside "
                                   f"the guest's {size >> 10} KiB", where)
                restored.write_memory(page * PAGE, after[page * PAGE:(page + 1) * PAGE])
            rebuilt = restored.read_memory(0, size) == after
    except LabkitError as error:
        return _refused(exercise, expected, error, backend)
    missing, extra = sorted(set(truth) - set(answer)), sorted(set(answer) - set(truth))
    problems = []
    if missing:
        problems.append(f"{len(missing)} changed page(s) missing (the first at {missing[0] * PAGE:#x})")
    if extra:
        problems.append(f"{len(extra)} page(s) that did not change (the first at {extra[0] * PAGE:#x})")
    if not rebuilt:
        problems.append("the first snapshot with your pages is not the second")
    observed = "; ".join(problems) or (f"the {len(truth)} changed pages, and the first snapshot with them is the "
                                       "second")
    return Verdict(exercise, not problems, expected, observed, where)


# --- notebook 09: where a delta keeps the guest's bytes, and the check a restore needs ----------------------

LOOKUP_DISK = 4 << 20
"""The base disk of the cluster-lookup exercise: two L2 tables' worth at 4 KiB clusters."""
LOOKUP_CLUSTER = 4096
LOOKUP_WRITES = 24
"""blk64's one-sector writes at random sectors into the exercise's overlay (pattern ``random``, seed 3)."""


def check_cluster_lookup(lookup: Callable[[Any, int], int | None], backend: str = "auto") -> Verdict:
    """Notebook 09: ``lookup(file, offset)``, the host offset in a qcow2 overlay's file (``file`` open for binary
    reading) that holds the guest's disk byte at ``offset``, or ``None`` where the overlay has no cluster for it
    (the read falls through to the backing file).  ``blk64`` writes :data:`LOOKUP_WRITES` sectors through
    virtio-blk into a new overlay of :data:`LOOKUP_CLUSTER`-byte clusters over a :data:`LOOKUP_DISK`-byte base;
    the answer must find every written sector's bytes and say ``None`` for every cluster nobody wrote.
    """
    import random
    import tempfile

    from labkit.storage import Datastore, open_image
    from labkit.virtio.blk import PARAMS_ADDRESS, SECTOR_SIZE, blk64_parameters, blk64_sectors, block_devices
    from labkit.vmm.machine import Machine

    exercise = "find a guest byte in the delta file"
    expected = (f"for each of the {LOOKUP_WRITES} sectors blk64 wrote, the file offset holding its bytes; None for "
                "every cluster the overlay does not hold")
    backend = _backend_name(backend)
    with tempfile.TemporaryDirectory(prefix="labkit-exercise-09-") as folder:
        try:
            store = Datastore(folder, capacity=1 << 30)
            store.create_raw("base.raw", LOOKUP_DISK)
            store.create_overlay("delta.qcow2", "base.raw", cluster_size=LOOKUP_CLUSTER)
            with Machine("blk64", backend=backend, devices=block_devices(lambda: store.open("delta.qcow2"))) as vm:
                vm.write_memory(PARAMS_ADDRESS, blk64_parameters("random", 1, LOOKUP_WRITES, 3))
                result = vm.run(timeout=LONG_TIMEOUT)
            where = _where(result.origin, backend)
            if result.status.kind is not StatusKind.EXITED or result.status.code != 0:
                return Verdict(exercise, False, expected, f"blk64 did not finish its writes: {_status(result)}", where)
            with open_image(store.file("delta.qcow2")) as image:  # type: ignore[attr-defined]
                held = [(e.start, e.length, e.offset) for e in image.extents() if e.depth == 0 and e.data]
                written = sorted(set(blk64_sectors("random", 1, LOOKUP_WRITES, 3, LOOKUP_DISK // SECTOR_SIZE)))
                rng = random.Random(9)
                probes = [(sector * SECTOR_SIZE + rng.randrange(SECTOR_SIZE), True) for sector in written]
                free = [c for c in range(LOOKUP_DISK // LOOKUP_CLUSTER)
                        if not any(start <= c * LOOKUP_CLUSTER < start + length for start, length, _ in held)]
                probes += [(c * LOOKUP_CLUSTER + rng.randrange(LOOKUP_CLUSTER), False) for c in rng.sample(free, 24)]
                truth = {offset: image.read(offset, 1) for offset, _ in probes}
            path = store.file("delta.qcow2")
            size = os.path.getsize(path)
            with open(path, "rb") as file:
                for offset, stored in probes:
                    try:
                        answer = lookup(file, offset)
                    except Exception as error:  # the student's code: any exception is an answer to report
                        return Verdict(exercise, False, expected,
                                       f"lookup(file, {offset:#x}) raised {type(error).__name__}: {error}", where)
                    if not stored:
                        if answer is not None:
                            return Verdict(exercise, False, expected, f"at {offset:#x}, a cluster nobody wrote, "
                                           f"lookup gave {answer!r}, not None", where)
                        continue
                    if isinstance(answer, bool) or not isinstance(answer, int):
                        return Verdict(exercise, False, expected, f"at {offset:#x}, which blk64 wrote, lookup gave "
                                       f"{answer!r}, not a file offset", where)
                    if not 0 <= answer < size:
                        return Verdict(exercise, False, expected, f"at {offset:#x} lookup gave {answer:#x}, past the "
                                       f"end of the {size:,}-byte file", where)
                    file.seek(answer)
                    if file.read(1) != truth[offset]:
                        file.seek(answer)
                        return Verdict(exercise, False, expected, f"at {offset:#x} lookup gave {answer:#x}, where the "
                                       f"file holds {file.read(1).hex()}, not the guest's byte "
                                       f"{truth[offset].hex()}", where)
        except LabkitError as error:
            return _refused(exercise, expected, error, backend)
    return Verdict(exercise, True, expected, f"all {len(written)} written sectors found and all 24 unwritten clusters "
                   "None", where)


DAMAGED_FILES = {"notes.txt": 700, "photo.raw": 3000, "thesis.tex": 1100, "data.bin": 512, "log.txt": 1500}
"""The files of the damaged-files exercise: name -> length in bytes (most end inside a sector)."""
DAMAGE = (("thesis.tex", 600), ("log.txt", 1499), ("notes.txt", 900), ("photo.raw", 3050))
"""Bytes flipped on the restored disk, as (file, offset from the file's first byte): thesis.tex in its
middle, log.txt in its last byte, notes.txt and photo.raw past their ends, in their last sectors' slack."""
DAMAGED_WANTED = ("log.txt", "thesis.tex")


def check_damaged_files(find_damaged: Callable[[Any], Collection[str]], backend: str = "auto") -> Verdict:
    """Notebook 09: ``find_damaged(disk)``, the names of the files on an LKFS disk whose bytes do not match the
    SHA-256 in their directory entry (``disk.read(offset, length)``; ``labkit.backup.files.read_layout`` gives the
    directory).  The disk is made as a restore makes it: ``backup64`` (the agent in the guest) sends the files of
    :data:`DAMAGED_FILES` over the virtio console on this backend, the backup is written onto a new disk, and
    :data:`DAMAGE` is done to it: the answer must name exactly :data:`DAMAGED_WANTED`.
    """
    import tempfile

    from labkit.backup.agent import agent_backup, restore_agent_backup
    from labkit.backup.files import SECTOR, format_files, read_layout
    from labkit.storage import Datastore

    exercise = "find the damaged files"
    expected = f"exactly {', '.join(DAMAGED_WANTED)}: the files whose bytes differ from their SHA-256"
    backend = _backend_name(backend)
    where = _where(None, backend)
    with tempfile.TemporaryDirectory(prefix="labkit-exercise-09-") as folder:
        try:
            store = Datastore(folder, capacity=1 << 30)
            store.create_raw("vm.raw", 1 << 20)
            with store.open("vm.raw") as disk:  # type: ignore[attr-defined]
                format_files(disk, {name: bytes((7 * i + len(name)) & 0xFF for i in range(length))
                                    for name, length in DAMAGED_FILES.items()})
            backup = agent_backup(store.file("vm.raw"), os.path.join(folder, "agent.lkfs"), backend=backend)
            where = _where(backup.origin, backend)
            store.create_raw("restored.raw", 1 << 20)
            with store.open("restored.raw") as disk:  # type: ignore[attr-defined]
                restore_agent_backup(backup.path, disk)
                entries = {entry.name: entry for entry in read_layout(disk).files}
                for name, offset in DAMAGE:
                    at = entries[name].first_sector * SECTOR + offset
                    disk.write(at, bytes([disk.read(at, 1)[0] ^ 0x20]))
                try:
                    answer = find_damaged(disk)
                except Exception as error:  # the student's code: any exception is an answer to report
                    return Verdict(exercise, False, expected, f"find_damaged raised {type(error).__name__}: {error}",
                                   where)
        except LabkitError as error:
            return _refused(exercise, expected, error, backend)
    if isinstance(answer, str) or any(not isinstance(name, str) for name in answer):
        return Verdict(exercise, False, expected, f"find_damaged gave {answer!r:.80}, not a collection of names", where)
    missing, extra = sorted(set(DAMAGED_WANTED) - set(answer)), sorted(set(answer) - set(DAMAGED_WANTED))
    problems = []
    if missing:
        problems.append(f"damaged but not named: {', '.join(missing)}")
    if extra:
        problems.append(f"named but intact (what changed is past the file's end, or nothing): {', '.join(extra)}")
    return Verdict(exercise, not problems, expected, "; ".join(problems) or f"named {', '.join(sorted(answer))}",
                   where)


__all__ = ["CHANGING_GUEST", "DAMAGE", "DAMAGED_FILES", "DAMAGED_WANTED", "DIRTY_WANTED", "LOOKUP_CLUSTER",
           "LOOKUP_DISK", "LOOKUP_WRITES", "LONG_TIMEOUT", "MESSAGE", "OK_TEXT", "PAGE", "PAGING_EDITS", "PAGING_ROOTS",
           "PAGING_SEED", "PV_MOST_ENTRIES", "PV_TEXT", "SCAN_RAM", "SECRET", "SECRET_AT", "TIMEOUT",
           "TRANSLATION_ROUTINES", "WALK_ADDRESSES", "WANTED_PF", "WBINVD_ROUTINE", "WRITES_KIB", "Verdict",
           "check_bounded_fifo", "check_changed_pages", "check_cluster_lookup", "check_damaged_files", "check_cr3_loads_only", "check_dirty_pages",
           "check_five_exits", "check_one_notification", "check_output_exits_only", "check_page_fault",
           "check_page_walk", "check_paravirtual_port", "check_print_ok", "check_secret_scanner",
           "check_self_modifying", "check_sensitive_routine", "check_shadow_leaf", "check_translation_set",
           "check_wbinvd_monitor", "check_write_without_fault"]
