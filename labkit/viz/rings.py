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
from labkit.viz.exits import TIME_UNITS, pick_time_unit
from labkit.viz.labels import BackendHint, Measured, resolve
from labkit.viz.style import TEXT_PT, TITLE_PT, finish, new_figure, renderer_of
from labkit.x86.arch import Vector

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure, SubFigure

    from labkit.guest import Guest
    from labkit.rings import RingEvent
    from labkit.vmm.status import RunResult

ENTRY_COLOURS = {"#GP": "#d62728", "#PF": "#ff7f0e", "#UD": "#9467bd", "int 0x80": "#1f77b4",
                 "syscall": "#2ca02c", "exit": "#7f7f7f"}


def _colour(short: str) -> str:
    return ENTRY_COLOURS.get(short.split(" ")[0] if short.startswith("#") else short, "#8c564b")


LANE_ROW_IN = 0.3
"""Height of one row of labels under a ring timeline (inches)."""


def label_rows(ax: Axes, xs: Sequence[float], texts: Sequence[str], fontsize: float) -> list[int]:
    """A row for each label so that no two labels in one row overlap: each goes to the first row with room.

    Widths come from the figure's renderer with ``ax`` laid out as it is now;
    neighbours in a row keep a gap of about one character.
    """
    renderer = renderer_of(ax.figure)
    ends: list[float] = []
    rows = []
    for x, text in zip(xs, texts):
        probe = ax.text(x, 0, text, fontsize=fontsize, ha="center")
        box = probe.get_window_extent(renderer)
        probe.remove()
        gap = fontsize * renderer.dpi / 72 * 0.6
        row = next((index for index, end in enumerate(ends) if box.x0 - gap > end), len(ends))
        if row == len(ends):
            ends.append(box.x1)
        else:
            ends[row] = box.x1
        rows.append(row)
    return rows


def ring_timeline(result: Measured, backend: BackendHint = None, ax: Axes | None = None, *, guest: str = "rings64",
                  unit: str | None = None) -> Figure | SubFigure:
    """The ring (CPL) of the guest's CPU over host time, each kernel entry marked and named.

    ``result`` is the RunResult of a ``rings64`` run (``labkit.rings.run_rings``).
    Time runs from the kernel's start-up report to each event's report (an MMIO
    exit); between two reports the guest ran without exits.  A return that
    faulted (PVM's ``sysretq``) draws no time in ring 3.  Each entry is a dot
    in the ring it came from; its name sits below the axes, in as many rows as
    keep the names apart (only the dots' colours when drawn into a given
    ``ax``).  Returns the Figure.
    """
    from matplotlib.figure import Figure

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
    marked = [event for event in events if event.kind in ("entry", "syscall", "exit")]
    shorts = ["exit" if event.kind == "exit" else event.short_label for event in marked]
    lane: Axes | None = None
    figure: Figure | SubFigure
    if ax is None:
        figure = new_figure(7.8, 3.6)
        ax, lane = figure.subplots(2, 1, sharex=True, height_ratios=(2.6, LANE_ROW_IN))
    else:
        figure = ax.figure
    ax.set_xlim(left=0, right=max(total / scale, 1e-9) * 1.02)
    if not events:
        ax.text(0.5, 0.5, "no ring events reported (is this a rings64 run?)", transform=ax.transAxes,
                ha="center", va="center", fontsize=TEXT_PT)
    else:
        xs, ys = [0.0], [0]
        for event in events:
            xs.append(event.host_ns / scale)
            ys.append(event.cpl_after)
        xs.append(total / scale)
        ys.append(ys[-1])
        ax.step(xs, ys, where="post", color="#444444", linewidth=1.6)
        seen: dict[str, str] = {}
        for event, short in zip(marked, shorts):
            key = short.split(" ")[0] if short.startswith("#") else short
            ax.scatter([event.host_ns / scale], [0 if event.kind == "exit" else event.from_cpl], s=60, zorder=3, color=_colour(short),
                       edgecolors="white", linewidths=0.6)
            seen.setdefault(key, _colour(short))
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], linestyle="none", marker="o", markersize=8, color=colour, label=key)
                   for key, colour in seen.items()]
        ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=min(len(handles), 6),
                  frameon=False, fontsize=TEXT_PT, borderaxespad=0.2, handletextpad=0.2, columnspacing=1.0)
    ax.set_yticks([0, 3], ["ring 0\n(kernel)", "ring 3\n(task)"])
    ax.set_ylim(-0.6, 3.6)
    since = "the kernel's start-up report" if start else "the run started"
    ax.set_ylabel("CPL")
    set_up = f"; kernel set-up before time 0: {start / scale:.0f} {unit}" if start else ""
    title = f"Ring transitions over time: {guest}\n" + textwrap.fill(source.label + set_up, 70)
    ax.grid(axis="x", alpha=0.3)
    if lane is None:
        ax.set_title(title, fontsize=TITLE_PT)
        ax.set_xlabel(f"host time since {since} ({unit})")
        finish(ax)
        return figure
    figure.suptitle(title, fontsize=TITLE_PT)
    finish(ax)
    lane.set_xlabel(f"host time since {since} ({unit}); the names of the dots above")
    lane.set_yticks([])
    for side in ("left", "right", "top"):
        lane.spines[side].set_visible(False)
    finish(lane)
    rows = label_rows(lane, [event.host_ns / scale for event in marked], shorts, TEXT_PT)
    count = max(rows) + 1 if rows else 1
    for event, short, row in zip(marked, shorts, rows):
        lane.text(event.host_ns / scale, -row, short, ha="center", va="center", fontsize=TEXT_PT,
                  color=_colour(short))
    lane.set_ylim(-count + 0.5, 0.5)
    grid = ax.get_gridspec()
    if isinstance(figure, Figure) and grid is not None:
        figure.set_size_inches(7.8, 3.6 + LANE_ROW_IN * (count - 1))
        grid.set_height_ratios((2.6, LANE_ROW_IN * count))
    return figure


