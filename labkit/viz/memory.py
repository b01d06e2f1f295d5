"""Figures for notebook 06: the kernel's page tables next to the monitor's shadow, faults over a run, walk costs.

    >>> from labkit.viz.memory import tables_side_by_side, fault_timeline, walk_costs
    >>> run = run_shadowed_with_memory("pagingkernel64", "kvm")
    >>> tables_side_by_side(run, 0x100000, 0x40000000)

Every figure says what measured it (KVM and its flavour, or the emulator) and
follows :mod:`labkit.viz.style` (8 in wide at most, 150 dpi, 11-point text or
larger); the two panels of :func:`walk_costs` are stacked.
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

from labkit.monitor.shadow import LEVELS, KernelWalk, ShadowedRun, ShadowReport
from labkit.viz.labels import label
from labkit.viz.style import MAX_WIDTH_IN, MIN_FONT_PT, new_figure, readable_fonts
from labkit.vmm.status import RunResult
from labkit.x86.paging import describe_flags

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FONT_SIZE = MIN_FONT_PT
KIND_COLOURS = {"hidden": "#1f77b4", "true": "#d62728", "pt-write": "#2ca02c"}
KIND_NAMES = {"hidden": "hidden #PF (monitor fills the shadow)", "true": "true #PF (reflected to the kernel)",
              "pt-write": "page-table store (trapped)"}


def _column(ax: Axes, x: float, walk: KernelWalk, heading: str, colour: str) -> None:
    ax.text(x, 5.55, heading, ha="center", va="bottom", fontsize=FONT_SIZE + 1, weight="bold")
    for row, step in enumerate(walk.steps):
        y = 4.6 - row
        index = (step.address - step.table) // 8
        text = (f"{step.level} at {step.table:#x}\n[{index}] = {step.entry:#x}\n{describe_flags(step.entry & 0xFFF) or 'not present'}")
        ax.text(x, y, text, ha="center", va="center", fontsize=FONT_SIZE, family="monospace",
                bbox={"boxstyle": "round", "facecolor": colour, "alpha": 0.25})
        if row:
            ax.annotate("", (x, y + 0.42), (x, y + 0.58), arrowprops={"arrowstyle": "->"})
    last = 4.6 - len(walk.steps)
    page = "fault: " + walk.steps[-1].level + " entry not present" if walk.page is None else f"page {walk.page:#x}"
    ax.text(x, last, page, ha="center", va="center", fontsize=FONT_SIZE, weight="bold",
            bbox={"boxstyle": "round", "facecolor": "white"})
    ax.annotate("", (x, last + 0.25), (x, last + 0.58), arrowprops={"arrowstyle": "->"})


def tables_side_by_side(run: ShadowedRun, cr3: int, address: int) -> Figure:
    """The kernel's walk of ``address`` under ``cr3`` (its tables, virtual to the CPU) next to the monitor's
    shadow walk (what the CPU really walks), as they stood at the end of ``run``."""
    kernel, shadow = run.kernel_walk(cr3, address), run.shadow_walk(cr3, address)
    root = run.report.roots[cr3]
    with readable_fonts(FONT_SIZE):
        figure = new_figure(MAX_WIDTH_IN, 7.6)
        ax = figure.subplots()
        ax.set_xlim(0, 10)
        ax.set_ylim(-0.2, 6.5)
        ax.axis("off")
        _column(ax, 2.5, kernel, f"the kernel's tables\n(its CR3 {cr3:#x})", "#ff7f0e")
        _column(ax, 7.5, shadow, f"the monitor's shadow\n(real CR3 {root:#x})", "#1f77b4")
        same = kernel.page is not None and kernel.page == shadow.page
        ax.text(5.0, 4.6 - len(LEVELS), "same page" if same else "differ", ha="center", va="center",
                fontsize=FONT_SIZE, color="#2ca02c" if same else "#d62728")
        figure.suptitle(f"virtual {address:#x}: two walks, one page (tables as at the end of the run)\n"
                        + textwrap.fill(label(run.result), 80))
    return figure


def fault_timeline(result: RunResult, report: ShadowReport) -> Figure:
    """Hidden page faults, true page faults and trapped page-table stores, cumulative over the run's events,
    with each CR3 load the kernel made marked."""
    with readable_fonts(FONT_SIZE):
        figure = new_figure(MAX_WIDTH_IN, 5.4)
        ax = figure.subplots()
        counts = {kind: 0 for kind in KIND_COLOURS}
        series: dict[str, list[int]] = {kind: [] for kind in KIND_COLOURS}
        loads = []
        for number, event in enumerate(report.events):
            if event.kind in counts:
                counts[event.kind] += 1
            if event.kind == "cr3":
                loads.append(number)
            for kind in KIND_COLOURS:
                series[kind].append(counts[kind])
        for kind, values in series.items():
            ax.plot(range(len(values)), values, color=KIND_COLOURS[kind], label=f"{KIND_NAMES[kind]}: {counts[kind]}",
                    linewidth=2)
        for number in loads:
            ax.axvline(number, color="#7f7f7f", linewidth=0.8, linestyle=":")
        ax.set_xlabel("monitor event number\n(page faults, page-table stores, invlpg, CR3 loads)")
        ax.set_ylabel("cumulative count")
        ax.legend(loc="upper left")
        ax.set_title("Page faults under shadow paging over the run\n(dotted: the kernel's CR3 loads)\n"
                     + textwrap.fill(label(result), 80))
    return figure


def walk_costs(result: RunResult, shadow_references: int, nested_references: int, traps_per_switch: float) -> Figure:
    """Memory references per TLB miss (native, shadow, nested) above monitor entries per CR3 switch."""
    with readable_fonts(FONT_SIZE):
        figure = new_figure(MAX_WIDTH_IN, 7.6)
        left, right = figure.subplots(2, 1, height_ratios=(1.2, 1.0))
        names = ["native\n(one set of tables)", "shadow paging\n(CPU walks the shadow)", "nested paging\n(guest x EPT)"]
        values = [4, shadow_references, nested_references]
        bars = left.bar(names, values, color=["#7f7f7f", "#1f77b4", "#9467bd"])
        left.bar_label(bars, padding=2)
        left.set_ylabel("memory references\nper TLB miss")
        left.set_ylim(0, max(values) * 1.2)
        left.set_title("A TLB miss, 4-level tables")
        bars = right.bar(["shadow paging", "nested paging"], [traps_per_switch, 0], color=["#1f77b4", "#9467bd"])
        right.bar_label(bars, labels=[f"{traps_per_switch:.1f}", "0"], padding=2)
        right.set_ylabel("monitor entries\nper CR3 switch")
        right.set_ylim(0, max(traps_per_switch, 1) * 1.3)
        right.set_title("A CR3 switch (warm shadow roots)")
        figure.suptitle(textwrap.fill(f"What each scheme pays: shadow paging {label(result)}; nested paging counted "
                                      "by the EPT model", 80))
    return figure
