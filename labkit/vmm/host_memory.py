"""Where a machine's guest RAM lives on the host: one mapping per VM, read from ``/proc/self/maps``.

Every labkit machine's RAM is a mapping of its own (KVM: a private anonymous ``mmap``, memory slot 0,
``KVM_SET_USER_MEMORY_REGION``'s ``userspace_addr``, which a restore from a snapshot kept in memory replaces
by a private copy-on-write mapping of the snapshot's image, ``/memfd:labkit-snapshot-ram``, at the same
address; the emulator in its worker process: a shared
mapping of a ``memfd`` of its own, given to ``uc_mem_map_ptr``, which the caller maps too so that a
snapshot copies the pages without sending them through a socket).  :func:`host_mappings` turns a backend's regions into
:class:`HostMapping` rows: the process that holds the mapping (the caller on KVM, the
worker on emulation), the host virtual address range, and the ``/proc/<pid>/maps`` line
that contains it.  Two VMs' ranges never overlap, and a VM reaches only the guest-physical
addresses its slots translate into its own range: that is the host-side picture behind
memory isolation (notebook 07).  The maps line is the kernel's VMA, which can be wider
than one region: Linux merges neighbouring anonymous mappings with the same flags into
one VMA (measured here: two KVM VMs made one after another share one ``rw-p`` line), so
the boundary between VMs is the memory slot's range, not a VMA edge.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class HostMapping:
    """One guest memory region and the host mapping behind it."""

    pid: int
    """The process whose address space holds the mapping."""
    guest_address: int
    size: int
    host_address: int
    read_only: bool
    maps_line: str
    """The ``/proc/<pid>/maps`` line whose range contains the region ("" if none was found)."""

    @property
    def host_end(self) -> int:
        return self.host_address + self.size

    def overlaps(self, other: HostMapping) -> bool:
        """Whether the two regions share host memory (same process, intersecting ranges)."""
        return self.pid == other.pid and self.host_address < other.host_end and other.host_address < self.host_end


def _address_of(view: memoryview) -> int:
    if view.readonly:  # every labkit region is a writable mapping; a read-only view has no address to give
        return 0
    anchor = (ctypes.c_char * len(view)).from_buffer(view)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # releases the buffer export at once (a live one would keep the mmap from closing)


def _maps_line(address: int, lines: Sequence[str]) -> str:
    for line in lines:
        start, _, end = line.split(" ", 1)[0].partition("-")
        if int(start, 16) <= address < int(end, 16):
            return line.rstrip("\n")
    return ""


def host_mappings(regions: Sequence[tuple[int, memoryview, bool]]) -> tuple[HostMapping, ...]:
    """``HostMapping`` rows for a backend's ``regions()`` (guest address, memory, read-only), in this process."""
    with open("/proc/self/maps") as maps:
        lines = maps.readlines()
    pid = os.getpid()
    rows = []
    for guest_address, view, read_only in regions:
        address = _address_of(view)
        rows.append(HostMapping(pid, guest_address, len(view), address, read_only, _maps_line(address, lines)))
    return tuple(rows)
