"""``GuestMemory``: the one bounds-checked way the host reads and writes guest-physical memory.

A guest's memory is one or more regions, each a ``memoryview`` at a
guest-physical address (``Backend.regions()``: RAM at 0 first, then any
region added with ``Backend.add_memory_region``).  Every host-side access to
it (a hypercall's buffer, a fault frame, a device's DMA, ``Machine.read_memory``)
goes through :class:`GuestMemory`, which checks that the whole range lies
inside one region and raises :class:`labkit.errors.GuestMemoryError` naming the
range otherwise.  The addresses come from the guest: treat them as hostile (the
VENOM lesson); a range is never wrapped or split across regions, and only
:meth:`GuestMemory.read_at_most` (instruction fetch) clips one where its region ends.

Writes by the host go straight to the region's memory, read-only regions
included (the host loads what the guest may only read); they are not in the
backend's dirty log.  For diff snapshots and live migration the host's own
writes are counted apart (:meth:`GuestMemory.track_writes`): every page
:meth:`GuestMemory.write` stores to, and every page a writable
:meth:`GuestMemory.view` covers (the holder may write through it), and what a holder of an
older view reports with :meth:`GuestMemory.mark_written`.  A hot path that takes many views of
one region (a device's virtqueue) holds a :class:`MemoryWindow` of it: the same check, without
looking the regions up each time.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, Protocol, Sequence, Union

from labkit.errors import GuestMemoryError, LabkitError, strerror

Region = tuple[int, memoryview, bool]
"""``(guest_address, view, read_only)``, as ``Backend.regions()`` returns them."""

PAGE_SHIFT = 12

RegionSource = Union[Sequence[Region], Callable[[], Sequence[Region]]]


class HasRegions(Protocol):
    """What :func:`regions_of` needs of a :class:`labkit.backend.Backend` (a layer above this module)."""

    def regions(self) -> list[Region]: ...


def regions_of(backend: HasRegions) -> Callable[[], Sequence[Region]]:
    """The regions of ``backend`` (``backend.regions``), asked afresh at each access."""
    return backend.regions


def _whole(address: object, size: object) -> bool:
    """Both are whole numbers (ints, not bools)."""
    return (isinstance(address, int) and not isinstance(address, bool)
            and isinstance(size, int) and not isinstance(size, bool))


_BITS = tuple(tuple(bit for bit in range(8) if value >> bit & 1) for value in range(256))
_SET = bytes([0] + [1] * 255)
_FULL = bytes([0] * 255 + [1])


def byte_runs(mask: bytes) -> Iterator[tuple[int, int]]:
    """(first, count) of each run of 1 bytes in ``mask`` (a ``bytes.translate`` of a bitmap or a page-flag
    list), found in C by ``find``."""
    first = mask.find(1)
    while first != -1:
        end = mask.find(0, first)
        if end == -1:
            end = len(mask)
        yield first, end - first
        first = mask.find(1, end)


def page_runs(pages: Sequence[int], breaks: Sequence[int] = ()) -> Iterator[tuple[int, int]]:
    """(first page, count) of each run of consecutive pages in the sorted ``pages``; a run never crosses one
    of the page numbers ``breaks`` (where one memory region ends and the next may begin)."""
    stops = set(breaks)
    start = previous = None
    for page in pages:
        if previous is not None and page == previous + 1 and page not in stops:
            previous = page
            continue
        if start is not None and previous is not None:
            yield start, previous - start + 1
        start = previous = page
    if start is not None and previous is not None:
        yield start, previous - start + 1


def bitmap_pages(bitmap: bytes) -> list[int]:
    """Ascending indexes of the set bits of a dirty-page bitmap (bit ``i`` of byte ``j`` is page ``8 * j + i``,
    as in ``KVM_GET_DIRTY_LOG``): runs of non-zero bytes are found in C (:func:`byte_runs`), a run of
    0xff bytes is one ``range``, each other byte costs a table lookup."""
    pages: list[int] = []
    append, extend = pages.append, pages.extend
    full = bitmap.translate(_FULL)
    for start, count in byte_runs(bitmap.translate(_SET)):
        index, end = start, start + count
        while index < end:
            if full[index]:  # whole bytes: eight pages each
                stop = full.find(0, index, end)
                stop = end if stop == -1 else stop
                extend(range(index << 3, stop << 3))
                index = stop
                continue
            bits = _BITS[bitmap[index]]
            base = index << 3
            if len(bits) == 1:
                append(base + bits[0])
            else:
                extend([base + bit for bit in bits])
            index += 1
    return pages


class GuestMemory:
    """Bounds-checked access to guest-physical memory made of regions.

    ``regions`` is a list of :data:`Region`, or a callable returning it (asked
    at every access, so a region added later is seen).
    """

    __slots__ = ("_source", "_written")

    def __init__(self, regions: RegionSource):
        self._source = regions
        self._written: set[int] | None = None

    def track_writes(self, on: bool) -> None:
        """Start (or stop) counting the pages the host writes; starting again forgets what was counted."""
        self._written = set() if on else None

    def take_written(self) -> set[int]:
        """Guest-physical page numbers the host wrote (or viewed) since tracking started or the last take."""
        if self._written is None:
            return set()
        written, self._written = self._written, set()
        return written

    def _note(self, address: int, size: int) -> None:
        if self._written is not None and size > 0:
            self._written.update(range(address >> PAGE_SHIFT, ((address + size - 1) >> PAGE_SHIFT) + 1))

    @classmethod
    def of(cls, backend: HasRegions) -> "GuestMemory":
        """The memory of a :class:`labkit.backend.Backend`."""
        return cls(regions_of(backend))

    def regions(self) -> Sequence[Region]:
        source = self._source
        return source() if callable(source) else source

    def _find(self, address: int, size: int) -> tuple[memoryview, int] | None:
        if not _whole(address, size) or address < 0 or size < 0:
            return None
        for base, view, _read_only in self.regions():
            if base <= address and address + size <= base + len(view):
                return view, address - base
        return None

    def _locate(self, address: int, size: int) -> tuple[memoryview, int]:
        found = self._find(address, size)
        if found is None:
            raise GuestMemoryError(self._describe(address, size))
        return found

    def _describe(self, address: object, size: object) -> str:
        if not isinstance(address, int) or not isinstance(size, int) or size < 0:
            return f"guest memory range (address {address!r}, size {size!r}) is not a pair of whole numbers"
        spans = ", ".join(f"[{base:#x}, {base + len(view):#x})" for base, view, _ in self.regions())
        return (f"guest-physical range [{address:#x}, {address + size:#x}) is not inside one memory region "
                f"(regions: {spans or 'none'})")

    @property
    def ram_size(self) -> int:
        """Bytes of RAM: the region at guest-physical 0 (0 if there is none)."""
        for base, view, _read_only in self.regions():
            if base == 0:
                return len(view)
        return 0

    def contains(self, address: int, size: int) -> bool:
        """Whether ``[address, address + size)`` lies inside one region."""
        return self._find(address, size) is not None

    def read(self, address: int, size: int) -> bytes:
        """A copy of ``size`` bytes at guest-physical ``address``."""
        view, offset = self._locate(address, size)
        return bytes(view[offset:offset + size])

    def read_at_most(self, address: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``address``: fewer where its region ends, none when no region holds it.

        For fetching an instruction (one near the end of RAM has fewer than 15
        bytes after it); every other access wants :meth:`read`, which never clips.
        """
        if not _whole(address, size) or size < 0:
            raise GuestMemoryError(self._describe(address, size))
        for base, view, _read_only in self.regions():
            if base <= address < base + len(view):
                offset = address - base
                return bytes(view[offset:offset + size])
        return b""

    def write(self, address: int, data: bytes) -> None:
        """Store ``data`` at guest-physical ``address`` (not logged as dirty: the host wrote it)."""
        data = bytes(data)
        view, offset = self._locate(address, len(data))
        view[offset:offset + len(data)] = data
        self._note(address, len(data))

    def view(self, address: int, size: int) -> memoryview:
        """A live view of ``size`` bytes at ``address`` (no copy; valid while the machine is open).

        While :meth:`track_writes` is on, the pages it covers count as written by the host.
        """
        view, offset = self._locate(address, size)
        self._note(address, size)
        return view[offset:offset + size]

    def peek(self, address: int, size: int) -> memoryview:
        """A live read-only view of ``size`` bytes at ``address`` (no copy, not counted as written: what a
        snapshot copies from)."""
        view, offset = self._locate(address, size)
        return view[offset:offset + size].toreadonly()

    def window(self, address: int) -> "MemoryWindow":
        """The region holding ``address``, kept for a hot path (see :class:`MemoryWindow`)."""
        for base, view, _read_only in self.regions():
            if _whole(address, 0) and base <= address < base + len(view):
                return MemoryWindow(self, base, view)
        raise GuestMemoryError(self._describe(address, 1))

    def mark_written(self, address: int, size: int) -> None:
        """The host stored into ``[address, address + size)`` through a view it kept: count the pages while
        :meth:`track_writes` is on (a view counts its pages only when it is taken)."""
        self._note(address, size)

    def __repr__(self) -> str:
        spans = ", ".join(f"{base:#x}+{len(view):#x}{' ro' if ro else ''}" for base, view, ro in self.regions())
        return f"<GuestMemory {spans}>"


