"""Figures for notebook 07: a fleet's per-VM status grid and timeline, guest-physical memory maps, the scan.

    >>> from labkit.viz.isolation import status_grid, memory_maps, scan_figure
    >>> status_grid(run)        # run: labkit.isolation.run_containment(...)
    >>> memory_maps(run)        # each VM's guest-physical map, where it faulted marked
    >>> scan_figure(isolation)  # isolation: labkit.isolation.memory_isolation(...)

Every figure says what measured it (KVM and its flavour, or the emulator) and follows
:mod:`labkit.viz.style` (8 in wide at most, 150 dpi, 11-point text or larger): panels are stacked,
and a fleet's memory maps are one row per VM.
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

from labkit.errors import ConfigError
from labkit.isolation import ContainmentRow, ContainmentRun, MemoryIsolation
from labkit.viz.labels import label
from labkit.viz.style import MAX_WIDTH_IN, MIN_FONT_PT, new_figure, readable_fonts
from labkit.vmm.status import RunResult, StatusKind
from labkit.x86 import layout

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure

FONT_SIZE = MIN_FONT_PT
ROW_IN = 0.34
"""Height of one VM's row (a bar and its 11-pt label) in the timeline and the memory maps."""
STATUS_COLOURS = {
    StatusKind.HALTED: "#2ca02c", StatusKind.EXITED: "#98df8a", StatusKind.SHUTDOWN: "#d62728",
    StatusKind.FAULT: "#ff7f0e", StatusKind.TIMEOUT: "#9467bd", StatusKind.ERROR: "#8c564b",
    StatusKind.PAUSED: "#7f7f7f", StatusKind.RUNNING: "#1f77b4",
}
"""One colour per way a VM ends (running: blue, while a live grid is drawn)."""
ADDRESS_TICKS = ((1 << 8, "256 B"), (1 << 12, "4 KiB"), (1 << 20, "1 MiB"), (1 << 30, "1 GiB"), (1 << 40, "1 TiB"), (1 << 47, "128 TiB"))


def _measured(run: ContainmentRun) -> str:
    for row in run.rows:
        if row.outcome.result is not None:
            return label(row.outcome.result)
    return f"measured on {run.backend}"


def _legend(figure: Figure, kinds: list[StatusKind]) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=STATUS_COLOURS[kind], label=kind.value) for kind in kinds]
    figure.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4))


