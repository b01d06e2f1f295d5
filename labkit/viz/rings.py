"""Figures and tables for protection rings: the ring a guest's CPU is in over time, and instruction verdicts.

:func:`ring_timeline` draws the CPL (0 or 3) of a ``rings64`` run as a step
line over host time, one labelled marker per kernel entry, from the events
the guest kernel reported (:func:`labkit.rings.ring_events`).
:func:`ring_event_table` lists the same events with the instruction at each
RIP.  :func:`classification_table` shows :func:`labkit.classify.classify`
results, one column per backend, beside the paper's verdict.
"""

from __future__ import annotations

import textwrap
from dataclasses import replace
from typing import TYPE_CHECKING, Mapping, Sequence

from labkit.classify.rules import Classification, Verdict
from labkit.errors import ConfigError
from labkit.table import Table
from labkit.viz.exits import TIME_UNITS, _new_axes, pick_time_unit
from labkit.viz.labels import BackendHint, Measured, resolve
from labkit.x86.arch import Vector

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure, SubFigure

    from labkit.guest import Guest

ENTRY_COLOURS = {"#GP": "#d62728", "#PF": "#ff7f0e", "#UD": "#9467bd", "int 0x80": "#1f77b4",
                 "syscall": "#2ca02c", "exit": "#7f7f7f"}


def _colour(short: str) -> str:
    return ENTRY_COLOURS.get(short.split(" ")[0] if short.startswith("#") else short, "#8c564b")