def ring_event_table(result: Measured, guest: Guest | None = None) -> Table:
    """The kernel's events of a ``rings64`` run: time, event, the ring change, the instruction that caused it.

    A fault's instruction is the one at the saved RIP; a trap's (``int 0x80``,
    ``syscall``) is the one just before it, since the CPU saves the address of
    the next instruction; a return shows where the task resumes.
    """
    from labkit.rings import decode_page_fault_error, instruction_of, ring_events, rings_guest

    guest = guest if guest is not None else rings_guest()
    source = resolve(result, None)
    rows = []
    for event in ring_events(source.trace):
        found = instruction_of(event, guest.code, guest.load_address)
        where = f"{found[0]:#x}  {found[1]}" if found else f"{event.rip:#x}"
        if event.kind == "return":
            where = ("resumes at " if event.completed else "would resume at ") + where
        detail = ""
        if event.kind == "entry" and event.vector == Vector.PF:
            detail = f"cr2 {event.cr2:#x}: {decode_page_fault_error(event.error_code)}"
        elif event.kind == "entry" and event.vector == Vector.GP:
            detail = f"error code {event.error_code:#x}"
        if event.is_trap:
            detail = (detail + "; " if detail else "") + f"a trap: the CPU saved RIP {event.rip:#x}, the next instruction"
        if event.kind == "return" and not event.completed:
            detail = "the return instruction faulted: the next entry comes from ring 0"
        rows.append([str(event.seq), f"{event.host_ns / 1e3:.1f}", event.label, _ring_change(event), where, detail])
    return Table(f"Ring transitions reported by the kernel ({source.label})",
                 ["#", "host time (µs)", "event", "ring", "instruction (address)", "details"], rows)


def _ring_change(event: RingEvent) -> str:
    if event.kind == "start":
        return "0"
    if event.kind == "return":
        return "0 → 3" if event.completed else "stays 0"
    return f"{event.from_cpl} → 0"


def ring_runs_table(results: Mapping[str, RunResult]) -> Table:
    """``rings64`` runs side by side: per backend its status, console, kernel events and exits."""
    from labkit.rings import ring_events

    rows = []
    for result in results.values():
        source = resolve(result, None)
        vm_exits, _events = source.trace.by_kind()
        rows.append([source.short, str(result.status), result.console.rstrip("\n"), str(len(ring_events(result))),
                     ", ".join(f"{reason} {count}" for reason, count in vm_exits.items()) or "none"])
    return Table("rings64 on each backend", ["measured on", "status", "console", "kernel events", "VM exits"], rows)


def kernel_entries_table(results: Mapping[str, RunResult], guest: Guest | None = None) -> Table:
    """How the kernel was entered, one row per instruction of the task, one column per backend.

    Rows are the instructions that caused an entry (:func:`labkit.rings.instruction_of`)
    in the order the task ran them; a cell says how that instruction entered
    the kernel on that backend, or that it did not.
    """
    from labkit.rings import instruction_of, ring_events, rings_guest

    guest = guest if guest is not None else rings_guest()
    cells: dict[str, dict[tuple[int, str], list[str]]] = {}
    for result in results.values():
        column = cells.setdefault(resolve(result, None).short, {})
        for event in ring_events(result):
            if event.kind not in ("entry", "syscall"):
                continue
            found = instruction_of(event, guest.code, guest.load_address) or (event.rip, "?")
            column.setdefault(found, []).append(event.label)
    # One order for all columns: the longest column's, with each other column's extra rows after their predecessor.
    columns = sorted(cells.values(), key=len, reverse=True)
    order = list(columns[0]) if columns else []
    for column in columns[1:]:
        previous = -1
        for key in column:
            if key in order:
                previous = order.index(key)
            else:
                previous += 1
                order.insert(previous, key)
    header = ["instruction (address)", *cells]
    rows = [[f"{text} ({address:#x})", *("; ".join(cells[column].get((address, text), [])) or "no entry"
                                         for column in cells)]
            for address, text in order]
    return Table("How each instruction of the task entered the kernel", header, rows)


