"""The transmit queue's common case in C (``drain.c``), for :meth:`labkit.virtio.ring.DeviceQueue.drain`.

A notification moving one 4 KiB buffer into the console took about 5 us of
device work in Python on the emulator (reading the ring, the checks, the copy,
the used ring, and a page fault for each new page of console), more than two
port exits.  :class:`NativeTransmit` does the same for the chains it can take
(one device-readable buffer each, in the queue's region; see ``drain.c``) in one
ctypes call and hands every other chain back to ``ring.py``, which holds the
checks and error messages.  Built by :func:`labkit.native.build`; where it is not
built (no compiler, ``LABKIT_NATIVE=0``) every chain goes through Python, with the
same results.
"""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path
from typing import TYPE_CHECKING

from labkit.native import Library
from labkit.vmm.devices.console import Console

if TYPE_CHECKING:  # pragma: no cover
    from labkit.virtio.ring import DeviceQueue

SOURCE = Path(__file__).with_name("drain.c")

_u32, _u64, _void_p = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_void_p


class TransmitQueue(ctypes.Structure):
    """``struct transmit_queue`` of drain.c."""

    _fields_ = [
        ("desc", _void_p), ("avail", _void_p), ("used", _void_p), ("window", _void_p),
        ("window_base", _u64), ("window_size", _u64),
        ("size", _u32), ("stopped", _u32), ("last_avail", _u32), ("used_idx", _u32),
        ("sink", _void_p), ("sink_length", _u64), ("sink_capacity", _u64), ("sink_ready", _u64), ("moved", _u64),
    ]


def layout_of(library: ctypes.CDLL) -> tuple[int, ...]:
    """(sizeof transmit_queue, offsetof moved) as drain.c was compiled."""
    out = (_u64 * 2)()
    library.transmit_queue_layout(ctypes.byref(out))
    return tuple(out)


def expected_layout() -> tuple[int, ...]:
    return ctypes.sizeof(TransmitQueue), TransmitQueue.moved.offset


def _check(library: ctypes.CDLL) -> str | None:
    library.transmit_drain.argtypes = (_void_p,)
    library.transmit_drain.restype = _u64
    library.transmit_queue_layout.argtypes = (ctypes.POINTER(_u64 * 2),)
    library.transmit_queue_layout.restype = None
    if layout_of(library) != expected_layout():
        return f"{library._name} does not match labkit's ctypes mirror of struct transmit_queue"
    return None


_LIBRARY = Library(SOURCE, _check, "C drain")


def load() -> ctypes.CDLL | None:
    """The built library, or None (see :func:`status`).  Built at most once per process."""
    return _LIBRARY.load()


def status() -> str:
    """One line for ``labkit doctor``: how a virtio transmit queue is consumed, and why."""
    return _LIBRARY.status()


def _address(view: memoryview | mmap.mmap) -> int:
    """The host address of a writable buffer (the temporary ctypes object releases its export at once)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class NativeTransmit:
    """``queue``'s one-buffer chains consumed in C into ``console``.

    Holds the addresses of the queue's three areas and region, which stay valid
    while ``queue`` lives: its memoryviews of them keep their mappings from being
    closed (an ``mmap`` refuses to close while a view is exported).  The console's
    storage is a mapping it never replaces.
    """

    __slots__ = ("console", "state", "_pointer", "_drain")

    def __init__(self, library: ctypes.CDLL, queue: DeviceQueue, console: Console):
        window = queue._buffers
        self.console = console
        self.state = TransmitQueue(
            desc=_address(queue._desc), avail=_address(queue._avail), used=_address(queue._used),
            window=_address(window._view), window_base=window.base, window_size=window.size, size=queue.size,
            sink=_address(console.storage), sink_capacity=console.capacity)
        self._pointer = ctypes.addressof(self.state)
        self._drain = library.transmit_drain

    def drain(self, queue: DeviceQueue) -> tuple[int, int, bool]:
        """Consume what C can take: ``(chains, bytes, stopped)``, ``stopped`` if a chain was left for Python.

        ``queue``'s indexes and the console's length and dropped count are brought up to date; the used
        idx is published if a chain was consumed.
        """
        state, console = self.state, self.console
        state.last_avail, state.used_idx = queue.last_avail, queue.used_idx
        length = state.sink_length = console.length
        chains = self._drain(self._pointer)
        if not chains:
            return 0, 0, bool(state.stopped)
        queue.last_avail = (queue.last_avail + chains) & 0xFFFF
        queue.used_idx = (queue.used_idx + chains) & 0xFFFF
        moved, kept = state.moved, state.sink_length - length
        console.length = length + kept
        if moved != kept:
            console.dropped += moved - kept
        return chains, moved, bool(state.stopped)


def native_transmit(queue: DeviceQueue, sink: object) -> NativeTransmit | None:
    """The C drain of ``queue`` into ``sink``, if ``sink`` is a :class:`Console` and the library is built."""
    if not isinstance(sink, Console):
        return None
    library = load()
    return NativeTransmit(library, queue, sink) if library is not None else None
