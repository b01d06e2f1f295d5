"""ipywidgets controls for the notebooks' main experiments.

    >>> from labkit.widgets import GuestRun
    >>> GuestRun()          # pick a guest and a backend; the exit table follows

Each control panel is an :class:`Experiment`: its results are shown as
ordinary notebook outputs (so a headless run, an HTML export and a reader
without a live kernel see the first run), and changing a control replaces
them in place.  ipywidgets and matplotlib load on first use, so
``import labkit`` stays fast.
"""

from __future__ import annotations

from labkit._lazy import lazy_exports

_EXPORTS = {
    "Experiment": "labkit.widgets.experiment",
    "backends_here": "labkit.widgets.experiment",
    "GuestRun": "labkit.widgets.guests",
    "InstructionProbe": "labkit.widgets.rings",
    "RoutineComparison": "labkit.widgets.monitors",
    "TranslationChoice": "labkit.widgets.monitors",
    "ExitStepper": "labkit.widgets.monitors",
    "VmxControls": "labkit.widgets.hardware",
    "TechniqueChoice": "labkit.widgets.hardware",
    "KernelChoice": "labkit.widgets.paravirt",
    "ConsoleBatch": "labkit.widgets.paravirt",
    "KvmControls": "labkit.widgets.kvm_controls",
    "AddressWalk": "labkit.widgets.memory",
    "DirtyPages": "labkit.widgets.snapshots",
    "DatastoreFill": "labkit.widgets.disks",
    "FaultInjection": "labkit.widgets.isolation",
    "BackupRestore": "labkit.widgets.backups",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
