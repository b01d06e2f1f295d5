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
from labkit.trace import LABKIT_EVENTS, TABLE_COLUMNS, format_ns
from labkit.viz.labels import BackendHint, Measured, resolve
from labkit.vmm.status import RunResult

__all__ = ["Table", "Skipped", "ExitCosts", "capability_table", "exit_table", "exit_costs_of", "exit_cost_table",
           "backends_to_compare", "runs_side_by_side", "notebooks_table", "session_note", "agreement",
           "exit_costs_sentences"]

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
    """The exit table of a run: per reason, count, share and labkit's handling time (min, median, max, total).

    VM exits come first; labkit's own events (an interrupt it delivered, the
    time budget running out) follow under their own heading, since they are no
    exits.  The run's status is the result's, shown beside it, not an exit row.
    The last column is the host time since the previous record, which
    includes the guest's own execution (see :mod:`labkit.trace`).
    """
    source = resolve(data, backend)
    trace = source.trace
    rows: list[list[str]] = []
    summary = trace.summary()
    for kind, heading in ((True, None), (False, "labkit events, not VM exits:")):
        chosen = [row for row in summary if row.is_exit is kind]
        if chosen and heading:
            rows.append([heading, "", "", "", "", "", "", ""])
        for row in chosen:
            rows.append([row.reason, str(row.count), f"{row.share:.1%}", format_ns(row.handling_min_ns),
                         format_ns(row.handling_median_ns), format_ns(row.handling_max_ns),
                         format_ns(row.handling_total_ns), format_ns(row.since_previous_total_ns)])
    rows.append(["total", str(len(trace)), "", "", "", "", format_ns(trace.total_handling_ns()),
                 format_ns(trace.total_host_ns())])
    note = (f"{source.label}. handling = {TABLE_COLUMNS['handling']}. "
            f"since previous = {TABLE_COLUMNS['since_previous']}.")
    if trace.dropped:
        note += (f" {trace.dropped} exits counted but not kept (trace limit {trace.limit}); "
                 "min/median/max are of the kept ones.")
    header = ["reason", "count", "share", "handling min", "handling median", "handling max", "handling total",
              "since previous (total)"]
    return Table(f"VM exits ({trace.exit_count()}) and labkit events ({len(trace) - trace.exit_count()})",
                 header, rows, note)


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
        vm_exits, events = run.trace.by_kind()
        exits = ", ".join(f"{reason} {count}" for reason, count in vm_exits.items()) or "none"
        if events:
            exits += "; not exits: " + ", ".join(f"{reason} {count}" for reason, count in events.items())
        columns.append([str(run.status), source.label, "\n".join(console),
                        f"{run.elapsed_s * 1e3:.2f} ms", exits])
    names = ["status", "measured on", "console", "run time (host)", "exits"]
    rows = [[name, *(column[index] for column in columns)] for index, name in enumerate(names)]
    return Table("The same guest on each backend", header, rows, code_rows=("console",))


@dataclass(frozen=True)
class ExitCosts:
    """What one run's exits cost the host, from its trace: the numbers a notebook quotes."""

    label: str
    """What measured it ("measured on KVM (kvm_pvm)", ...)."""
    exits: int
    """VM exits (labkit's own events left out)."""
    first_since_start_ns: int
    """Host time from the run's start to the end of the first exit: it includes entering a new VM."""
    median_since_previous_ns: float
    """Median host time from one exit to the next, after the first: guest run + exit + handling."""
    median_handling_ns: float
    """Median of labkit's handling time per exit."""
    handling_share: float
    """labkit's handling as a share of the whole run's host time."""


def exit_costs_of(run: Measured, backend: BackendHint = None) -> ExitCosts:
    """The :class:`ExitCosts` of one run (a RunResult, or an ExitTrace with ``backend``)."""
    import statistics

    source = resolve(run, backend)
    trace = source.trace
    kept = [(record, handling) for record, handling in zip(trace.records, trace.handling)
            if record[0] not in LABKIT_EVENTS]
    if not kept:
        return ExitCosts(source.label, 0, 0, 0.0, 0.0, 0.0)
    since = [record[6] for record, _ in kept]
    return ExitCosts(source.label, trace.exit_count(), since[0],
                     statistics.median(since[1:] or since), statistics.median(handling for _, handling in kept),
                     trace.total_handling_ns() / (trace.total_host_ns() or 1))


