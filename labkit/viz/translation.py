"""Figure for notebook 03: trap-and-emulate and binary translation on the same kernel, counted.

    >>> from labkit.viz.translation import monitor_comparison
    >>> monitor_comparison(te_result, bt_result)

Top: monitor entries of each technique by kind, the two techniques' bars side
by side on a log axis (so three reflected faults next to a thousand emulated
instructions stay visible), each bar labelled with its count.  Below: what
binary translation's cache did (blocks translated, cache hits, exits chained).
The counts are deterministic (the same on both backends); the title still says
what ran the guest, as every labkit figure does.  Both panels are 8 in wide
(:mod:`labkit.viz.style`).
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

from labkit.errors import ConfigError
from labkit.monitor.binary_translation import TranslationSummary
from labkit.monitor.trap_emulate import TrapEmulateReport
from labkit.viz.labels import label
from labkit.viz.style import MAX_WIDTH_IN, TEXT_PT, new_figure
from labkit.vmm.status import RunResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FONT = TEXT_PT
TECHNIQUE_COLOURS = {"trap-and-emulate": "#d62728", "binary translation": "#1f77b4"}

KINDS = ("emulated instructions", "block exits", "indirect branches", "traps (untranslated)",
         "writes to translated code", "faults and interrupts reflected")
"""The kinds of monitor entry, in the order the figure lists them."""


def trap_emulate_kinds(report: TrapEmulateReport) -> dict[str, int]:
    """A trap-and-emulate report's traps split into emulated instructions and reflected faults."""
    emulated = sum(report.emulated.values())
    return {"emulated instructions": emulated, "faults and interrupts reflected": report.trap_count - emulated}


def monitor_comparison(trap_emulate: RunResult, binary_translation: RunResult, *,
                       kernel: str = "minikernel64") -> Figure:
    """Monitor entries by kind (T&E and BT side by side, log scale) above BT's translation-cache counters.

    Both arguments are ``RunResult``s of the same kernel (``result.monitor`` is a
    ``TrapEmulateReport`` and a ``TranslationSummary``).  Returns the Figure.
    """
    te, bt = trap_emulate.monitor, binary_translation.monitor
    if not isinstance(te, TrapEmulateReport) or not isinstance(bt, TranslationSummary):
        raise ConfigError("monitor_comparison takes a trap-and-emulate run and a binary-translation run, in that order")
    columns = {"trap-and-emulate": trap_emulate_kinds(te), "binary translation": bt.entries_by_kind()}
    kinds = [kind for kind in KINDS if any(columns[name].get(kind, 0) for name in columns)]
    slot_in = 0.75  # one kind's pair of bars: two count labels (12 pt) that do not touch
    entries_in = slot_in * len(kinds) + 1.6
    figure = new_figure(MAX_WIDTH_IN, entries_in + 4.6)
    left, right = figure.subplots(2, 1, height_ratios=(entries_in, 3.6))
    height = 0.38
    for index, (name, counts) in enumerate(columns.items()):
        values = [counts.get(kind, 0) for kind in kinds]
        positions = [row + (index - 0.5) * height for row in range(len(kinds))]
        bars = left.barh(positions, [value if value else float("nan") for value in values], height,
                         color=TECHNIQUE_COLOURS[name], label=f"{name}: {sum(counts.values())} entries")
        left.bar_label(bars, labels=[str(value) if value else "" for value in values], padding=3, fontsize=FONT)
        for position, value in zip(positions, values):
            if not value:  # no bar on a log axis: say 0 where it would start
                left.text(0.8, position, " 0", va="center", ha="left", fontsize=FONT, color=TECHNIQUE_COLOURS[name])
    left.set_yticks(range(len(kinds)), [textwrap.fill(kind, 18) for kind in kinds])
    left.invert_yaxis()
    left.set_xscale("log")
    largest = max([value for counts in columns.values() for value in counts.values()] + [1])
    left.set_xlim(0.7, largest * 6)
    left.set_xlabel("monitor entries (count, log scale)", fontsize=FONT)
    left.tick_params(which="both", labelsize=FONT)
    left.set_title("Entries into the monitor, by kind", fontsize=FONT + 1)
    # The legend goes below the axes, never over a bar or its label.
    left.legend(fontsize=FONT, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)

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
