"""Figure for notebook 02: what the trap-and-emulate monitor did, and what one trap costs.

    >>> from labkit.viz.trap_emulate import trap_profile
    >>> trap_profile({"emu": (native, deprivileged), "kvm": (native, deprivileged)})

Left: the monitor's entries for one deprivileged run, by instruction emulated
or exception reflected (deterministic: the same on every backend).  Right:
host time per trap round trip and the monitor's own share, next to a native
port exit, per backend, on a log axis.  The title says what measured each.
Sized for a 1280x720 projector at 150% zoom: 150 dpi, no text under 11 pt.
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING, Mapping

from labkit.errors import ConfigError
from labkit.viz.labels import label, short_label
from labkit.monitor.trap_emulate import ConsoleComparison, KvmCounts, TrapEmulateReport, trap_costs
from labkit.table import Table
from labkit.viz.style import MAX_WIDTH_IN, MIN_FONT_PT, new_figure
from labkit.vmm.status import RunResult, exception_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FONT = MIN_FONT_PT
"""Points: the smallest text in the figure."""


def entries_by_kind(report: TrapEmulateReport) -> dict[str, int]:
    """``{"out": 514, "in": 514, ..., "reflected #UD": 2}`` from a TrapEmulateReport, largest first."""
    entries = {f"emulated {name}": count for name, count in report.emulated.items()}
    for vector, count in report.reflected.items():
        entries[f"reflected {exception_name(vector).split(' (')[0]}"] = count
    return dict(sorted(entries.items(), key=lambda item: -item[1]))


def trap_profile(runs: Mapping[str, tuple[RunResult, RunResult]], *, kernel: str = "minikernel64") -> Figure:
    """Monitor entries by kind, and the cost of one trap per backend; ``runs`` maps a backend name to
    ``(native RunResult, deprivileged RunResult)`` of the same kernel.  Returns the Figure."""
    if not runs:
        raise ConfigError("trap_profile needs at least one backend's (native, deprivileged) runs")
    costs = {backend: trap_costs(native, deprivileged) for backend, (native, deprivileged) in runs.items()}
    first = next(iter(runs.values()))[1].monitor
    if not isinstance(first, TrapEmulateReport):
        raise ConfigError("trap_profile needs runs under TrapAndEmulate as the second of each pair")

    figure = new_figure(MAX_WIDTH_IN, 8.6)  # stacked: 8 in fit a projector
    left, right = figure.subplots(2, 1, height_ratios=(1.0, 1.1))
    entries = entries_by_kind(first)
    names = list(entries)[::-1]
    bars = left.barh(names, [entries[name] for name in names],
                     color=["#d62728" if name.startswith("reflected") else "#1f77b4" for name in names])
    left.bar_label(bars, padding=2, fontsize=FONT)
    left.set_xscale("log")
    left.set_xlabel("monitor entries (count, log scale)", fontsize=FONT)
    left.set_title(f"What the monitor did: {first.trap_count} traps", fontsize=FONT + 1)
    left.tick_params(which="both", labelsize=FONT)
    left.margins(x=0.25)

    labels = ("native port exit", "trap round trip", "monitor's share")
    width = 0.8 / len(labels)
    backends = list(costs)
    for index, series in enumerate(labels):
        values = [(c.native_exit_us, c.trap_us, c.monitor_us)[index] for c in costs.values()]
        positions = [b + (index - 1) * width for b in range(len(backends))]
        bars = right.bar(positions, values, width, label=series, color=("#7f7f7f", "#ff7f0e", "#1f77b4")[index])
        right.bar_label(bars, labels=[f"{v:.0f}" if v >= 10 else f"{v:.1f}" for v in values], padding=2,
                        fontsize=FONT)
    right.set_xticks(range(len(backends)), [short_label(runs[backend][1]) for backend in backends])
    right.set_yscale("log")
    right.set_ylabel("host time per event\n(µs, median, log scale)", fontsize=FONT)
    right.set_title("What one trap costs", fontsize=FONT + 1)
    right.tick_params(which="both", labelsize=FONT)
    # The legend goes below the bars, where it can hide none of their labels.
    right.legend(fontsize=FONT, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(labels), frameon=False)
    right.margins(y=0.3)

    measured = "\n".join(textwrap.fill(text, 100) for text in dict.fromkeys(
        label(deprivileged) for _, deprivileged in runs.values()))
    figure.suptitle(f"Trap-and-emulate: {kernel} deprivileged in ring 3\n{measured}", fontsize=FONT + 1)
    return figure


# -- tables for notebook 02 -------------------------------------------------------------------------------

def vector_name(vector: int) -> str:
    """``#GP`` for 13, ``#UD`` for 6, ``vector 0x30`` for a software interrupt."""
    return exception_name(vector).split(" (")[0]