def entries_differ(table: Table) -> list[str]:
    """The instructions of a :func:`kernel_entries_table` whose cells differ between backends."""
    return [row[0] for row in table.rows if len(set(row[1:])) > 1]


def entries_verdict(table: Table) -> str:
    """One Markdown sentence on a :func:`kernel_entries_table`: one backend, the same entries, or where they differ."""
    columns = table.header[1:]
    if len(columns) < 2:
        only = columns[0] if columns else "one backend"
        return (f"Only {only} ran in this session, so there is no second backend to compare with; on a PVM host "
                "the KVM column shows the #UD and the extra #GP described above.")
    differ = entries_differ(table)
    if not differ:
        return "The kernel was entered the same way on every backend."
    return (f"The kernel was entered **differently** at {len(differ)} of {len(table.rows)} instructions: "
            + ", ".join(f"`{name}`" for name in differ) + ". These are the ones described above.")


def verdict_sentences(results: Sequence[Classification]) -> str:
    """A Markdown bullet per backend: the instruction, its verdict in bold, and why."""
    return "\n".join(f"* **{result.backend_label}**: `{result.instruction}` ({result.mode}-bit) is "
                     f"**{result.verdict.value}**: {result.reason}" for result in results)


def paper_agreement(tables: Mapping[str, Sequence[Classification]], paper: Verdict | str) -> str:
    """A Markdown bullet per backend: how many rows match the paper's verdict, and how many could not be decided."""
    lines = []
    for label, table in tables.items():
        agree = sum(result.verdict == paper for result in table)
        unknown = sum(result.verdict == Verdict.UNDETERMINED for result in table)
        lines.append(f"* matches the paper on {label}: {agree} of {len(table)}"
                     + (f"; {unknown} undetermined (their ring-0 run cannot run here)" if unknown else ""))
    return "\n".join(lines)


def page_fault_table(result: Measured, guest: Guest | None = None) -> Table:
    """The #PF entries of a ``rings64`` run: the instruction, CR2 and the error code's bits decoded (SDM vol. 3, 4.7)."""
    from labkit.rings import decode_page_fault_error, instruction_of, ring_events, rings_guest
    from labkit.x86 import paging

    guest = guest if guest is not None else rings_guest()
    source = resolve(result, None)
    rows = []
    for event in ring_events(source.trace):
        if event.kind != "entry" or event.vector != Vector.PF:
            continue
        found = instruction_of(event, guest.code, guest.load_address)
        code = event.error_code
        rows.append([found[1] if found else f"{event.rip:#x}", f"{event.cr2:#010x}", f"{code:#x}",
                     str(int(bool(code & paging.PF_PRESENT))), str(int(bool(code & paging.PF_WRITE))),
                     str(int(bool(code & paging.PF_USER))), decode_page_fault_error(code)])
    return Table(f"Page faults the kernel saw ({source.label})",
                 ["instruction", "CR2", "error code", "P (bit 0)", "W/R (bit 1)", "U/S (bit 2)", "meaning"], rows)


def umip_table(tables: Mapping[str, Sequence[Classification]], names: Sequence[str]) -> Table:
    """What setting CR4.UMIP did, per instruction (rows with a UMIP run) and backend (columns)."""
    columns = list(tables)
    groups: dict[tuple[str, ...], list[str]] = {}
    for index, name in enumerate(names):
        if not any(tables[column][index].umip for column in columns):
            continue
        groups.setdefault(tuple(tables[column][index].umip or "not tried" for column in columns), []).append(name)
    rows = [[", ".join(group), *cells] for cells, group in groups.items()]  # instructions with equal results: one row
    return Table("With CR4.UMIP = 1 (user-mode instruction prevention, CR4 bit 11)", ["instructions", *columns], rows)


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
        rows.append(row)
    notes: list[str] = []
    for column in columns:
        evidence = [_evidence(results[column][index]) for index in range(count)]
        repeated = [line for line in dict.fromkeys(line for lines in evidence for line in lines[1:])
                    if sum(line in lines for lines in evidence) > 1]
        for row, lines in zip(rows, evidence):
            cell = []
            for line in lines:
                if line in repeated:
                    if line not in notes:
                        notes.append(line)
                    line = f"[{notes.index(line) + 1}]"
                cell.append(line)
            row.append("\n".join(cell))
    footnotes = "".join(f" [{number}] {text}" for number, text in enumerate(notes, start=1))
    return Table("Instructions classified by running them in ring 0 and ring 3", header, rows,
                 note="Only the 'paper' column is typed in (Robin & Irvine 2000); every verdict was measured."
                      + footnotes)


def _evidence(result: Classification) -> list[str]:
    """The evidence cell's lines: the first difference (or the reason), then UMIP and the first note."""
    lines = [result.differences[0] if result.differences else result.reason]
    if result.umip:
        lines.append(f"UMIP: {result.umip}")
    lines.extend(f"note: {note}" for note in result.notes[:1])
    lines.extend(f"from the host ({evidence.kind}): {evidence.evidence}" for evidence in result.host)
    return lines