def status_grid(run: ContainmentRun, columns: int = 4) -> Figure:
    """Top: one cell per VM, coloured by how it ended, with the fault injected; below: when each VM ran.

    The reasons, one per VM, are in ``run.table()`` (a figure cell has no room for them).
    """
    from matplotlib.patches import Rectangle

    if not run.rows:
        raise ConfigError("status_grid needs a run with at least one VM")
    rows = list(run.rows)
    count = len(rows)
    lines = -(-count // columns)
    grid_in, timeline_in = 0.95 * lines + 0.4, ROW_IN * count + 1.0
    with readable_fonts(FONT_SIZE):
        figure = new_figure(MAX_WIDTH_IN, grid_in + timeline_in + 1.5)
        grid, timeline = figure.subplots(2, 1, height_ratios=(grid_in, timeline_in))
        for index, row in enumerate(rows):
            x, y = index % columns, lines - 1 - index // columns
            status = row.outcome.status
            grid.add_patch(Rectangle((x + 0.04, y + 0.06), 0.92, 0.88, color=STATUS_COLOURS[status]))
            kind = "healthy" if not row.faulty else row.kind
            grid.text(x + 0.5, y + 0.5, f"{row.name}\n{kind}\n{status.value}", ha="center", va="center",
                      fontsize=FONT_SIZE)
        grid.set_xlim(0, columns)
        grid.set_ylim(0, lines)
        grid.set_aspect("auto")
        grid.axis("off")
        grid.set_title(f"{count} VMs: how each one ended")

        order = sorted(rows, key=lambda r: r.name, reverse=True)
        # A VM that ended at once still gets a bar a few pixels long: 1/150 of the time shown.
        shortest = max([run.timeout] + [r.outcome.ended_s for r in rows]) / 150
        for position, row in enumerate(order):
            o = row.outcome
            if o.created_s and o.started_s - o.created_s >= shortest:  # shorter: not drawn, as it could not be seen
                timeline.barh(position, o.started_s - o.created_s, left=o.created_s, color="#dddddd", height=0.7)
            timeline.barh(position, max(o.ended_s - o.started_s, shortest), left=o.started_s, height=0.7,
                          color=STATUS_COLOURS[o.status])
        timeline.set_yticks(range(len(order)), [f"{r.name} ({'ok' if not r.faulty else r.kind})" for r in order])
        timeline.axvline(run.timeout, color="black", linestyle=":", linewidth=1.5)
        timeline.text(run.timeout, len(order) - 0.4, " timeout", va="bottom", fontsize=FONT_SIZE)
        timeline.set_xlabel("seconds since the fleet started (grey: machine being created)")
        timeline.set_title("When each VM ran")
        timeline.set_ylim(-0.6, len(order) + 0.4)
        _legend(figure, [kind for kind in STATUS_COLOURS if any(r.outcome.status is kind for r in rows)])
        figure.suptitle(f"Fault containment: {count} VMs at once on {run.backend}\n"
                        + textwrap.fill(_measured(run), 80))
    return figure


def _address_axis(axes: Axes, top: int, along: str = "y") -> None:
    """Guest-physical addresses from 256 B to ``top`` on a log axis (``along`` the x or the y axis)."""
    axis: Axis
    if along == "x":
        axis = axes.xaxis
        axes.set_xscale("log", base=2)
        axes.set_xlim(1 << 8, top)
    else:
        axis = axes.yaxis
        axes.set_yscale("log", base=2)
        axes.set_ylim(1 << 8, top)
    ticks = [(value, name) for value, name in ADDRESS_TICKS if value <= top]
    axis.set_ticks([value for value, _ in ticks], [name for _, name in ticks])
    axes.minorticks_off()
    axis.set_label_text("guest-physical address (log scale)")


def _ended_at(row: ContainmentRow) -> tuple[int, str] | None:
    """Where a VM's run ended: CR2 for a #PF, else the RIP it stopped at (None without a result)."""
    result = row.outcome.result
    if result is None:
        return None
    fault = result.status.fault
    if fault is not None and fault.cr2 is not None:
        return fault.cr2, "cr2"
    if fault is not None:
        return fault.rip, "rip"
    return result.regs.rip, "rip"


def _mmio_addresses(row: ContainmentRow) -> list[int]:
    """The guest-physical addresses of the MMIO exits kept in a VM's trace (its accesses above RAM)."""
    result = row.outcome.result
    if result is None:
        return []
    return [record.address for record in result.trace if record.reason == "MMIO" and record.address is not None]


def memory_maps(run: ContainmentRun, memory: int = layout.DEFAULT_MEMORY) -> Figure:
    """Each VM's guest-physical address space, one row per VM: RAM, the MMIO hole above it (mapped, no RAM:
    every access an exit), what the page tables do not map; the MMIO exits its trace kept (blue ticks: the
    wild writer's stores above RAM); and where the VM ended (X: CR2 of a #PF, dot: the RIP it stopped at),
    coloured by its status."""
    from matplotlib.patches import Patch

    rows = list(run.rows)
    if not rows:
        raise ConfigError("memory_maps needs a run with at least one VM")
    top = 1 << 48
    with readable_fonts(FONT_SIZE):
        figure = new_figure(MAX_WIDTH_IN, ROW_IN * 1.4 * len(rows) + 3.4)
        axes = figure.subplots()
        for index, row in enumerate(rows):
            axes.barh(index, memory - (1 << 8), left=1 << 8, height=0.7, color="#c7e9c0", edgecolor="#2ca02c")
            axes.barh(index, layout.MAPPED_LIMIT - memory, left=memory, height=0.7, color="#eeeeee",
                      edgecolor="#999999", hatch="//")
            axes.barh(index, top - layout.MAPPED_LIMIT, left=layout.MAPPED_LIMIT, height=0.7, color="white",
                      edgecolor="#cccccc")
            accesses = _mmio_addresses(row)
            if accesses:
                axes.scatter(accesses, [index] * len(accesses), s=30, marker="|", color="#1f77b4", alpha=0.6,
                             zorder=2)
            ended = _ended_at(row)
            if ended is not None:
                address, what = ended
                shown = min(max(address, 1 << 8), top - 1)
                axes.scatter(shown, index, s=120, marker="X" if what == "cr2" else "o",
                             color=STATUS_COLOURS[row.outcome.status], edgecolor="black", zorder=3)
        axes.set_yticks(range(len(rows)), [f"{r.name} ({'ok' if not r.faulty else r.kind})" for r in rows],
                        fontsize=FONT_SIZE)
        axes.set_ylim(len(rows) - 0.4, -0.9)  # the first VM on top, room above it for the 1 GiB note
        _address_axis(axes, top, along="x")
        axes.axvline(layout.MAPPED_LIMIT, color="black", linewidth=1)
        axes.text(layout.MAPPED_LIMIT / 1.3, -0.6, "1 GiB: the page tables end (#PF above) ", ha="right",
                  va="center", fontsize=FONT_SIZE)
        axes.set_title("Each VM's own guest-physical address space; marker: where it ended\n"
                       "(X: CR2 of its #PF, dot: RIP)")
        figure.legend(handles=[Patch(facecolor="#c7e9c0", edgecolor="#2ca02c", label="its RAM"),
                               Patch(facecolor="#eeeeee", edgecolor="#999999", hatch="//",
                                     label="mapped, no RAM: MMIO exit"),
                               Patch(facecolor="white", edgecolor="#cccccc", label="not mapped: #PF"),
                               Patch(color="#1f77b4", label="MMIO exits in its trace"),
                               *[Patch(color=STATUS_COLOURS[k], label=k.value) for k in STATUS_COLOURS
                                 if any(r.outcome.status is k for r in rows)]],
                      loc="outside lower center", ncol=3)
        figure.suptitle(f"Guest-physical memory maps of {len(rows)} VMs\n" + textwrap.fill(_measured(run), 80))
    return figure


def scan_figure(isolation: MemoryIsolation) -> Figure:
    """Top: VM A's and VM B's guest-physical maps, what A filled and what B read (RAM qword by qword,
    above RAM one read per stride, the #PF at 1 GiB), the legend beside them.  Below: both VMs' RAM in
    the host's address space (their host mappings), one row per VM, labelled with the process that
    holds it."""
    scan = isolation.scan
    memory = isolation.memory
    mappings = [(vm, m) for vm, ms in isolation.mappings.items() for m in ms]
    with readable_fonts(FONT_SIZE):
        figure = new_figure(MAX_WIDTH_IN, 5.2 + 0.7 * len(mappings) + 1.6)
        left, right = figure.subplots(2, 1, height_ratios=(5.2, 0.7 * len(mappings) + 1.0))
        for x, name in ((0, "A (secret64)"), (1, "B (scan64)")):
            left.bar(x, memory - (1 << 8), bottom=1 << 8, width=0.6, color="#c7e9c0", edgecolor="#2ca02c")
            left.bar(x, layout.MAPPED_LIMIT - memory, bottom=memory, width=0.6, color="#eeeeee",
                     edgecolor="#999999", hatch="//")
        left.bar(0, memory - 0x100000, bottom=0x100000, width=0.6, color="#d62728",
                 label=f"A: {isolation.secret_qwords_in_a} qwords of the secret")
        left.bar(1, memory - (1 << 8), bottom=1 << 8, width=0.25, color="#1f77b4",
                 label=textwrap.fill(f"B: read every qword of its RAM, {scan.ram_matches} matches", 30))
        reads = [scan.ram_size + i * scan.stride for i in range(scan.mmio_reads)]
        left.scatter([1.0] * len(reads), reads, s=4, color="#1f77b4", marker="_",
                     label=textwrap.fill(f"B: {scan.mmio_reads} reads above RAM (every {scan.stride:#x}), "
                                         f"{scan.mmio_matches} matches", 30))
        left.scatter([1.0], [scan.unmapped], s=160, marker="X", color="#ff7f0e", edgecolor="black", zorder=3,
                     label=textwrap.fill(f"B: #PF at {scan.unmapped:#x} (not mapped)", 30))
        left.set_xticks([0, 1], ["VM A\n(secret64)", "VM B\n(scan64)"])
        _address_axis(left, 1 << 31)
        left.set_xlim(-0.6, 1.6)
        left.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False, labelspacing=0.9)
        left.set_title("Guest-physical: what each VM touched")

        bases = {pid: min(m.host_address for _, m in mappings if m.pid == pid) for pid in {m.pid for _, m in mappings}}
        for position, (vm, m) in enumerate(mappings):
            base = bases[m.pid]
            right.barh(position, m.size / (1 << 20), left=(m.host_address - base) / (1 << 20), height=0.5,
                       color="#d62728" if vm == "A" else "#1f77b4")
            right.text((m.host_address - base + m.size / 2) / (1 << 20), position + 0.32,
                       f"VM {vm}: pid {m.pid}, {m.host_address:#x}", ha="center", va="bottom", fontsize=FONT_SIZE)
        right.set_yticks(range(len(mappings)), [f"VM {vm} RAM" for vm, _ in mappings])
        right.set_ylim(-0.6, len(mappings) - 0.1)
        right.margins(x=0.15)
        pids = {m.pid for _, m in mappings}
        where = "one process,\neach VM its own KVM memory slot" if len(pids) == 1 else \
            f"{len(pids)} processes,\none worker per VM"
        right.set_xlabel("host virtual address above the lowest VM RAM in the same process (MiB)")
        right.set_title(f"Host side: separate RAM mappings in {where}")
        figure.suptitle(f"VM B looks for VM A's secret: {scan.matches} matches\n"
                        + textwrap.fill(label(isolation.scanner), 80))
    return figure


