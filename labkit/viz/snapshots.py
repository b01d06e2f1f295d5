"""Notebook 08's measurements and figures: dirty pages over time, snapshot cost against RAM size, pre-copy rounds.

    >>> from labkit.viz.snapshots import WORKLOADS, dirty_page_map, dirty_heatmap, snapshot_costs, snapshot_cost_figure
    >>> maps = [dirty_page_map(WORKLOADS[name], backend="emu") for name in ("small", "large")]
    >>> dirty_heatmap(maps)                  # pages x time, one panel per workload
    >>> snapshot_cost_figure({"emu": snapshot_costs("emu", [16 << 20, 64 << 20])})

The measurements run real machines (this module sits above ``labkit.vmm`` and
``labkit.migration``): :func:`dirty_page_map` runs a guest in slices and takes a diff
snapshot after each, :func:`snapshot_costs` times full snapshots, diffs and restores at
several RAM sizes.  Every figure says what measured it (from the snapshots' and runs' own
origin), follows :mod:`labkit.viz.style` (8 in wide at most, 150 dpi, 11-point text), and marks an
extrapolated value as such.
"""

from __future__ import annotations

import statistics
import struct
import textwrap
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from labkit.errors import ConfigError
from labkit.snapshot.state import PAGE
from labkit.table import Table
from labkit.viz.labels import measured_on
from labkit.viz.style import MAX_WIDTH_IN, MIN_FONT_PT, new_figure, readable_fonts

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from labkit.migration import Migration
    from labkit.vmm.machine import Machine

FONT_SIZE = MIN_FONT_PT
MIB = 1 << 20
PARAMETERS = 0x80000
"""memtouch64's parameter block (pages, passes, spin), see ``guests/memtouch64.S``."""
WORKING_SET_BASE = 0x100000
"""memtouch64's working set starts at 1 MiB."""
FOREVER = 1 << 40
"""memtouch64 passes that outlast any measurement (the machine is closed, not finished)."""


@dataclass(frozen=True)
class Workload:
    """A guest and its parameter block: what a machine runs while its dirty pages are watched."""

    name: str
    label: str
    guest: str
    pages: int = 0
    """memtouch64's working set in pages (0 for another guest)."""
    spin: int = 0
    """memtouch64's idle loop iterations after each store."""

    @property
    def parameters(self) -> bytes:
        return struct.pack("<QQQ", self.pages, FOREVER, self.spin) if self.guest == "memtouch64" else b""

    def min_memory(self) -> int:
        """The smallest RAM this workload fits in (memtouch64's working set starts at 1 MiB)."""
        return WORKING_SET_BASE + self.pages * PAGE + PAGE if self.pages else MIB

    def machine(self, backend: str = "auto", memory: int = 16 * MIB) -> Machine:
        """A new machine running this workload (its parameter block written), not started yet."""
        from labkit.vmm.machine import Machine

        if memory < self.min_memory():
            raise ConfigError(f"workload {self.label!r} needs at least {self.min_memory() // MIB + 1} MiB of RAM, "
                              f"not {memory / MIB:g} MiB")
        machine = Machine(self.guest, backend=backend, memory=memory)
        if self.parameters:
            machine.write_memory(PARAMETERS, self.parameters)
        return machine


WORKLOADS = {
    "small": Workload("small", "memtouch64, 64 pages", "memtouch64", pages=64),
    "large": Workload("large", "memtouch64, 1024 pages", "memtouch64", pages=1024),
    "slow": Workload("slow", "memtouch64, 1024 pages, spin 200", "memtouch64", pages=1024, spin=200),
    "compute": Workload("compute", "compute64 (Collatz, registers only)", "compute64"),
}
"""The workloads notebook 08 offers: a small and a large working set rewritten as fast as the guest can,
the large one slowed down (200 idle iterations after each store), and a compute-bound guest."""


# --- dirty pages over time ----------------------------------------------------------------------------