def ring_timeline(result: Measured, backend: BackendHint = None, ax: Axes | None = None, *, guest: str = "rings64",
                  unit: str | None = None) -> Figure | SubFigure:
    """The ring (CPL) of the guest's CPU over host time, each kernel entry labelled.

    ``result`` is the RunResult of a ``rings64`` run (``labkit.rings.run_rings``).
    Time runs from the kernel's start-up report to each event's report (an MMIO
    exit); between two reports the guest ran without exits.  Returns the Figure.
    """
    from labkit.rings import ring_events

    source = resolve(result, backend)
    events = ring_events(source.trace)
    # Time 0 is the kernel's start-up report: its set-up before that (building the IDT, ...) is left out.
    start = events[0].host_ns if events and events[0].kind == "start" else 0
    total = max(source.trace.total_host_ns(), events[-1].host_ns if events else 0) - start
    events = [replace(event, host_ns=event.host_ns - start) for event in events]
    if unit is None:
        unit = pick_time_unit(total)
    if unit not in TIME_UNITS:
        raise ConfigError(f"unit must be one of {', '.join(TIME_UNITS)}, not {unit!r}")
    scale = TIME_UNITS[unit]
    figure, ax = _new_axes(ax, (9.0, 3.4))
    if not events:
        ax.text(0.5, 0.5, "no ring events reported (is this a rings64 run?)", transform=ax.transAxes,
                ha="center", va="center")
    else:
        xs, ys = [0.0], [0]
        for event in events:
            xs.append(event.host_ns / scale)
            ys.append(event.cpl_after)
        xs.append(total / scale)
        ys.append(ys[-1])
        ax.step(xs, ys, where="post", color="#444444", linewidth=1.4)
        seen: set[str] = set()
        for index, event in enumerate(e for e in events if e.kind in ("entry", "syscall", "exit")):
            short = "exit" if event.kind == "exit" else event.short_label
            key = short.split(" ")[0] if short.startswith("#") else short
            ax.scatter([event.host_ns / scale], [0], s=46, zorder=3, color=_colour(short),
                       label=None if key in seen else key)
            seen.add(key)
            ax.annotate(short, (event.host_ns / scale, 0), xytext=(0, -12 - 9 * (index % 4)),
                        textcoords="offset points", ha="center", va="top", fontsize=7, color=_colour(short))
        ax.legend(loc="upper left", fontsize=8, ncols=min(len(seen), 6), frameon=False,
                  bbox_to_anchor=(0.0, 1.0))
    ax.set_yticks([0, 3], ["ring 0\n(kernel)", "ring 3\n(task)"])
    ax.set_ylim(-2.3, 4.2)
    ax.set_xlim(left=0, right=max(total / scale, 1e-9) * 1.02)
    since = "the kernel's start-up report" if start else "the run started"
    ax.set_xlabel(f"host time since {since} ({unit})")
    if start:
        ax.text(0.995, 0.98, f"kernel set-up before it: {start / scale:.0f} {unit}", transform=ax.transAxes,
                ha="right", va="top", fontsize=8, color="#444444")
    ax.set_ylabel("CPL (privilege level)")
    ax.set_title(f"Ring transitions over time: {guest}\n" + textwrap.fill(source.label, 80), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return figure


def ring_event_table(result: Measured, guest: Guest | None = None) -> Table:
    """The kernel's events of a ``rings64`` run: time, event, ring, RIP and the instruction there, #PF decoded."""
    from labkit.rings import decode_page_fault_error, ring_events, rings_guest
    from labkit.x86.disasm import disassemble

    guest = guest if guest is not None else rings_guest()
    source = resolve(result, None)
    rows = []
    for event in ring_events(source.trace):
        offset = event.rip - guest.load_address
        instruction = ""
        if 0 <= offset < len(guest.code):
            decoded = disassemble(guest.code[offset:offset + 15], event.rip, 64, count=1)
            instruction = decoded[0][2] if decoded else ""
        detail = ""
        if event.kind == "entry" and event.vector == Vector.PF:
            detail = f"cr2 {event.cr2:#x}: {decode_page_fault_error(event.error_code)}"
        elif event.kind == "entry" and event.vector == Vector.GP:
            detail = f"error code {event.error_code:#x}"
        rows.append([str(event.seq), f"{event.host_ns / 1e3:.1f}", event.label, f"{event.rip:#x}",
                     instruction, detail])
    return Table(f"Ring transitions reported by the kernel ({source.label})",
                 ["#", "host time (µs)", "event", "RIP", "instruction at RIP", "details"], rows)


def classification_table(results: Mapping[str, Sequence[Classification]], *, names: Sequence[str] | None = None,
                         paper: Verdict | str | None = None) -> Table:
    """Verdicts side by side: one row per instruction, one verdict column per backend, the paper's beside them.

    ``results`` maps a column heading (``"emulator"``, ``"KVM (kvm_pvm)"``) to
    equally long lists of :class:`labkit.classify.Classification`.  ``names``
    labels the rows (default: the instructions); ``paper`` is the reference
    verdict shown in its own column.
    """
    columns = list(results)
    if not columns:
        raise ConfigError("classification_table needs at least one backend's results")
    lengths = {len(results[column]) for column in columns}
    if len(lengths) != 1:
        raise ConfigError(f"every backend needs the same number of results, got {sorted(lengths)}")
    count = lengths.pop()
    if names is not None and len(names) != count:
        raise ConfigError(f"{count} results but {len(names)} names")
    header = ["instruction", "run as"] + (["paper"] if paper else []) + \
        [f"verdict: {column}" for column in columns] + [f"evidence ({columns[0]})"] + \
        ([f"evidence ({column})" for column in columns[1:]])
    rows = []
    for index in range(count):
        first = results[columns[0]][index]
        name = names[index] if names is not None else first.instruction
        setup = "\nafter setup: " + first.setup.replace("\n", "; ") if first.setup else ""
        row = [name, f"{first.instruction} ({first.mode}-bit){setup}"]
        if paper:
            row.append(str(paper))
        for column in columns:
            verdict = results[column][index].verdict
            text = str(verdict)
            if paper and verdict == Verdict.UNDETERMINED:
                text += " (no ring-0 run here)"
            elif paper and verdict == Verdict.HOST_DEPENDENT:
                text += " (ring 3 saw the host's values)"
            elif paper and verdict != paper:
                text += "  ≠ paper"
            row.append(text)
        for column in columns:
            row.append(_evidence(results[column][index]))
        rows.append(row)
    return Table("Instructions classified by running them in ring 0 and ring 3", header, rows,
                 note="Only the 'paper' column is typed in (Robin & Irvine 2000); every verdict was measured.")


def _evidence(result: Classification) -> str:
    text = result.differences[0] if result.differences else result.reason
    if result.umip:
        text += f"\nUMIP: {result.umip}"
    for note in result.notes[:1]:
        text += f"\nnote: {note}"
    for evidence in result.host:
        text += f"\nfrom the host ({evidence.kind}): {evidence.evidence}"
    return text
