"""One kernel workload under every technique: how often each one enters the hypervisor, and what it costs.

The workload is ``minikernel64`` with :data:`WORKLOAD` (the routines
``pvkernel64`` also has): it loads its own GDT and IDT and reloads CR3 (the page-table
switch), masks and unmasks interrupts (``cli``/``sti``/``pushf``/``popf``), enters
its own exception handlers through its IDT (``ud2``, a page fault: the way a
system call through a gate enters a kernel), reads control registers and prints
every result through the UART.  A ring-0 ``int n`` (the ``int`` routine) is left
out: PVM cannot run it natively and ``pvkernel64`` has no such routine.

Each technique counts its own kind of hypervisor entry:

====================  ===========================================================================
technique             entries counted (by whom)
====================  ===========================================================================
native                VM exits labkit's run loop saw: port I/O, HLT (labkit's trace)
trap-and-emulate      traps of the deprivileged kernel into the monitor, by vector (the monitor)
binary translation    monitor calls from translated code: emulated instructions, block exits,
                      indirect branches, reflected faults (the translator)
paravirtual           hypercalls of ``pvkernel64``, by name, and its exceptions the hypervisor
                      bounced to it (labkit.monitor.paravirt)
VMX model             VM exits a model of VMX decides under a VMCS (:mod:`labkit.monitor.vmx`)
KVM                   the kernel natively on KVM: every VM exit KVM counted (binary stats fd,
                      where the run carries it) against those that reached labkit
====================  ===========================================================================

Times are the host's wall time for the whole run (``RunResult.elapsed_s``): on KVM
a real cost, on the emulator the emulator's; for the VMX model it is the cost of
the model (binary translation plus decisions), never VT-x's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from labkit.errors import ConfigError, LabkitError
from labkit.progress import tracked
from labkit.table import Table
from labkit.vmm.status import RunResult, exception_name

if TYPE_CHECKING:
    from labkit.guest import Guest

WORKLOAD = ("cli_pushf", "popf", "sgdt", "sidt", "smsw", "fault", "page_fault", "control_registers")
"""minikernel64's routines every technique runs (``pvkernel64``'s set: labkit.monitor.paravirt.PV_ROUTINES)."""
TECHNIQUES = ("native", "trap-and-emulate", "binary translation", "paravirtual", "VMX model", "KVM")


@dataclass(frozen=True)
class TechniqueRun:
    """One technique's run of the workload: its hypervisor entries and what measured them."""

    technique: str
    entry_kind: str
    """What is counted: "VM exits", "traps", "monitor calls", "hypercalls", "VM exits (model)"."""
    entries: int
    by_kind: dict[str, int]
    measured_by: str
    """Who counted and where: "labkit's trace, the emulator (Unicorn 2.1.4)", "the VMX model, KVM (kvm_pvm)"."""
    backend: str
    host_ms: float
    time_means: str
    console_matches_native: bool | None
    """Whether the console equals the native run's (None where no native run was compared)."""
    differing_lines: int
    status: str
    backend_exits: int = 0
    """VM exits of the backend itself during the run (labkit's trace), whatever the technique counts."""
    console_entries: int | None = None
    """Of ``entries``, those that print the console: port I/O to the UART (one per byte polled or written), or
    ``console_io`` hypercalls for the paravirtual kernel (one per string); None where the technique does not
    tell them apart."""
    skipped: str = ""
    """Why the technique did not run here (then the numbers are 0)."""


@dataclass(frozen=True)
class TechniqueComparison:
    """Every technique on the same workload (see the module docstring); ``runs`` in :data:`TECHNIQUES` order."""

    workload: tuple[str, ...]
    backend: str
    where: str
    runs: tuple[TechniqueRun, ...]
    native_console: str = field(repr=False, default="")

    def run(self, technique: str) -> TechniqueRun:
        for run in self.runs:
            if run.technique == technique:
                return run
        raise ConfigError(f"no technique {technique!r}; these ran: {', '.join(r.technique for r in self.runs)}")

    def table(self) -> Table:
        """One row per technique: entries and their kinds, who measured them, host time, console = native."""
        return entry_table(self.runs, f"One workload, every technique, run on {self.where}: hypervisor entries "
                           "and host time", note="Workload: minikernel64 routines " + ", ".join(self.workload) + ".")


def entry_table(runs: Sequence[TechniqueRun], title: str, note: str = "") -> Table:
    """The entry table: one row per :class:`TechniqueRun` (``labkit run --monitor`` prints it with one row)."""
    rows = []
    for run in runs:
        if run.skipped:
            rows.append([run.technique, "-", "-", "not run: " + run.skipped, "-", "-", "-"])
            continue
        ordered = sorted(run.by_kind.items(), key=lambda item: -item[1])
        kinds = "\n".join(f"{name}: {count}" for name, count in ordered[:4])
        if len(ordered) > 4:
            kinds += f"\n(+{len(ordered) - 4} more kinds)"
        besides = "" if run.console_entries is None else f"\n({run.entries - run.console_entries} besides the console)"
        rows.append([run.technique, f"{run.entries} {run.entry_kind}{besides}", kinds or "none", run.measured_by,
                     f"{run.host_ms:.1f} ms ({run.time_means})", str(run.backend_exits), _matches(run)])
    return Table(title, ["technique", "hypervisor entries", "by kind", "counted by", "host time of the run",
                         "backend VM exits", "console = native"], rows,
                 note=("Each technique counts its own entries; 'backend VM exits' are the exits of the backend labkit "
                       "runs on (the emulator's are emulated). " + note).strip())


