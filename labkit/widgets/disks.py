"""Notebook 09: how many VMs, which write pattern, how much free space: VMs filling a datastore, pausing, resuming."""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from labkit.widgets.experiment import Experiment, backend_picker, backends_here, dropdown, note

KIB = 1 << 10
ROOM_KIB = (64, 256, 1024, 4096)
"""Free space offered when the VMs start (KiB): from "every VM pauses" to "nobody does"."""


class DatastoreFill(Experiment):
    """VMs (linked clones of one base) write into their own qcow2 deltas in one datastore; a write that does not fit
    pauses its VM, the operator frees space, the VMs resume: a summary line and the datastore-over-time figure."""

    slots = 2

    def __init__(self, vms: int = 3, room_kib: int = 256, pattern: str = "random", backend: str | None = None) -> None:
        from labkit.backend import choose_backend
        from labkit.virtio.blk import PATTERNS

        backends, self.skipped = backends_here()
        self.pattern = dropdown("write pattern", list(PATTERNS), pattern)
        self.room = dropdown("free space at the start", [(f"{size} KiB", size) for size in ROOM_KIB], room_kib)
        self.vms = widgets.IntSlider(value=vms, min=1, max=6, description="VMs", continuous_update=False)
        self.backend = backend_picker(backends, backend or choose_backend().name)
        super().__init__([self.pattern, self.room, self.vms, self.backend], title="VMs filling a datastore:")
        self.last: Any = None
        """The last :class:`labkit.viz.disks.FillRun`."""

    def results(self) -> list[Any]:
        from labkit.viz.disks import fill_datastore, fill_figure

        run = fill_datastore(self.vms.value, self.room.value * KIB, self.pattern.value, self.backend.value)
        self.last = run
        paused = [vm.name for vm in run.vms if vm.pauses]
        actions = [action.detail for action in run.actions()]
        verified = sum(vm.verified for vm in run.vms)
        lost = sum(vm.lost_sectors for vm in run.vms)
        summary = (f"{len(run.vms)} VMs, {run.pattern} writes, {run.room // KIB} KiB free on {self.backend.label}: "
                   f"{run.pauses} pause(s) ({', '.join(paused) if paused else 'no VM paused'}); the operator "
                   f"{'; then '.join(actions) if actions else 'had nothing to do'}. {verified} of {len(run.vms)} "
                   f"VMs read back everything they wrote, {lost} acknowledged sectors lost, every delta "
                   f"{'checks clean' if all(vm.clean for vm in run.vms) else 'NOT clean'}.")
        return [note(summary), fill_figure(run)]