class MemoryWindow:
    """One region of a :class:`GuestMemory`, held by a hot path that takes many views of it (a device's queue).

    :meth:`view` checks a range against this region alone, without asking for the
    memory's regions (on the emulator that call builds a list each time); a range
    not wholly inside it goes to :meth:`GuestMemory.view`, which finds another
    region or raises :class:`GuestMemoryError`.  So it refuses exactly what
    :meth:`GuestMemory.view` refuses.  Valid while the region is: take it when the
    views of a structure in that region are taken, and drop it with them.
    """

    __slots__ = ("memory", "base", "size", "_view")

    def __init__(self, memory: GuestMemory, base: int, view: memoryview):
        self.memory = memory
        self.base = base
        self.size = len(view)
        self._view = view

    def view(self, address: int, size: int) -> memoryview:
        """:meth:`GuestMemory.view` of ``size`` bytes at ``address``."""
        if type(address) is int and type(size) is int:  # not bool: GuestMemory refuses those
            offset = address - self.base
            if 0 <= offset and 0 <= size <= self.size - offset:
                if self.memory._written is not None:
                    self.memory._note(address, size)
                return self._view[offset:offset + size]
        return self.memory.view(address, size)

    def peek(self, address: int, size: int) -> memoryview:
        """:meth:`GuestMemory.peek` of ``size`` bytes at ``address``: read-only, not counted as written (a
        buffer the device only reads)."""
        if type(address) is int and type(size) is int:
            offset = address - self.base
            if 0 <= offset and 0 <= size <= self.size - offset:
                return self._view[offset:offset + size].toreadonly()
        return self.memory.peek(address, size)


def memory_file(name: str, size: int, error: type[LabkitError], what: str, *, sealable: bool = False) -> int:
    """A new ``memfd`` named ``name`` of ``size`` bytes, its pages allocated as they are first written (guest RAM
    shared with a worker, a snapshot's memory image).  Where the kernel refuses (no memory, no descriptors),
    raises ``error`` saying it could not make ``what``."""
    try:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0))
    except OSError as failure:
        raise error(f"cannot make {what}: {strerror(failure.errno or 0)}") from None
    try:
        os.ftruncate(fd, size)
    except OSError as failure:
        os.close(fd)
        raise error(f"cannot make {what} of {size >> 20} MiB: {strerror(failure.errno or 0)}") from None
    return fd
