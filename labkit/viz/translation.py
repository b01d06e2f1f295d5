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

    figure = Figure(figsize=(10.0, 4.8), layout="constrained")
    left, right = figure.subplots(1, 2, width_ratios=(1.3, 1.0))
    columns = {"trap-and-emulate": trap_emulate_kinds(te), "binary translation": bt.entries_by_kind()}
    kinds = [kind for kind in KIND_COLOURS if any(kind in counts for counts in columns.values())]
    bottoms = [0, 0]
    for kind in kinds:
        values = [columns[name].get(kind, 0) for name in columns]
        left.bar(list(columns), values, bottom=bottoms, label=kind, color=KIND_COLOURS[kind], width=0.55)
        bottoms = [bottom + value for bottom, value in zip(bottoms, values)]
    for index, total in enumerate(bottoms):
        left.text(index, total, f"{total}", ha="center", va="bottom")
    left.margins(y=0.15)
    left.set_ylabel("monitor entries (count)")
    left.set_xlabel("technique")
    left.set_title("Entries into the monitor\n(stacked by kind)", fontsize=10)
    left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)

    names = ["blocks translated", "cache hits", "exits chained"]
    values = [bt.blocks_translated, bt.cache_hits, bt.chained]
    bars = right.bar(names, values, color=["#ff7f0e", "#2ca02c", "#8c564b"], width=0.55)
    right.bar_label(bars, padding=2)
    right.margins(y=0.15)
    right.set_ylabel("count (blocks or lookups)")
    right.set_xlabel("binary translation's cache")
    right.set_title(f"Translation cache\n{bt.guest_bytes} guest bytes -> {bt.cache_bytes} bytes of translation",
                    fontsize=10)

    measured = "; ".join(dict.fromkeys((label(trap_emulate), label(binary_translation))))
    figure.suptitle(f"Trap-and-emulate vs binary translation: {kernel}\n" + textwrap.fill(measured, 90), fontsize=11)
    return figure