def _matches(run: TechniqueRun) -> str:
    if run.console_matches_native is None:
        return "the reference" if run.technique == "native" else "not compared"
    return "yes" if run.console_matches_native else f"no: {run.differing_lines} line(s) differ"


def _where(result: RunResult) -> str:
    from labkit.monitor.vmx.model import ran_on

    return ran_on(result)


def _differing(native: str, console: str) -> int:
    a, b = native.splitlines(), console.splitlines()
    return sum(1 for i in range(max(len(a), len(b))) if (a[i] if i < len(a) else None) != (b[i] if i < len(b) else None))


def _backend_exits(result: RunResult) -> int:
    return sum(result.trace.by_kind()[0].values())


def _time_means(backend: str, technique: str) -> str:
    if technique == "VMX model":
        return "the model's cost, not VT-x's"
    return "KVM, host wall time" if backend == "kvm" else "emulator time, not hardware time"


def _row(technique: str, kind: str, entries: dict[str, int], counted_by: str, result: RunResult,
         native: str | None, console_entries: int | None) -> TechniqueRun:
    return TechniqueRun(technique, kind, sum(entries.values()), entries, f"{counted_by}, {_where(result)}",
                        result.backend, result.elapsed_s * 1e3, _time_means(result.backend, technique),
                        None if native is None else result.console == native,
                        0 if native is None else _differing(native, result.console), str(result.status),
                        _backend_exits(result), console_entries)


def _skipped(technique: str, backend: str, why: str) -> TechniqueRun:
    return TechniqueRun(technique, "", 0, {}, "", backend, 0.0, "", False, 0, "not run", skipped=why)


MONITORS = {"te": "trap-and-emulate", "bt": "binary translation", "pv": "paravirtual", "vmx": "VMX model"}
"""Short names (``labkit run --monitor``) -> technique."""
PARAVIRTUAL_KERNEL = "pvkernel64"
PORT_IO = ("in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd")


def run_technique(technique: str, kernel: Guest | str | None = None, backend: str = "auto", timeout: float = 20.0, *,
                  vmcs: Any = None, native: str | None = None,
                  **machine_options: Any) -> tuple[RunResult, TechniqueRun]:
    """Run ``kernel`` under ``technique`` ("native", a name of :data:`TECHNIQUES` but "KVM", or a short name of
    :data:`MONITORS`); the ``RunResult`` and its :class:`TechniqueRun` row.

    ``kernel`` defaults to minikernel64 with :data:`WORKLOAD` (``pvkernel64`` with it for "paravirtual").
    ``native`` is a native console to compare with; ``vmcs`` the VMX model's (default: no controls);
    ``machine_options`` (``memory``) go to the Machine.
    """
    from labkit.monitor.trap_emulate import minikernel

    technique = MONITORS.get(technique, technique)
    if technique not in TECHNIQUES or technique == "KVM":
        raise ConfigError(f"unknown technique {technique!r}: choose native or one of "
                          + ", ".join(f"{short} ({name})" for short, name in MONITORS.items()))
    if vmcs is not None and technique != "VMX model":
        raise ConfigError(f"a VMCS belongs to the VMX model, not to {technique}")
    if technique == "paravirtual":
        return _paravirtual(kernel, backend, timeout, native, machine_options)
    guest = minikernel(WORKLOAD) if kernel is None else kernel
    if technique == "native":
        from labkit.vmm.machine import Machine

        with Machine(guest, backend=backend, **machine_options) as machine:
            result = machine.run(timeout)
        exits = result.trace.by_kind()[0]
        return result, _row("native", "VM exits", exits, "labkit's trace", result, native, exits.get("IO", 0))
    if technique == "trap-and-emulate":
        from labkit.monitor.trap_emulate import TrapEmulateReport, run_deprivileged

        result = run_deprivileged(guest, backend, timeout, **machine_options)
        report = result.monitor
        if not isinstance(report, TrapEmulateReport):
            raise LabkitError("the trap-and-emulate run returned no monitor report")
        traps = {exception_name(vector).split(" ")[0]: count for vector, count in report.traps.items()}
        console_entries = sum(report.emulated.get(name, 0) for name in PORT_IO)
        return result, _row(technique, "traps", traps, "the monitor", result, native, console_entries)
    if technique == "binary translation":
        from labkit.monitor.binary_translation import TranslationSummary, run_translated

        result = run_translated(guest, backend, timeout, **machine_options)
        summary = result.monitor
        if not isinstance(summary, TranslationSummary):
            raise LabkitError("the binary-translation run returned no translation summary")
        console_entries = sum(summary.entries.get(f"{how}: {name}", 0) for how in ("emulate", "trap") for name in PORT_IO)
        return result, _row(technique, "monitor calls", summary.entries_by_kind(), "the translator", result, native,
                            console_entries)
    from labkit.monitor.vmx.exits import ExitReason
    from labkit.monitor.vmx.model import VmxReport, run_vmx

    result = run_vmx(guest, vmcs, backend, timeout, **machine_options)
    report = result.monitor
    if not isinstance(report, VmxReport):
        raise LabkitError("the VMX model's run returned no report")
    exits = {f"{reason} {ExitReason(reason).short_name}": count for reason, count in sorted(report.exit_counts.items())}
    return result, _row(technique, "VM exits (model)", exits, "the VMX model", result, native,
                        report.exit_counts.get(ExitReason.IO_INSTRUCTION, 0))