@dataclass(frozen=True)
class DirtyPageMap:
    """The pages a guest wrote in each slice of its run: one diff snapshot per slice."""

    workload: Workload
    memory: int
    slice_s: float
    backend: str
    flavour: str | None
    pages: tuple[tuple[int, ...], ...]
    """Per slice, the guest-physical page numbers its diff snapshot holds."""
    ran_s: tuple[float, ...]
    """Per slice, how long the guest ran (the run's own elapsed time)."""
    diff_s: tuple[float, ...]
    """Per slice, how long taking its diff snapshot took (measured here)."""
    full_s: float
    """The full snapshot that started the page count."""
    status: str
    """How the last slice ended (``timeout`` while the guest still runs)."""

    @property
    def label(self) -> str:
        return measured_on(self.backend, self.flavour)

    @property
    def total_pages(self) -> int:
        return self.memory // PAGE

    @property
    def counts(self) -> list[int]:
        return [len(pages) for pages in self.pages]

    @property
    def touched(self) -> int:
        """Distinct pages written in any slice."""
        return len(set().union(*self.pages)) if self.pages else 0

    def matrix(self, rows: int) -> tuple[list[list[float]], int]:
        """The share of pages written per (row of ``per_row`` pages, slice), and ``per_row``."""
        per_row = -(-self.total_pages // rows)
        grid = [[0.0] * len(self.pages) for _ in range(-(-self.total_pages // per_row))]
        for column, pages in enumerate(self.pages):
            for page in pages:
                if page < self.total_pages:
                    grid[page // per_row][column] += 1.0 / per_row
        return grid, per_row


def dirty_page_map(workload: Workload, backend: str = "auto", memory: int = 16 * MIB, *, slices: int = 24,
                   slice_s: float = 0.01) -> DirtyPageMap:
    """Run ``workload`` for ``slices`` slices of ``slice_s`` seconds, a diff snapshot after each.

    The first snapshot is a full one (it starts the backend's page tracking: KVM's dirty log or the
    emulator's write tracking); each later one holds the pages written since the one before.
    """
    if not 1 <= slices <= 1000 or not 0.0005 <= slice_s <= 5:
        raise ConfigError("slices must be in [1, 1000] and slice_s in [0.0005, 5] seconds")
    with workload.machine(backend, memory) as machine:
        started = time.perf_counter()
        snapshot = machine.snapshot()
        full_s = time.perf_counter() - started
        pages, ran, took = [], [], []
        status = "not run"
        flavour = snapshot.captured.taken_on.get("flavour")
        for _ in range(slices):
            result = machine.run(timeout=slice_s)
            started = time.perf_counter()
            snapshot = machine.snapshot(parent=snapshot)
            took.append(time.perf_counter() - started)
            pages.append(snapshot.diff.pages if snapshot.diff is not None else ())
            ran.append(result.elapsed_s)
            status = result.status.kind.value
            if result.origin is not None:
                flavour = result.origin.flavour
            if not result.status.kind.resumable:
                break
        return DirtyPageMap(workload, memory, slice_s, machine.backend, flavour, tuple(pages), tuple(ran),
                            tuple(took), full_s, status)


# --- snapshot cost against RAM size -------------------------------------------------------------------

@dataclass(frozen=True)
class SnapshotCost:
    """One RAM size on one backend: a full snapshot, a restore of it, and a diff, timed and sized."""

    backend: str
    flavour: str | None
    memory: int
    full_s: float
    restore_s: float
    full_bytes: int
    """The full snapshot's file size (sections)."""
    diff_s: float
    diff_pages: int
    diff_bytes: int

    @property
    def label(self) -> str:
        return measured_on(self.backend, self.flavour)


def fill_memory(machine: Machine, start: int = WORKING_SET_BASE, chunk: int = 8 * MIB) -> None:
    """Write every page of ``machine``'s RAM from ``start`` up (non-zero bytes, each page starting with its
    own number): a guest that uses all of its RAM.  A snapshot copies only pages that hold data (a page
    never written is a hole), so this is what makes a full snapshot's cost the cost of all of RAM."""
    for first in range(start, machine.memory_size, chunk):
        end = min(first + chunk, machine.memory_size)
        data = bytearray(b"\x5a") * (end - first)
        for page in range(first // PAGE, end // PAGE):
            struct.pack_into("<Q", data, page * PAGE - first, page)
        machine.write_memory(first, bytes(data))


def snapshot_cost(backend: str, memory: int, dirty_pages: int = 256, repeats: int = 1) -> SnapshotCost:
    """Time a full snapshot of a ``memory``-byte machine whose RAM holds data throughout (:func:`fill_memory`),
    a diff after memtouch64 rewrote ``dirty_pages`` pages, and a restore of the full snapshot into a new
    machine made beforehand (the median of ``repeats``)."""
    workload = Workload("cost", f"memtouch64, {dirty_pages} pages", "memtouch64", pages=dirty_pages)
    rows = []
    for _ in range(max(1, repeats)):
        with workload.machine(backend, memory) as machine:
            fill_memory(machine)
            _run_passes(machine, 1)  # a running guest whose working set is in memory, stopped mid-pass
            started = time.perf_counter()
            full = machine.snapshot()
            full_s = time.perf_counter() - started
            _run_passes(machine, 2)  # at least one whole pass since the snapshot: every page written
            started = time.perf_counter()
            diff = machine.snapshot(parent=full)
            diff_s = time.perf_counter() - started
            with workload.machine(backend, memory) as target:
                started = time.perf_counter()
                target.restore(full)
                restore_s = time.perf_counter() - started
            rows.append((full_s, restore_s, diff_s, full, diff))
    middle = sorted(rows, key=lambda row: row[0])[len(rows) // 2]
    full, diff = middle[3], middle[4]
    return SnapshotCost(backend, full.captured.taken_on.get("flavour"), memory,
                        statistics.median(row[0] for row in rows), statistics.median(row[1] for row in rows),
                        full.size().file_bytes, statistics.median(row[2] for row in rows),
                        diff.size().pages, diff.size().file_bytes)


def _run_passes(machine: Machine, passes: int, budget_s: float = 5.0) -> None:
    """Run memtouch64 in short slices until its pass counter (r9) grew by ``passes`` (or ``budget_s`` passed)."""
    first = machine.regs().r9
    deadline = time.monotonic() + budget_s
    while machine.regs().r9 < first + passes and time.monotonic() < deadline:
        result = machine.run(timeout=0.002)
        if not result.status.kind.resumable:
            raise ConfigError(f"memtouch64 stopped while being measured: {result.status}")


def snapshot_costs(backend: str, sizes: Sequence[int], dirty_pages: int = 256) -> list[SnapshotCost]:
    """:func:`snapshot_cost` for each RAM size in ``sizes`` (bytes), smallest first."""
    return [snapshot_cost(backend, size, dirty_pages) for size in sorted(sizes)]


@dataclass(frozen=True)
class Extrapolation:
    """A straight line through measured (RAM size, seconds) points, and its value at a size not measured."""

    memory: int
    seconds: float
    per_gib_s: float
    fixed_s: float
    measured_up_to: int


def extrapolate(costs: Sequence[SnapshotCost], memory: int = 1 << 30, field: str = "full_s") -> Extrapolation:
    """Least squares ``seconds = fixed + per_byte * memory`` over ``costs``, evaluated at ``memory``.

    A model, not a measurement: say so wherever it is shown.  Needs two sizes or more.
    """
    points = [(cost.memory, float(getattr(cost, field))) for cost in costs]
    if len({x for x, _ in points}) < 2:
        raise ConfigError("an extrapolation needs measurements at two RAM sizes or more")
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points))
    fixed = mean_y - slope * mean_x
    return Extrapolation(memory, fixed + slope * memory, slope * (1 << 30), fixed, max(x for x, _ in points))


# --- figures ------------------------------------------------------------------------------------------

MAPS_SIDE_BY_SIDE = 2
""":func:`dirty_heatmap` draws at most this many maps next to each other in 8 inches."""


def dirty_heatmap(maps: Sequence[DirtyPageMap], rows: int = 128) -> Figure:
    """Pages x time for each map side by side (one or two): the share of each band of pages written in
    each slice, and below it the number of pages per slice."""
    from matplotlib.colors import LinearSegmentedColormap

    if not 1 <= len(maps) <= MAPS_SIDE_BY_SIDE:
        raise ConfigError(f"dirty_heatmap draws 1 to {MAPS_SIDE_BY_SIDE} DirtyPageMaps side by side, "
                          f"not {len(maps)}")
    colours = LinearSegmentedColormap.from_list("dirty", ["#ffffff", "#fdae61", "#d7191c", "#67001f"])
    with readable_fonts(FONT_SIZE):
        figure = new_figure(MAX_WIDTH_IN, 7.2)
        grid = figure.subplots(2, len(maps), height_ratios=(3, 1), squeeze=False, sharex="col")
        image = None
        for column, dirty in enumerate(maps):
            top, bottom = grid[0][column], grid[1][column]
            matrix, per_row = dirty.matrix(rows)
            ends = [sum(dirty.ran_s[:i + 1]) * 1e3 for i in range(len(dirty.ran_s))]
            edges = [0.0] + ends
            extent_mib = len(matrix) * per_row * PAGE / MIB
            image = top.pcolormesh(edges, [i * per_row * PAGE / MIB for i in range(len(matrix) + 1)], matrix,
                                   cmap=colours, vmin=0, vmax=1, shading="flat")
            top.set_ylim(0, extent_mib)
            top.set_title(f"{textwrap.fill(dirty.workload.label, 24)}\n{dirty.memory // MIB} MiB RAM,\n"
                          f"{dirty.touched} distinct pages written", fontsize=FONT_SIZE)
            bottom.bar(edges[:-1], dirty.counts, width=[b - a for a, b in zip(edges, edges[1:])], align="edge",
                       color="#d7191c")
            bottom.set_xlabel("guest run time (ms)")
            if column == 0:
                top.set_ylabel("guest-physical address (MiB)")
                bottom.set_ylabel("pages / slice")
            bottom.set_ylim(0, max(max(dirty.counts, default=0) * 1.15, 1))
        if image is not None:
            figure.colorbar(image, ax=[grid[0][c] for c in range(len(maps))], label="share of pages written",
                            shrink=0.9)
        origins = sorted({dirty.label for dirty in maps})
        figure.suptitle(f"Dirty pages per slice (a {maps[0].slice_s * 1e3:g} ms run budget, then a diff snapshot)\n"
                        + textwrap.fill("; ".join(origins), 80))
    return figure


def snapshot_cost_figure(costs: Mapping[str, Sequence[SnapshotCost]], extrapolate_to: int = 1 << 30,
                         claim_s: float = 1.0) -> Figure:
    """Top: seconds for a full snapshot, its restore and a diff against RAM size, per backend, with the
    full snapshot's straight-line extrapolation to ``extrapolate_to`` drawn dashed and labelled as such,
    and the FAQ's "within seconds" as a line at ``claim_s``.  Below: file sizes, full against diff."""
    measured = {backend: list(rows) for backend, rows in costs.items() if rows}
    if not measured:
        raise ConfigError("snapshot_cost_figure needs at least one backend's measurements")
    styles = {"kvm": ("#1f77b4", "o"), "emu": ("#ff7f0e", "s")}
    with readable_fonts(FONT_SIZE):
        figure = new_figure(MAX_WIDTH_IN, 11.0)
        times, sizes = figure.subplots(2, 1, height_ratios=(1.25, 1.0))
        for backend, rows in measured.items():
            colour, marker = styles.get(backend, ("#2ca02c", "^"))
            name = "KVM" if backend == "kvm" else "emulator" if backend == "emu" else backend
            x = [row.memory / MIB for row in rows]
            times.plot(x, [row.full_s for row in rows], marker=marker, color=colour, label=f"{name}: full snapshot")
            times.plot(x, [row.restore_s for row in rows], marker=marker, color=colour, linestyle=":",
                       label=f"{name}: restore")
            times.plot(x, [row.diff_s for row in rows], marker=marker, color=colour, linestyle="-.", alpha=0.7,
                       label=f"{name}: diff ({rows[0].diff_pages} pages)")
            if len(rows) >= 2 and extrapolate_to > rows[-1].memory:
                line = extrapolate(rows, extrapolate_to)
                times.plot([rows[-1].memory / MIB, extrapolate_to / MIB], [rows[-1].full_s, line.seconds],
                           color=colour, linestyle="--", marker="x")
                times.annotate(f"{name}: {line.seconds:.1f} s\nextrapolated", (extrapolate_to / MIB, line.seconds),
                               textcoords="offset points", xytext=(-10, 4), ha="right", va="bottom",
                               fontsize=FONT_SIZE)
            sizes.plot(x, [row.full_bytes / MIB for row in rows], marker=marker, color=colour,
                       label=f"{name}: full")
            sizes.plot(x, [row.diff_bytes / MIB for row in rows], marker=marker, color=colour, linestyle="-.",
                       label=f"{name}: diff")
        times.axhline(claim_s, color="#555555", linewidth=1.2, label=f'FAQ: "within seconds" ({claim_s:g} s)')
        ticks = sorted({row.memory for rows in measured.values() for row in rows} | {extrapolate_to})
        for axis in (times, sizes):
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xticks([t / MIB for t in ticks], [f"{t // MIB:,}" for t in ticks])
            axis.minorticks_off()
            axis.set_xlabel("guest RAM (MiB, log)")
            axis.grid(True, which="major", alpha=0.3)
        low, high = times.get_ylim()
        times.set_ylim(low, high * 6)
        times.set_ylabel("seconds (log)")
        times.set_title("Time (dashed: extrapolated, not measured)", fontsize=FONT_SIZE)
        times.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=FONT_SIZE)
        sizes.set_ylabel("file size (MiB, log)")
        sizes.set_title("Size of the snapshot file: full against diff", fontsize=FONT_SIZE)
        sizes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
        origins = sorted({row.label for rows in measured.values() for row in rows})
        figure.suptitle("Snapshot cost against RAM size\n" + textwrap.fill("; ".join(origins), 80))
    return figure


def migration_rounds(migrations: Mapping[str, Migration], origins: Mapping[str, str]) -> Figure:
    """Pages copied per pre-copy round and in the stop-and-copy, one panel per migration (named by the
    mapping's keys, stacked); ``origins`` maps each key to what measured the source's run (``measured_on``)."""
    if not migrations:
        raise ConfigError("migration_rounds needs at least one migration")
    with readable_fonts(FONT_SIZE):
        figure = new_figure(MAX_WIDTH_IN, 4.4 * len(migrations) + 0.8)
        axes = figure.subplots(len(migrations), 1, squeeze=False)[:, 0]
        for axis, (name, migration) in zip(axes, migrations.items()):
            labels = [str(r.index) for r in migration.rounds] + ["stop"]
            values = [r.pages for r in migration.rounds] + [migration.stop_copy_pages]
            colours = ["#1f77b4"] * len(migration.rounds) + ["#d62728"]
            bars = axis.bar(labels, values, color=colours)
            axis.bar_label(bars, labels=[str(v) for v in values], padding=2, fontsize=FONT_SIZE)
            axis.set_ylim(0, max(values) * 1.18 + 1)
            axis.set_xlabel("pre-copy round (stop: stop-and-copy)")
            axis.set_ylabel("pages copied (4 KiB)")
            verdict = "converged" if migration.converged else (
                "finished on the source" if migration.finished_on_source else "did not converge")
            axis.set_title(f"{name}: {migration.source} -> {migration.destination}, {verdict}\n"
                           f"downtime {migration.downtime_measured_s * 1e3:.1f} ms measured + "
                           f"{migration.downtime_link_s * 1e3:.1f} ms modelled link\n"
                           + textwrap.fill(origins.get(name, ""), 80), fontsize=FONT_SIZE)
        bandwidths = sorted({m.bandwidth for m in migrations.values()})
        figure.suptitle("Pre-copy live migration: pages per round (link modelled at "
                        + ", ".join(f"{b / 1e6:g} MB/s" for b in bandwidths) + ")")
    return figure


def migration_table(migrations: Mapping[str, Migration]) -> Table:
    """One row per migration: rounds, pages, bytes, convergence, and the downtime's measured and modelled parts."""
    rows = []
    for name, migration in migrations.items():
        rows.append([name, f"{migration.source} -> {migration.destination}", str(len(migration.rounds)),
                     " / ".join(str(r.pages) for r in migration.rounds), str(migration.stop_copy_pages),
                     f"{migration.total_bytes / MIB:.1f}", "yes" if migration.converged else "no",
                     f"{migration.downtime_measured_s * 1e3:.1f}", f"{migration.downtime_link_s * 1e3:.1f}",
                     f"{migration.downtime_s * 1e3:.1f}"])
    return Table("Pre-copy live migration", ["guest", "backends", "rounds", "pages per round", "stop-and-copy pages",
                                             "MiB sent", "converged", "downtime measured (ms)",
                                             "downtime link, modelled (ms)", "downtime (ms)"], rows,
                 note="measured: taking the last diff and restoring the target on this host; modelled: the "
                      "stop-and-copy's bytes at the link's bandwidth (there is no second host).")


# --- tables -------------------------------------------------------------------------------------------

REGISTERS = ("rip", "rsp", "rflags", "r8", "r9", "r10", "r12", "r13")


def state_comparison(columns: Mapping[str, Any], registers: Sequence[str] = REGISTERS,
                     notes: Mapping[str, str] | None = None) -> Table:
    """Registers and console side by side: ``columns`` maps a heading to a :class:`labkit.RunResult` or a
    :class:`labkit.Snapshot` (its captured registers and console)."""
    values: dict[str, tuple[Any, str]] = {}
    for heading, item in columns.items():
        if hasattr(item, "captured"):
            state = item.captured
            values[heading] = (state.regs, _console_of_state(state))
        else:
            values[heading] = (item.regs, item.console)
    rows = []
    for name in registers:
        rows.append([name] + [f"{getattr(regs, name):#x}" for regs, _ in values.values()])
    rows.append(["console"] + [console.strip() or "(nothing yet)" for _, console in values.values()])
    return Table("Registers and console", ["", *columns], rows, note=" ".join((notes or {}).values()),
                 code_rows=("console",))


def _console_of_state(state: Any) -> str:
    """What the guest had written to its console when the state was captured (the ``console`` device's output)."""
    console = state.devices.get("console")
    output = console.get("output") if isinstance(console, dict) else None
    return output.decode("latin-1") if isinstance(output, (bytes, bytearray)) else ""


def file_sections_table(info: Mapping[str, Any]) -> Table:
    """``labkit snapshot info --json``'s output as a table: one row per section."""
    rows = [[section["name"], f"{section['offset']:,}", f"{section['length']:,}", section["crc32"]]
            for section in info["sections"]]
    head = f"{info['kind']} snapshot, format version {info['version']}, {info['size']:,} bytes"
    return Table(f"labkit snapshot info: {head}", ["section", "offset", "length (bytes)", "CRC-32"], rows,
                 note=f"id {info['snapshot_id']}" + (f", parent {info['parent_id']}" if info.get("parent_id") else ""))
