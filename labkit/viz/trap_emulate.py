"""Figure for notebook 02: what the trap-and-emulate monitor did, and what one trap costs.

    >>> from labkit.viz.trap_emulate import trap_profile
    >>> trap_profile({"emu": (native, deprivileged), "kvm": (native, deprivileged)})

Left: the monitor's entries for one deprivileged run, by instruction emulated
or exception reflected (deterministic: the same on every backend).  Right:
host time per trap round trip and the monitor's own share, next to a native
port exit, per backend, on a log axis.  The title says what measured each.
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING, Mapping

from labkit.errors import ConfigError
from labkit.viz.labels import label, short_label
from labkit.monitor.trap_emulate import TrapEmulateReport, trap_costs
from labkit.vmm.status import RunResult, exception_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def entries_by_kind(report: TrapEmulateReport) -> dict[str, int]:
    """``{"out": 514, "in": 514, ..., "reflected #UD": 2}`` from a TrapEmulateReport, largest first."""
    entries = {f"emulated {name}": count for name, count in report.emulated.items()}
    for vector, count in report.reflected.items():
        entries[f"reflected {exception_name(vector).split(' (')[0]}"] = count
    return dict(sorted(entries.items(), key=lambda item: -item[1]))


def trap_profile(runs: Mapping[str, tuple[RunResult, RunResult]], *, kernel: str = "minikernel64") -> Figure:
    """Monitor entries by kind, and the cost of one trap per backend; ``runs`` maps a backend name to
    ``(native RunResult, deprivileged RunResult)`` of the same kernel.  Returns the Figure."""
    from matplotlib.figure import Figure

    if not runs:
        raise ConfigError("trap_profile needs at least one backend's (native, deprivileged) runs")
    costs = {backend: trap_costs(native, deprivileged) for backend, (native, deprivileged) in runs.items()}
    first = next(iter(runs.values()))[1].monitor
    if not isinstance(first, TrapEmulateReport):
        raise ConfigError("trap_profile needs runs under TrapAndEmulate as the second of each pair")

    figure = Figure(figsize=(10.5, 4.4), layout="constrained")
    left, right = figure.subplots(1, 2, width_ratios=(1.0, 1.1))
    entries = entries_by_kind(first)
    names = list(entries)[::-1]
    bars = left.barh(names, [entries[name] for name in names],
                     color=["#d62728" if name.startswith("reflected") else "#1f77b4" for name in names])
    left.bar_label(bars, padding=2, fontsize=8)
    left.set_xscale("log")
    left.set_xlabel("monitor entries (count, log scale)")
    left.set_title(f"What the monitor did: {first.trap_count} traps", fontsize=10)
    left.tick_params(axis="y", labelsize=8)
    left.margins(x=0.2)

    labels = ("native port exit", "trap round trip", "monitor's share")
    width = 0.8 / len(labels)
    backends = list(costs)
    for index, series in enumerate(labels):
        values = [(c.native_exit_us, c.trap_us, c.monitor_us)[index] for c in costs.values()]
        positions = [b + (index - 1) * width for b in range(len(backends))]
        bars = right.bar(positions, values, width, label=series, color=("#7f7f7f", "#ff7f0e", "#1f77b4")[index])
        right.bar_label(bars, labels=[f"{v:.0f}" if v >= 10 else f"{v:.1f}" for v in values], padding=2, fontsize=8)
    right.set_xticks(range(len(backends)), [short_label(runs[backend][1]) for backend in backends])
    right.set_yscale("log")
    right.set_ylabel("host time per event (µs, median, log scale)")
    right.set_xlabel("backend")
    right.set_title("What one trap costs", fontsize=10)
    right.legend(fontsize=8, loc="upper left")
    right.margins(y=0.25)

    measured = "; ".join(dict.fromkeys(label(deprivileged) for _, deprivileged in runs.values()))
    figure.suptitle(f"Trap-and-emulate: {kernel} deprivileged in ring 3\n" + textwrap.fill(measured, 100), fontsize=11)
    return figure
