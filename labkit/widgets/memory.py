"""Notebook 06: pick a virtual address and walk it step by step, under shadow paging or nested paging."""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from labkit.monitor.ept import NestedMemory, nested_walk
from labkit.monitor.shadow import ShadowedRun
from labkit.table import Table
from labkit.widgets.experiment import Experiment, dropdown, note
from labkit.x86.paging import describe_flags

ADDRESSES = (
    ("0x40000000 in A (a process page)", (0x100000, 0x40000000)),
    ("0x40000000 in B (same address, other page)", (0x105000, 0x40000000)),
    ("0x40010000 in A (paged in on demand)", (0x100000, 0x40010000)),
    ("0x40002000 in A (read-only)", (0x100000, 0x40002000)),
    ("0x40001000 in A (unmapped)", (0x100000, 0x40001000)),
    ("0x8000 in A (the kernel's code)", (0x100000, 0x8000)),
)
"""pagingkernel64's interesting addresses: (label, (kernel CR3, virtual address))."""
SCHEMES = ("shadow paging", "nested paging")


class AddressWalk(Experiment):
    """A virtual address of ``run``'s kernel, a scheme and a step: the memory references of a TLB miss.

    Shadow paging: the CPU walks the monitor's shadow tables (4 references);
    the kernel's own tables, shown beside each step, are never walked by the
    CPU.  Nested paging: the EPT model (:mod:`labkit.monitor.ept`) over the
    same RAM, every guest table entry found through EPT first (24 references).
    """

    slots = 2

    def __init__(self, run: ShadowedRun, *, scheme: str = "shadow paging", step: int = 4) -> None:
        self.run = run
        self.nested = NestedMemory(run.ram)
        self.address = dropdown("virtual address", [(text, value) for text, value in ADDRESSES], ADDRESSES[0][1])
        self.scheme = widgets.ToggleButtons(options=list(SCHEMES), value=scheme, description="scheme")
        self.step = widgets.IntSlider(value=step, min=1, max=24, description="step", continuous_update=False)
        super().__init__([self.address, self.scheme, self.step], title="Walk one address:")

    def rows(self) -> list[list[str]]:
        """Every reference of the walk: [number, structure, address read, value, meaning]."""
        cr3, address = self.address.value
        if self.scheme.value == "nested paging":
            walk = nested_walk(self.nested.read, cr3, self.nested.ept, address)
            rows = [[str(n + 1), ref.structure, f"{ref.address:#x}", f"{ref.value:#x}",
                     "EPT entry: guest-physical to host-physical" if ref.structure.startswith("EPT")
                     else "the guest's own entry, read at its host-physical address"]
                    for n, ref in enumerate(walk.references)]
            end = (f"host-physical {walk.host_physical:#x}" if walk.host_physical is not None
                   else f"stopped: {walk.stopped}")
            return rows + [["", "result", "", "", end]]
        kernel, shadow = self.run.kernel_walk(cr3, address), self.run.shadow_walk(cr3, address)
        rows = []
        for n, step in enumerate(shadow.steps):
            beside = kernel.steps[n] if n < len(kernel.steps) else None
            meaning = (f"kernel's {beside.level} [{(beside.address - beside.table) // 8}] = {beside.entry:#x} "
                       f"({describe_flags(beside.entry & 0xFFF) or 'not present'}), never walked by the CPU"
                       if beside is not None else "")
            rows.append([str(n + 1), f"shadow {step.level}", f"{step.address:#x}", f"{step.entry:#x}", meaning])
        if shadow.page is not None:
            end = f"page {shadow.page:#x}"
        elif kernel.page is not None:
            end = f"not in the shadow yet: the next access is a hidden #PF (the kernel maps it to {kernel.page:#x})"
        else:
            end = f"not mapped by the kernel either: a true #PF ({kernel.steps[-1].level} entry not present)"
        return rows + [["", "result", "", "", end]]

    def results(self) -> list[Any]:
        rows = self.rows()
        references = len(rows) - 1
        shown = min(self.step.value, references)
        marked = [["▶ " + row[0] if i == shown - 1 else row[0], *row[1:]] for i, row in enumerate(rows[:shown])]
        cr3, address = self.address.value
        summary = (f"{self.scheme.value}: virtual {address:#x} under kernel CR3 {cr3:#x} takes {references} memory "
                   f"references on a TLB miss; showing {shown}. {rows[-1][4]}")
        return [note(summary), Table(f"{self.scheme.value}, step {shown} of {references}",
                                     ["#", "structure", "address read", "value", "what it is"],
                                     marked + ([rows[-1]] if shown == references else []))]
