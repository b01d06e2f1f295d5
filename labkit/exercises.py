"""Exercises with automatic feedback: run the student's answer on a real backend and compare.

Each notebook from 00 to 05 ends with tasks that make the student write or
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
04         :func:`check_one_notification`          virtqueue buffer sizes: one notification per write
05         :func:`check_output_exits_only`         a VMCS under which only the console's ``out``s exit
05         :func:`check_cr3_loads_only`            a VMCS under which only the CR3 loads exit
=========  =====================================  ==================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Collection

from labkit.errors import ExerciseFailed, LabkitError
from labkit.vmm.status import RunResult, StatusKind
from labkit.x86.arch import Vector

if TYPE_CHECKING:
    from labkit.guest import Guest
    from labkit.monitor.trap_emulate import TrapAndEmulate
    from labkit.monitor.vmx import Vmcs
    from labkit.vmm.status import Origin

TIMEOUT = 5.0
"""Seconds each run of an answer may take: a guest that never stops is stopped and the verdict says so."""


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


def check_output_exits_only(vmcs: Vmcs, backend: str = "auto") -> Verdict:
    """Notebook 05: a VMCS under which ``minikernel64`` exits only for its ``out``s to the UART (port 0x3f8).

    Read from each exit's qualification (Intel SDM vol. 3C, 28.2.1, table 28-5): bit 3 is the direction
    (0 = ``out``), bits 31:16 the port.
    """
    from labkit.monitor.vmx.exits import ExitReason
    from labkit.monitor.vmx.model import VmxReport, run_vmx

    exercise = "only the console's out exits"
    expected = f"VM exits only for I/O instructions, each an out to port {UART_DATA_PORT:#x}, one per console byte"
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
    others = {ExitReason(reason).name: count for reason, count in report.exit_counts.items()
              if reason != ExitReason.IO_INSTRUCTION}
    if others:
        problems.append("also exits: " + ", ".join(f"{name} x {count}" for name, count in sorted(others.items())))
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
    from labkit.monitor.vmx.model import VmxReport, run_vmx

    exercise = "exit at CR3 loads only"
    expected = "a VM exit at every mov to CR3 and at nothing else"
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
    others = {ExitReason(reason).name: count for reason, count in report.exit_counts.items()
              if reason != ExitReason.CONTROL_REGISTER_ACCESS}
    if others:
        problems.append("also exits: " + ", ".join(f"{name} x {count}" for name, count in sorted(others.items())))
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


__all__ = ["MESSAGE", "OK_TEXT", "PAGE", "TIMEOUT", "TRANSLATION_ROUTINES", "WANTED_PF", "WBINVD_ROUTINE", "WRITES_KIB",
           "Verdict", "check_five_exits", "check_one_notification", "check_output_exits_only", "check_page_fault",
           "check_cr3_loads_only", "check_print_ok", "check_sensitive_routine", "check_translation_set", "check_wbinvd_monitor",
           "check_write_without_fault"]
