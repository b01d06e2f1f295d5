"""Figures and tables for the notebooks.

    >>> from labkit.viz import exit_timeline, exit_counts, exits_side_by_side
    >>> exit_timeline(result)              # a RunResult: its backend labels the figure
    >>> exit_counts(trace, backend="kvm")  # an ExitTrace: say what measured it
    >>> exit_costs([kvm_result, emu_result])  # host time of every exit, both backends

Every figure has a title, labelled axes with units, and says what measured it:
"measured on KVM (kvm_pvm)" or "measured on the emulator (Unicorn): emulator
time, not hardware time".  Figures are ``matplotlib.figure.Figure`` objects made
without pyplot, so nothing is shown twice and no global figure state leaks;
in a notebook, run ``%matplotlib inline`` once and end a cell with the figure.

matplotlib is imported on first use, so ``import labkit`` stays fast.
"""

from __future__ import annotations

from labkit._lazy import lazy_exports

_EXPORTS = {
    "exit_timeline": "labkit.viz.exits",
    "exit_counts": "labkit.viz.exits",
    "exits_side_by_side": "labkit.viz.exits",
    "exit_costs": "labkit.viz.exits",
    "measured_on": "labkit.viz.labels",
    "status_grid": "labkit.viz.isolation",
    "memory_maps": "labkit.viz.isolation",
    "scan_figure": "labkit.viz.isolation",
    "device_state_figure": "labkit.viz.isolation",
    "ring_timeline": "labkit.viz.rings",
    "ring_event_table": "labkit.viz.rings",
    "classification_table": "labkit.viz.rings",
    "trap_profile": "labkit.viz.trap_emulate",
    "monitor_comparison": "labkit.viz.translation",
    "vmx_exits": "labkit.viz.vmx",
    "technique_entries": "labkit.viz.vmx",
    "kernel_entries": "labkit.viz.paravirt",
    "console_paths": "labkit.viz.paravirt",
    "capability_table": "labkit.viz.report",
    "exit_table": "labkit.viz.report",
    "exit_cost_table": "labkit.viz.report",
    "exit_costs_of": "labkit.viz.report",
    "ExitCosts": "labkit.viz.report",
    "runs_side_by_side": "labkit.viz.report",
    "backends_to_compare": "labkit.viz.report",
    "Skipped": "labkit.viz.report",
    "kernel_vs_userspace": "labkit.viz.kvm_stats",
    "exit_latency": "labkit.viz.kvm_stats",
    "counter_table": "labkit.viz.kvm_stats",
    "control_effects": "labkit.viz.kvm_stats",
    "control_table": "labkit.viz.kvm_stats",
    "compare_controls": "labkit.viz.kvm_stats",
    "notebooks_table": "labkit.viz.report",
    "session_note": "labkit.viz.report",
    "agreement": "labkit.viz.report",
    "exit_costs_sentences": "labkit.viz.report",
    "entries_verdict": "labkit.viz.rings",
    "verdict_sentences": "labkit.viz.rings",
    "paper_agreement": "labkit.viz.rings",
    "ring_runs_table": "labkit.viz.rings",
    "kernel_entries_table": "labkit.viz.rings",
    "entries_differ": "labkit.viz.rings",
    "page_fault_table": "labkit.viz.rings",
    "umip_table": "labkit.viz.rings",
    "dirty_page_map": "labkit.viz.snapshots",
    "dirty_heatmap": "labkit.viz.snapshots",
    "snapshot_costs": "labkit.viz.snapshots",
    "snapshot_cost_figure": "labkit.viz.snapshots",
    "migration_rounds": "labkit.viz.snapshots",
    "migration_table": "labkit.viz.snapshots",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
