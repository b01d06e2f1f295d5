"""Figure for notebook 03: trap-and-emulate and binary translation on the same kernel, counted.

    >>> from labkit.viz.translation import monitor_comparison
    >>> monitor_comparison(te_result, bt_result)

Left: monitor entries of each technique, stacked by kind.  Right: what binary
translation's cache did (blocks translated, cache hits, exits chained).  The
counts are deterministic (the same on both backends); the title still says what
ran the guest, as every labkit figure does.
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

from labkit.errors import ConfigError
from labkit.monitor.binary_translation import TranslationSummary
from labkit.monitor.trap_emulate import TrapEmulateReport
from labkit.viz.labels import label
from labkit.vmm.status import RunResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGURE_DPI = 150
"""Readable on a 1280x720 projector at 150% zoom (with fonts of at least 11 pt)."""
FONT = 12

KIND_COLOURS = {
    "emulated instructions": "#1f77b4",
    "block exits": "#ff7f0e",
    "indirect branches": "#2ca02c",
    "traps (untranslated)": "#9467bd",
    "writes to translated code": "#8c564b",
    "faults and interrupts reflected": "#d62728",
}


def trap_emulate_kinds(report: TrapEmulateReport) -> dict[str, int]:
    """A trap-and-emulate report's traps split into emulated instructions and reflected faults."""
    emulated = sum(report.emulated.values())
    return {"emulated instructions": emulated, "faults and interrupts reflected": report.trap_count - emulated}


def monitor_comparison(trap_emulate: RunResult, binary_translation: RunResult, *,
                       kernel: str = "minikernel64") -> Figure:
    """Monitor entries (T&E vs BT, stacked by kind) and BT's translation-cache counters, side by side.

    Both arguments are ``RunResult``s of the same kernel (``result.monitor`` is a
    ``TrapEmulateReport`` and a ``TranslationSummary``).  Returns the Figure.
    """
    te, bt = trap_emulate.monitor, binary_translation.monitor
    if not isinstance(te, TrapEmulateReport) or not isinstance(bt, TranslationSummary):
        raise ConfigError("monitor_comparison takes a trap-and-emulate run and a binary-translation run, in that order")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.0, 10.0), dpi=FIGURE_DPI, layout="constrained")  # stacked: 8 in fit a projector
    left, right = figure.subplots(2, 1, height_ratios=(1.3, 1.0))
    columns = {"trap-and-emulate": trap_emulate_kinds(te), "binary translation": bt.entries_by_kind()}
    kinds = [kind for kind in KIND_COLOURS if any(columns[name].get(kind, 0) for name in columns)]
    bottoms = [0, 0]
    segments: list[list[tuple[float, int, str]]] = [[], []]
    for kind in kinds:
        values = [columns[name].get(kind, 0) for name in columns]
        left.bar(list(columns), values, bottom=bottoms, label=kind, color=KIND_COLOURS[kind], width=0.45)
        for index, value in enumerate(values):
            if value:
                segments[index].append((bottoms[index] + value / 2, value, KIND_COLOURS[kind]))
        bottoms = [bottom + value for bottom, value in zip(bottoms, values)]
    for index, total in enumerate(bottoms):
        left.text(index, total, f"{total}", ha="center", va="bottom", fontsize=FONT, fontweight="bold")
    left.margins(y=0.15)
    left.set_xlim(-0.5, len(columns) - 0.1)
    # Each segment's count beside its bar, so a thin one is not lost; labels pushed apart, never piled up.
    gap = 0.07 * max(bottoms + [1])
    for index, marks in enumerate(segments):
        placed = -gap
        for middle, value, colour in sorted(marks):
            at = max(middle, placed + gap)
            left.annotate(f"{value}", xy=(index + 0.23, middle), xytext=(index + 0.3, at), fontsize=FONT - 1,
                          color=colour, va="center", arrowprops={"arrowstyle": "-", "color": colour, "lw": 1})
            placed = at
    left.set_ylabel("monitor entries (count)", fontsize=FONT)
    left.set_xlabel("technique", fontsize=FONT)
    left.tick_params(which="both", labelsize=FONT)
    left.set_title("Entries into the monitor (stacked by kind)", fontsize=FONT + 1)
    # The legend goes below the axes, never over a bar or its label.
    left.legend(fontsize=FONT, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)

    names = ["blocks\ntranslated", "cache\nhits", "exits\nchained", "blocks\ninvalidated"]
    values = [bt.blocks_translated, bt.cache_hits, bt.chained, bt.invalidated]
    bars = right.bar(names, values, color=["#17becf", "#bcbd22", "#7f7f7f", "#e377c2"], width=0.55)
    right.bar_label(bars, padding=2, fontsize=FONT)
    right.margins(y=0.15)
    right.set_ylabel("count (blocks or lookups)", fontsize=FONT)
    right.set_xlabel("binary translation's cache", fontsize=FONT)
    right.tick_params(which="both", labelsize=FONT)
    right.set_title(f"Translation cache: {bt.guest_bytes} guest bytes\n-> {bt.cache_bytes} bytes of translation",
                    fontsize=FONT + 1)

    measured = "; ".join(dict.fromkeys((label(trap_emulate), label(binary_translation))))
    figure.suptitle(f"Trap-and-emulate vs binary translation: {kernel}\n" + textwrap.fill(measured, 80),
                    fontsize=FONT + 2)
    return figure
