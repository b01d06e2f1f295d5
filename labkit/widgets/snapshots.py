"""Notebook 08: which workload, how much RAM, which backend: the dirty pages over time and what snapshots cost."""

from __future__ import annotations

import statistics
from typing import Any

from labkit.widgets.experiment import Experiment, backend_picker, backends_here, dropdown, note

MIB = 1 << 20
RAM_SIZES = (16, 64, 256)
"""RAM sizes offered (MiB): a full snapshot copies all of it, a diff only the pages written."""


class DirtyPages(Experiment):
    """A workload in a machine of the chosen RAM size, run in slices with a diff snapshot after each:
    the pages x time heat map, and a line on what the full snapshot and the diffs took."""

    slots = 2

    def __init__(self, workload: str = "slow", memory_mib: int = 16, backend: str | None = None,
                 slices: int = 24, slice_s: float = 0.01) -> None:
        from labkit.backend import choose_backend
        from labkit.viz.snapshots import WORKLOADS

        backends, self.skipped = backends_here()
        self.slices, self.slice_s = slices, slice_s
        self.workload = dropdown("workload", [(w.label, name) for name, w in WORKLOADS.items()], workload)
        self.memory = dropdown("RAM", [(f"{size} MiB", size) for size in RAM_SIZES], memory_mib)
        self.backend = backend_picker(backends, backend or choose_backend().name)
        super().__init__([self.workload, self.memory, self.backend], title="Dirty pages over time:")
        self.last: Any = None
        """The last :class:`labkit.viz.snapshots.DirtyPageMap`."""

    def results(self) -> list[Any]:
        from labkit.viz.snapshots import WORKLOADS, dirty_heatmap, dirty_page_map

        workload = WORKLOADS[self.workload.value]
        dirty = dirty_page_map(workload, self.backend.value, self.memory.value * MIB, slices=self.slices,
                               slice_s=self.slice_s)
        self.last = dirty
        counts = dirty.counts[1:] or dirty.counts
        median_pages = statistics.median(counts) if counts else 0
        summary = (f"{workload.label} on {self.backend.label}, {self.memory.value} MiB RAM: the full snapshot "
                   f"({dirty.total_pages} pages) took {dirty.full_s * 1e3:.0f} ms; after it, a diff per "
                   f"{dirty.slice_s * 1e3:g} ms slice held {median_pages:g} pages (median, "
                   f"{median_pages * 4:g} KiB) and took {statistics.median(dirty.diff_s) * 1e3:.1f} ms (median); "
                   f"{dirty.touched} distinct pages written in {len(dirty.pages)} slices.")
        return [note(summary), dirty_heatmap([dirty])]
