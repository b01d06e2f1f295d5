"""Notebooks 02 and 03: a kernel routine natively and under a monitor, what to translate, and its exits one by one."""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from labkit.widgets.experiment import Experiment, backend_picker, backends_here, dropdown, note

TIMEOUT_S = 10.0


class RoutineComparison(Experiment):
    """Which kernel routine, which backend: its console natively (ring 0) and under trap-and-emulate (ring 3),
    and what the monitor did for it (traps by exception name; on KVM, the VM exits KVM counted)."""

    slots = 3

    def __init__(self, routine: str = "cli_pushf", backend: str | None = None) -> None:
        from labkit.backend import choose_backend
        from labkit.monitor.trap_emulate import ROUTINES

        backends, self.skipped = backends_here()
        self.routine = dropdown("kernel routine", list(ROUTINES), routine)
        self.backend = backend_picker(backends, backend or choose_backend().name)
        super().__init__([self.routine, self.backend], title="Trap-and-emulate vs native:")

    def results(self) -> list[Any]:
        from labkit.monitor.trap_emulate import TrapEmulateReport, compare_consoles, minikernel, run_deprivileged, run_native
        from labkit.viz.trap_emulate import monitor_table

        kernel = minikernel([self.routine.value])
        native, native_kvm = run_native(kernel, self.backend.value, timeout=TIMEOUT_S)
        deprivileged = run_deprivileged(kernel, self.backend.value, timeout=TIMEOUT_S)
        comparison = compare_consoles(native.console, deprivileged.console)
        report = deprivileged.monitor
        traps = f" after {report.trap_count} traps" if isinstance(report, TrapEmulateReport) else ""
        exits = ""
        if isinstance(report, TrapEmulateReport) and report.kvm is not None and native_kvm is not None:
            exits = (f" KVM handled {report.kvm.in_kernel} exits itself under the monitor, "
                     f"{native_kvm.in_kernel} natively.")
        summary = (f"{self.routine.value} on {self.backend.label}: native {native.status}; trap-and-emulate "
                   f"{deprivileged.status}{traps}; "
                   f"{len(comparison.divergent)} of {len(comparison.rows)} lines differ.{exits}")
        table = monitor_table(report) if isinstance(report, TrapEmulateReport) else note("no monitor report")
        return [note(summary), comparison, table]


PROBE_PREFIX = "Robin & Irvine: "
"""Dropdown entries for the routines of :mod:`labkit.monitor.robin_irvine` (``"Robin & Irvine: LAR"``)."""


def _kernel(routine: str) -> Any:
    """The minikernel running ``routine``: one of its own, or a Robin & Irvine probe."""
    from labkit.monitor.robin_irvine import ALL_PROBES, probe_kernel
    from labkit.monitor.trap_emulate import minikernel

    if routine.startswith(PROBE_PREFIX):
        name = routine[len(PROBE_PREFIX):]
        return probe_kernel(next(probe.routine for probe in ALL_PROBES if probe.name == name))
    return minikernel([routine])


class TranslationChoice(Experiment):
    """Which routine, which instructions the translator replaces: native console next to the translated one.

    The routines are the minikernel's own and one per instruction of Robin and
    Irvine's list (:mod:`labkit.monitor.robin_irvine`).
    """

    slots = 2

    def __init__(self, routine: str = "popf", leave_out: frozenset[str] = frozenset({"popfq"}),
                 backend: str | None = None) -> None:
        from labkit.backend import choose_backend
        from labkit.monitor.binary_translation import TRANSLATABLE
        from labkit.monitor.robin_irvine import ALL_PROBES
        from labkit.monitor.trap_emulate import ROUTINES

        backends, self.skipped = backends_here()
        options = list(ROUTINES) + [PROBE_PREFIX + probe.name for probe in ALL_PROBES]
        self.routine = dropdown("kernel routine", options, routine)
        self.translate = widgets.SelectMultiple(options=sorted(TRANSLATABLE), value=sorted(TRANSLATABLE - leave_out),
                                                rows=6, description="translate")
        self.backend = backend_picker(backends, backend or choose_backend().name)
        super().__init__([self.routine, self.translate, self.backend], title="Binary translation:")
        self.last: Any = None
        """The last translated RunResult."""

    def results(self) -> list[Any]:
        from labkit.monitor.binary_translation import (TRANSLATABLE, TranslationSummary, consoles_side_by_side,
                                                       run_translated)
        from labkit.vmm.machine import Machine
        from labkit.vmm.status import StatusKind

        kernel = _kernel(self.routine.value)
        with Machine(kernel, backend=self.backend.value) as machine:
            native = machine.run(timeout=TIMEOUT_S)
        reference = ""
        if native.status.kind == StatusKind.ERROR and self.backend.value != "emu":
            # This KVM's ring 0 cannot run the routine (PVM's instruction emulator has no lar, no int n).
            reference = f" (natively on KVM: {native.status}; the native console is the emulator's)"
            with Machine(kernel, backend="emu") as machine:
                native = machine.run(timeout=TIMEOUT_S)
        translated = run_translated(kernel, backend=self.backend.value, translate=self.translate.value,
                                    timeout=TIMEOUT_S)
        self.last = translated
        left_out = ", ".join(sorted(set(TRANSLATABLE) - set(self.translate.value))) or "nothing"
        same = "the same as" if translated.console == native.console else "different from"
        report = translated.monitor
        entries = f"; {report.monitor_entries} monitor entries" if isinstance(report, TranslationSummary) else ""
        summary = (f"{self.routine.value} on {self.backend.label}, left untranslated: {left_out}. The translated "
                   f"console is {same} the native one ({translated.status}{entries}){reference}.")
        return [note(summary), consoles_side_by_side({"native (ring 0)": native.console,
                                                      "binary translation (ring 3)": translated.console})]


class ExitStepper(Experiment):
    """Step through one run's exit trace: the chosen exit with its neighbours, and what it was."""

    slots = 1
    AROUND = 3

    def __init__(self, run: Any, *, title: str = "Step through the exits:") -> None:
        self.run = run
        self.trace = run.trace
        last = max(len(self.trace.records) - 1, 0)
        self.position = widgets.IntSlider(value=0, min=0, max=last, description="exit",
                                          continuous_update=False, layout=widgets.Layout(width="60%"))
        super().__init__([self.position], title=title)

    def results(self) -> list[Any]:
        from labkit.table import Table
        from labkit.trace import format_ns

        if not self.trace.records:
            return [note("this run recorded no exits")]
        chosen = self.position.value
        rows = []
        first = max(chosen - self.AROUND, 0)
        for seq in range(first, min(chosen + self.AROUND + 1, len(self.trace.records))):
            record = self.trace[seq]
            where = "" if record.address is None else f"{record.direction} {record.address:#x}"
            rows.append(["▶" if seq == chosen else "", str(seq), record.reason,
                         "" if record.rip is None else f"{record.rip:#x}", where,
                         "" if record.data is None else f"{record.data:#x}", format_ns(record.host_ns),
                         "" if record.handling_ns is None else format_ns(record.handling_ns)])
        header = ["", "exit", "reason", "guest rip", "port / address", "data", "since previous", "handling"]
        return [Table(f"Exit {chosen} of {len(self.trace.records)}", header, rows)]
