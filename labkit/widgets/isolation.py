"""Notebook 07: which faults to inject into how many VMs at once, and on which backend."""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from labkit.widgets.experiment import Experiment, backend_picker, backends_here, note

TIMEOUT_S = 2.0
"""Each VM's budget in the containment run: the endless ones end by it."""
DEFAULT_VMS = 16


class FaultInjection(Experiment):
    """Tick the faults to inject, pick how many VMs run at once and the backend: the per-VM status grid and
    timeline, the reasons in a table, and the guest-physical memory maps with where each VM ended."""

    slots = 4

    def __init__(self, faults: tuple[str, ...] | None = None, vms: int = DEFAULT_VMS, backend: str | None = None,
                 timeout: float = TIMEOUT_S) -> None:
        from labkit.backend import choose_backend
        from labkit.isolation import FAULTS

        backends, self.skipped = backends_here()
        chosen = list(FAULTS) if faults is None else list(faults)
        self.faults = widgets.SelectMultiple(options=list(FAULTS), value=chosen, rows=len(FAULTS),
                                             description="inject")
        self.vms = widgets.IntSlider(value=vms, min=max(len(FAULTS), 1), max=32, description="VMs",
                                     continuous_update=False)
        self.backend = backend_picker(backends, backend or choose_backend().name)
        self.timeout = timeout
        self._solo: dict[str, Any] = {}
        super().__init__([self.faults, self.vms, self.backend], title="Inject faults into a fleet of VMs:")
        self.last: Any = None
        """The last :class:`labkit.isolation.ContainmentRun`."""

    def results(self) -> list[Any]:
        from labkit.isolation import run_containment
        from labkit.viz.isolation import memory_maps, status_grid

        run = run_containment(tuple(self.faults.value), self.vms.value, self.backend.value, self.timeout,
                              solo=self._solo)
        self.last = run
        healthy = [row for row in run.rows if not row.faulty]
        same = sum(1 for row in healthy if row.healthy_matches_solo)
        summary = (f"{len(run.rows)} VMs on {self.backend.label} in {run.wall_s:.1f} s: "
                   f"{len(run.rows) - len(healthy)} with a fault injected, {len(healthy)} healthy; "
                   f"{same} of the {len(healthy)} healthy ones ended with the console, status and registers "
                   f"of their run alone.")
        return [note(summary), status_grid(run), run.table(), memory_maps(run)]
