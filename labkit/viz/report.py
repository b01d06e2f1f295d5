"""Small tables for the notebooks: what this machine offers, runs side by side, the exit table.

Each function returns a :class:`Table`, which a notebook shows as HTML and
``print`` shows as plain text; ``rows`` holds the plain data for tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence

from labkit.doctor import doctor_report
from labkit.table import Table
from labkit.trace import _format_ns
from labkit.viz.labels import BackendHint, Measured, resolve
from labkit.vmm.status import RunResult

__all__ = ["Table", "Skipped", "capability_table", "exit_table", "backends_to_compare", "runs_side_by_side"]

def capability_table(report: dict | None = None) -> Table:
    """What ``labkit doctor`` says about this machine, as a small table.

    ``report`` is ``labkit doctor --json``'s dict (default: probe this machine now).
    """
    if report is None:
        report = doctor_report()
    kvm = report["kvm"]
    if kvm["usable"]:
        kvm_text = f"usable, flavour {kvm['flavour']}"
        if kvm.get("explanation"):
            kvm_text += f": {kvm['explanation']}"
    else:
        kvm_text = f"not usable: {kvm['problem']}"
    rows = [
        ["KVM (/dev/kvm)", kvm_text],
        ["Unicorn (emulator)", report["unicorn"] or "missing"],
        ["Capstone (disassembler)", report["capstone"] or "missing"],
        ["GNU binutils (assembler)", report["binutils"] or "missing: Guest.from_asm cannot assemble"],
        ["backend='auto' picks", f"{report['auto']['backend']}: {report['auto']['reason']}"],
    ]
    note = ("To fix: " + "; ".join(report["fixes"])) if report.get("fixes") else ""
    return Table(f"This machine (labkit {report['labkit']}, Python {report['python']})",
                 ["what", "found"], rows, note)


def exit_table(data: Measured, backend: BackendHint = None) -> Table:
    """The exit table of a run: reason, count, share of all exits, mean host time per exit."""
    source = resolve(data, backend)
    trace = source.trace
    rows = [[row.reason, str(row.count), f"{row.share:.1%}", _format_ns(row.mean_host_ns)]
            for row in trace.summary()]
    note = source.label
    if trace.dropped:
        note += f"; {trace.dropped} exits counted but not kept (trace limit {trace.limit})"
    return Table(f"VM exits ({len(trace)} in all)", ["reason", "count", "share", "mean host time"], rows, note)


@dataclass(frozen=True)
class Skipped:
    """A backend that is not run here, and why."""

    backend: str
    reason: str


def backends_to_compare(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """Which backends a notebook can run side by side here: ``[(name, None or why it is skipped)]``.

    The emulator always runs.  KVM runs when it is usable, unless
    ``LABKIT_BACKEND=emu`` asks for emulation only (Binder sets it; the
    notebook tests set it to run every notebook as Binder would).
    """
    from labkit.backend import kvm_problem

    environ = os.environ if environ is None else environ
    kvm_skip = kvm_problem()
    if kvm_skip is None and environ.get("LABKIT_BACKEND") == "emu":
        kvm_skip = "KVM is usable here, but LABKIT_BACKEND=emu is set: this session uses emulation only (as on Binder)"
    return [("kvm", kvm_skip), ("emu", None)]


def runs_side_by_side(runs: Sequence[RunResult | Skipped], *, console_lines: int = 12) -> Table:
    """Runs of one guest next to each other: backend, status, console, run time, exits.

    Each item is a RunResult or a :class:`Skipped` (shown with its reason).
    """
    header, columns = [""], []
    for run in runs:
        if isinstance(run, Skipped):
            header.append(f"{run.backend}: skipped")
            columns.append(["skipped", run.reason, "", "", ""])
            continue
        source = resolve(run)
        header.append(source.short)
        console = run.console.splitlines()
        if len(console) > console_lines:
            console = console[:console_lines] + [f"... ({len(run.console.splitlines()) - console_lines} more lines)"]
        exits = ", ".join(f"{reason} {count}" for reason, count in run.exits.items()) or "none"
        columns.append([str(run.status), source.label, "\n".join(console),
                        f"{run.elapsed_s * 1e3:.2f} ms", exits])
    names = ["status", "measured on", "console", "run time (host)", "exits"]
    rows = [[name, *(column[index] for column in columns)] for index, name in enumerate(names)]
    return Table("The same guest on each backend", header, rows, code_rows=("console",))
