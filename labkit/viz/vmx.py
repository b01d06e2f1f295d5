"""Figures for notebook 05: a model of VMX's exits, and one workload's hypervisor entries under every technique.

    >>> from labkit.viz.vmx import vmx_exits, technique_entries
    >>> vmx_exits(result)                 # a run_vmx RunResult: exits by basic reason
    >>> technique_entries(comparison)     # a TechniqueComparison: entries and host time per technique

Both say what measured them: the VMX model's figure "a model of VMX, run on
KVM (kvm_pvm)" or "... run on the emulator (Unicorn 2.1.4)", never VT-x; the
techniques figure names the backend and what each time means.  Sizes follow
labkit's projector rules (at most 8 in wide, 150 dpi, text of 12 pt, titles
13 pt: :mod:`labkit.viz.style`).
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

from labkit.errors import ConfigError
from labkit.monitor.techniques import TechniqueComparison
from labkit.monitor.vmx.exits import ExitReason
from labkit.monitor.vmx.model import VmxReport, where
from labkit.viz.style import MAX_WIDTH_IN, TEXT_PT, TITLE_PT, finish, new_figure
from labkit.vmm.status import RunResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

KIND_COLOURS = {
    "VM exits": "#1f77b4",
    "traps": "#d62728",
    "monitor calls": "#ff7f0e",
    "hypercalls and bounces": "#2ca02c",
    "VM exits (model)": "#9467bd",
}


def _figure(height: float, columns: int = 1, width_ratios: tuple[float, ...] | None = None) -> tuple[Figure, list[Axes]]:
    figure = new_figure(MAX_WIDTH_IN, height)
    axes = figure.subplots(1, columns, width_ratios=width_ratios) if columns > 1 else [figure.add_subplot()]
    return figure, list(axes)


def _log_bars(ax: Axes, names: list[str], values: list[int | None], colours: list[str]) -> None:
    """Horizontal bars on a log axis, each labelled with its value; a 0 or an unknown value (None, "?")
    has no bar there, so its label stands at the axis's start."""
    bars = ax.barh(names, [value if value else float("nan") for value in values], color=colours, height=0.6)
    ax.bar_label(bars, labels=[str(value) if value else "" for value in values], padding=3, fontsize=TEXT_PT)
    for row, value in enumerate(values):
        if not value:
            ax.annotate("?" if value is None else "0", (0, row), xycoords=("axes fraction", "data"),
                        xytext=(3, 0), textcoords="offset points", va="center", fontsize=TEXT_PT)
    ax.set_xscale("log")


def vmx_exits(result: RunResult) -> Figure:
    """Exits of one :func:`labkit.monitor.vmx.run_vmx` run by basic exit reason (horizontal bars, counts)."""
    report = result.monitor
    if not isinstance(report, VmxReport):
        raise ConfigError("vmx_exits needs a run under the VMX model (labkit.monitor.vmx.run_vmx)")
    counts = sorted(report.exit_counts.items())
    figure, (ax,) = _figure(1.6 + 0.55 * max(len(counts), 1))
    if counts:
        names = [f"{reason} {ExitReason(reason).short_name}" for reason, _ in counts]
        values = [count for _, count in counts]
        bars = ax.barh(names, values, color="#9467bd", height=0.6)
        ax.bar_label(bars, padding=3, fontsize=TEXT_PT)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlim(0.8, max(values) * 4)
        ax.set_xlabel("VM exits (count, log scale)")
    else:
        ax.text(0.5, 0.5, "no VM exits under these controls:\nevery candidate ran in VMX non-root operation",
                ha="center", va="center", fontsize=TEXT_PT, transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title(f"VM exits by basic exit reason ({report.exit_count} in all)")
    finish(ax)
    figure.suptitle(f"A model of VMX {where(result)}: not VT-x", fontsize=TITLE_PT)
    return figure


def technique_entries(comparison: TechniqueComparison) -> Figure:
    """Per technique: all its hypervisor entries (log scale, coloured by what it counts), those besides printing
    the console (byte-wise port I/O costs an entry per access; the paravirtual kernel's console_io hypercall one
    per string), and the run's host time.
    Techniques that did not run are left out (the table says why)."""
    from matplotlib.patches import Patch

    runs = [run for run in comparison.runs if not run.skipped]
    if not runs:
        raise ConfigError("technique_entries needs at least one technique that ran")
    figure, (every, besides, time) = _figure(2.2 + 0.5 * len(runs), 3, (1.15, 1.0, 0.85))
    names = [run.technique for run in runs]
    colours = [KIND_COLOURS.get(run.entry_kind, "#7f7f7f") for run in runs]
    entries = [run.entries for run in runs]
    bars = every.barh(names, [max(value, 0.9) for value in entries], color=colours, height=0.6)
    every.bar_label(bars, labels=[str(value) for value in entries], padding=3, fontsize=TEXT_PT)
    every.set_xscale("log")
    every.set_xlim(0.8, max(entries + [1]) * 30)
    every.set_xlabel("all (log scale)")
    every.set_title("Hypervisor entries")
    others = [None if run.console_entries is None else run.entries - run.console_entries for run in runs]
    _log_bars(besides, names, others, colours)
    besides.set_xlim(0.5, max([value or 0 for value in others] + [1]) * 30)
    besides.set_xlabel("besides the console\n(log scale)")
    besides.set_title("Without the console")
    mixed = len({run.backend for run in runs}) > 1
    times = [run.host_ms for run in runs]
    bars = time.barh(names, times, color="#8c8c8c", height=0.6)
    time.bar_label(bars, labels=[f"{value:.0f}" + (" (KVM)" if mixed and run.backend == "kvm" else "")
                                 for value, run in zip(times, runs)], padding=3, fontsize=TEXT_PT)
    time.set_xscale("log")
    low = min([value for value in times if value > 0] + [1.0])
    time.set_xlim(low / 2, max(times + [1]) * (60 if mixed else 20))
    time.set_xlabel("host time\n(ms, log scale)")
    time.set_title("Run time")
    for ax in (every, besides, time):
        ax.invert_yaxis()
        finish(ax)
    for ax in (besides, time):
        ax.set_yticks(range(len(names)), labels=[""] * len(names))
    kinds = list(dict.fromkeys(run.entry_kind for run in runs))
    figure.legend(handles=[Patch(color=KIND_COLOURS.get(kind, "#7f7f7f"), label=kind) for kind in kinds],
                  loc="outside lower center", ncol=min(len(kinds), 3), frameon=False, fontsize=TEXT_PT)
    main = comparison.where
    time_note = "emulator time, not hardware time" if comparison.backend == "emu" else "host time on KVM"
    kvm_note = "; the KVM row ran on KVM" if mixed else ""
    figure.suptitle(textwrap.fill(f"One workload, every technique: measured on {main} ({time_note}{kvm_note}; "
                                  "the VMX model's time is the model's, not VT-x's)", 64), fontsize=TITLE_PT)
    return figure