FIELD_COLOURS = {"fifo": "#c6dbef", "handler": "#fdae6b", "result_len": "#d9d9d9", "padding": "#ffffff",
                 "owner": "#bcbddc"}


def device_state_figure(states: dict[str, dict], result: RunResult) -> Figure:
    """The FIFO device's host-side state buffer after an attack, one row per device, one cell per byte:
    coloured by the field it belongs to (:data:`labkit.vmm.devices.vulnerable.STATE_LAYOUT`), the byte's
    value in hex, a thick red edge on every byte the guest's writes reached.  ``states`` maps a label to
    ``Machine.device_state(...)`` of a FIFO device; ``result`` is one of the runs (it labels the figure)."""
    from matplotlib.patches import Patch, Rectangle

    from labkit.vmm.devices.vulnerable import STATE_LAYOUT, STATE_SIZE

    if not states:
        raise ConfigError("device_state_figure needs at least one device's state")
    field_of = {offset + i: name for name, offset, size in STATE_LAYOUT for i in range(size)}
    with readable_fonts(FONT_SIZE):
        figure = new_figure(MAX_WIDTH_IN, 1.0 * len(states) + 2.8)
        axes = figure.subplots()
        for row, (name, state) in enumerate(states.items()):
            raw = bytes(state["state"])
            if len(raw) != STATE_SIZE:
                raise ConfigError(f"{name}: a FIFO device's state has {STATE_SIZE} bytes, not {len(raw)}")
            y = len(states) - 1 - row
            for offset, value in enumerate(raw):
                written = offset < state["data_pos"]
                axes.add_patch(Rectangle((offset, y + 0.1), 1, 0.8, facecolor=FIELD_COLOURS[field_of[offset]],
                                         edgecolor="#d62728" if written and offset >= 16 else "#555555",
                                         linewidth=3 if written and offset >= 16 else 0.8))
                axes.text(offset + 0.5, y + 0.5, f"{value:02x}", ha="center", va="center", fontsize=FONT_SIZE)
        axes.set_xlim(0, STATE_SIZE)
        axes.set_ylim(0, len(states))
        axes.set_yticks([len(states) - 1 - row + 0.5 for row in range(len(states))], list(states))
        axes.set_xticks([offset + 0.5 for _, offset, _ in STATE_LAYOUT], [str(offset) for _, offset, _ in STATE_LAYOUT])
        axes.set_xlabel("byte offset in the device's host-side state (a C struct)")
        axes.tick_params(length=0)
        for spine in axes.spines.values():
            spine.set_visible(False)
        figure.legend(handles=[Patch(facecolor=colour, edgecolor="#555555", label=field)
                               for field, colour in FIELD_COLOURS.items()]
                      + [Patch(facecolor="white", edgecolor="#d62728", linewidth=3,
                               label="written by the guest past the FIFO")],
                      loc="outside lower center", ncol=3)
        figure.suptitle("The FIFO device's state after the guest's writes\n" + textwrap.fill(label(result), 80))
    return figure