def _paravirtual(kernel: Guest | str | None, backend: str, timeout: float, native: str | None,
                 machine_options: dict[str, Any]) -> tuple[RunResult, TechniqueRun]:
    from labkit.monitor import paravirt

    if kernel is None:
        report = paravirt.run_paravirtual(WORKLOAD, backend, timeout, **machine_options)
    else:
        report = paravirt.run_paravirtual(None, backend, timeout, guest=kernel, **machine_options)
    entries = dict(report.hypercalls)
    for vector, count in report.bounced.items():  # the kernel's own exceptions enter the hypervisor first
        entries[f"bounced {exception_name(vector).split(' ')[0]}"] = count
    if report.traps:
        entries["privileged-instruction traps"] = report.traps
    return report.result, _row("paravirtual", "hypercalls and bounces", entries, "the hypervisor (hypercall ABI)",
                               report.result, native, report.hypercalls.get("console_io", 0))


def _kvm(timeout: float, native: str) -> TechniqueRun:
    why_not = kvm_absent_reason()
    if why_not:
        return _skipped("KVM", "kvm", why_not)
    result, _ = run_technique("native", None, "kvm", timeout)
    userspace = result.trace.by_kind()[0]
    kinds = {f"{name} (reached labkit)": count for name, count in userspace.items()}
    stats = getattr(result, "kvm_stats", None)  # RunResult.kvm_stats: KVM's own vCPU counters, where labkit reads them
    if stats is None:
        return _row("KVM", "VM exits", kinds, "labkit's trace (KVM's in-kernel counters not read)", result, native,
                    userspace.get("IO", 0))
    counted, seen = int(stats.counters.get("exits", 0)), sum(userspace.values())
    if counted > seen:
        kinds["handled inside KVM"] = counted - seen
    return _row("KVM", "VM exits", kinds, "KVM's vCPU stats (exits) and labkit's trace", result, native,
                userspace.get("IO", 0))


def kvm_absent_reason() -> str:
    """Why the KVM row is not run here ("" when it is): KVM unusable, or ``LABKIT_BACKEND=emu`` asking for
    emulation only (as on Binder; the rule of ``labkit.viz.report.backends_to_compare``)."""
    import os

    from labkit.backend import kvm_problem

    problem = kvm_problem()
    if problem:
        return f"KVM is not usable here: {problem}"
    if os.environ.get("LABKIT_BACKEND") == "emu":
        return "KVM is usable here, but LABKIT_BACKEND=emu is set: this session uses emulation only"
    return ""


def compare_techniques(backend: str = "auto", *, timeout: float = 20.0, vmcs: Any = None,
                       techniques: Sequence[str] = TECHNIQUES) -> TechniqueComparison:
    """Run :data:`WORKLOAD` under each of ``techniques`` (default all) on ``backend``; a :class:`TechniqueComparison`.

    "KVM" always runs on KVM (skipped with the reason where it cannot: :func:`kvm_absent_reason`); the
    others on ``backend``.  ``vmcs`` is the VMX model's (default: :func:`labkit.monitor.vmx.vmcs.kvm_like`).
    Every console is compared with the native run's.
    """
    from labkit.backend import choose_backend
    from labkit.monitor.vmx.vmcs import kvm_like

    unknown = [name for name in techniques if name not in TECHNIQUES]
    if unknown:
        raise ConfigError(f"unknown technique(s) {unknown}; choose from {', '.join(TECHNIQUES)}")
    chosen = choose_backend(backend).name
    native_result, native_run = run_technique("native", None, chosen, timeout)
    native = native_result.console
    runs = []
    for technique in tracked(TECHNIQUES, "comparing the techniques"):
        if technique not in techniques:
            continue
        if technique == "native":
            runs.append(native_run)
        elif technique == "KVM":
            runs.append(_kvm(timeout, native))
        else:
            options = {"vmcs": kvm_like() if vmcs is None else vmcs} if technique == "VMX model" else {}
            runs.append(run_technique(technique, None, chosen, timeout, native=native, **options)[1])
    return TechniqueComparison(WORKLOAD, chosen, _where(native_result), tuple(runs), native)