def exit_cost_table(runs: Sequence[Measured]) -> Table:
    """Per run: its exits, the first one's time, the median time from exit to exit and labkit's handling."""
    rows = []
    for run in runs:
        costs = exit_costs_of(run)
        rows.append([costs.label, str(costs.exits), format_ns(costs.first_since_start_ns),
                     format_ns(costs.median_since_previous_ns), format_ns(costs.median_handling_ns),
                     f"{costs.handling_share:.0%}"])
    header = ["measured on", "VM exits", "first exit (from the start)", "median from one exit to the next",
              "median labkit handling", "handling's share of the run"]
    note = (f"from one exit to the next = {TABLE_COLUMNS['since_previous']}; "
            f"labkit handling = {TABLE_COLUMNS['handling']}.")
    return Table("What the exits cost", header, rows, note)


def notebooks_table(directory: str | os.PathLike[str] = ".") -> Table:
    """The lab's notebooks in ``directory`` (``NN-name.ipynb``), each with the title of its first heading.

    A notebook lists what comes next from this, so it names only notebooks that exist.
    """
    import json
    from pathlib import Path

    rows = []
    for path in sorted(Path(directory).glob("[0-9][0-9]-*.ipynb")):
        try:
            cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
        except (OSError, ValueError) as error:
            rows.append([path.name, f"(cannot read it: {error})"])
            continue
        first = next((cell for cell in cells if cell.get("cell_type") == "markdown"), None)
        source = "".join(first["source"]) if first else ""
        title = next((line.lstrip("#").strip() for line in source.splitlines() if line.startswith("#")), "")
        rows.append([path.name, title])
    return Table("The notebooks of this lab", ["notebook", "title"], rows)


def session_note(environ: Mapping[str, str] | None = None) -> str:
    """Markdown: the backends this session runs, why any other is not run, and what ``auto`` picks."""
    from labkit.backend import choose_backend

    run, skipped = [], []
    for backend, why_not in backends_to_compare(environ):
        if why_not:
            skipped.append(f"{backend} is not run here ({why_not}). ")
        else:
            run.append(backend)
    choice = choose_backend()
    return (f"backends run: {', '.join(run)}. " + "".join(skipped)
            + f"main backend of this session: **{choice.name}** ({choice.reason}).")


def agreement(results: Mapping[str, RunResult], columns: Sequence[RunResult | Skipped]) -> str:
    """Markdown: which backends ran one guest, and whether console and exits agree (or why there is one only)."""
    outputs = {backend: (result.console, result.exits) for backend, result in results.items()}
    ran = "backends run: " + ", ".join(outputs) + "."
    if len(outputs) > 1:
        if len(set(map(repr, outputs.values()))) == 1:
            return f"{ran} They agree: the same console output and the same exits."
        return f"{ran} They **disagree**: the console output or the exits differ (see the table above)."
    skipped = "; ".join(column.reason for column in columns if isinstance(column, Skipped))
    return f"{ran} Only one backend ran in this session ({skipped}), so there is nothing to compare here."


def exit_costs_sentences(runs: Sequence[Measured]) -> str:
    """Markdown: per run, its exits, the first one's time, the median from one exit to the next and the handling."""
    lines = []
    for run in runs:
        costs = exit_costs_of(run)
        lines.append(f"* **{costs.label}**: {costs.exits} exits. The first ended {format_ns(costs.first_since_start_ns)} "
                     f"after the start; after it, one exit followed the previous one every "
                     f"{format_ns(costs.median_since_previous_ns)} (median), of which labkit's handling took "
                     f"{format_ns(costs.median_handling_ns)}.")
    return "In the run you just made:\n\n" + "\n".join(lines)