def runs_table(native: Mapping[str, RunResult], deprivileged: Mapping[str, RunResult]) -> Table:
    """One row per backend: how the kernel's native run and its trap-and-emulate run ended."""
    rows = []
    for backend, monitored in deprivileged.items():
        report = monitored.monitor
        traps = str(report.trap_count) if isinstance(report, TrapEmulateReport) else "-"
        rows.append([short_label(monitored), str(native[backend].status), str(monitored.status), traps])
    return Table("The same kernel, natively and under the monitor",
                 ["backend", "native (ring 0)", "trap-and-emulate (ring 3)", "traps"], rows)


def divergence_table(comparison: ConsoleComparison) -> Table:
    """Only the console lines that differ between the two runs, side by side."""
    rows = [[str(line), left.strip(), right.strip()] for line, left, right in comparison.divergent]
    return Table(f"The {len(comparison.divergent)} of {len(comparison.rows)} console lines that differ",
                 ["line", comparison.left_title, comparison.right_title], rows)


def monitor_table(report: TrapEmulateReport) -> Table:
    """What reached the monitor (by exception name) and what it did with it (emulated, reflected)."""
    rows = [["trapped", vector_name(vector), str(count)] for vector, count in sorted(report.traps.items())]
    rows += [["emulated", name, str(count)] for name, count in sorted(report.emulated.items(), key=lambda i: -i[1])]
    rows += [["reflected into the kernel's IDT", vector_name(vector), str(count)]
             for vector, count in sorted(report.reflected.items())]
    rows += [["virtual interrupt delivered", vector_name(vector), str(count)]
             for vector, count in sorted(report.delivered.items())]
    return Table(f"What the monitor did: {report.trap_count} traps", ["", "what", "count"], rows,
                 note=f"The run ended because: {report.stopped}" if report.stopped else "")


def vcpu_table(report: TrapEmulateReport) -> Table:
    """The kernel's virtual CPU at the end of the run."""
    vcpu = report.vcpu
    rows = [["IF", str(int(vcpu.interrupts_enabled))], ["CR0", f"{vcpu.cr0:#x}"], ["CR2", f"{vcpu.cr2:#x}"],
            ["CR3", f"{vcpu.cr3:#x}"], ["CR4", f"{vcpu.cr4:#x}"],
            ["GDTR", f"base {vcpu.gdtr[0]:#x}, limit {vcpu.gdtr[1]:#x}"],
            ["IDTR", f"base {vcpu.idtr[0]:#x}, limit {vcpu.idtr[1]:#x}"]]
    return Table("The kernel's virtual CPU at the end (what it believes ring 0 holds)", ["register", "value"], rows)


def events_table(report: TrapEmulateReport, count: int = 8) -> Table:
    """The first ``count`` traps: where, which exception, what the monitor did."""
    rows = [[f"{event.rip:#x}", vector_name(event.vector), event.action, event.text]
            for event in report.events[:count]]
    return Table(f"The first {len(rows)} traps", ["guest RIP", "exception", "monitor", "instruction or event"], rows)


def costs_table(runs: Mapping[str, tuple[RunResult, RunResult]]) -> Table:
    """Per backend: traps, the median round trip, the monitor's share, a native port exit, the whole runs."""
    rows, measured = [], []
    for native, deprivileged in runs.values():
        cost = trap_costs(native, deprivileged)
        measured.append(label(deprivileged))
        rows.append([short_label(deprivileged), str(cost.traps), f"{cost.trap_us:.1f}", f"{cost.monitor_us:.1f}",
                     f"{cost.native_exit_us:.1f}", f"{cost.native_s * 1e3:.0f}", f"{cost.deprivileged_s * 1e3:.0f}"])
    return Table("What the traps cost (host time, medians)",
                 ["backend", "traps", "µs per trap round trip", "µs in the monitor", "µs per native port exit",
                  "native run (ms)", "trap-and-emulate run (ms)"], rows,
                 note="; ".join(dict.fromkeys(measured)) + ".")


def kvm_exits_table(native: KvmCounts, deprivileged: KvmCounts, traps: int, where: str) -> Table:
    """What KVM counted: exits that reached labkit, exits it handled itself, instructions it emulated."""
    rows = [["native (ring 0)", "-", str(native.userspace), str(native.in_kernel), str(native.emulated)],
            ["trap-and-emulate (ring 3)", str(traps), str(deprivileged.userspace), str(deprivileged.in_kernel),
             str(deprivileged.emulated)]]
    return Table(f"What KVM counted during each run ({where}, vCPU binary stats)",
                 ["run", "traps", "exits to labkit", "exits KVM handled itself", "instructions KVM emulated"], rows)
