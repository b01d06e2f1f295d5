"""A split virtqueue in guest memory (virtio 1.x, section 2.7 "Split Virtqueues"), as both sides see it.

Three areas in guest-physical memory, each contiguous, all little-endian::

    Descriptor Table (driver writes)     16 * size bytes, 16-aligned      (2.7.5)
      desc[i]:  le64 addr | le32 len | le16 flags | le16 next
                flags: NEXT 1 (chain continues at next), WRITE 2 (device-writable),
                       INDIRECT 4 (addr/len name a table of descriptors, 2.7.5.3)
    Available Ring (driver writes)       6 + 2 * size bytes, 2-aligned     (2.7.6)
      le16 flags (NO_INTERRUPT 1) | le16 idx | le16 ring[size] | le16 used_event
    Used Ring (device writes)            6 + 8 * size bytes, 4-aligned     (2.7.8)
      le16 flags (NO_NOTIFY 1) | le16 idx | {le32 id, le32 len} ring[size] | le16 avail_event

``size`` (the queue size) is a power of 2, at most 32768.  ``idx`` in both rings is
free-running: it counts every chain ever made available (used) modulo 2**16, and
the slot it names is ``idx % size`` (2.7.13.2, 2.7.13.3).  So ``(avail.idx - last_seen) %
2**16`` chains are waiting, and more than ``size`` of them is impossible for a
correct driver.

:class:`DeviceQueue` is the device's side: it reads only what the descriptors
name, through :class:`labkit.memory.GuestMemory` (whose range check refuses a
buffer outside guest memory), and checks every index, address, length, flag and
chain before it hands a chain to the device; anything wrong
raises :class:`labkit.errors.VirtqueueError` saying what, and the device model
turns that into DEVICE_NEEDS_RESET (``labkit.virtio.console``).  :class:`DriverQueue`
is the driver's side, for host code that builds rings (tests, the fuzz
benchmark, a notebook that draws a ring); the guests in ``guests/`` do the same
in assembly.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

from labkit.errors import ConfigError, GuestMemoryError, LabkitError, VirtqueueError
from labkit.memory import GuestMemory
from labkit.virtio.native import NativeTransmit, native_transmit

VIRTQ_DESC_F_NEXT = 1
"""The buffer continues in the descriptor named by ``next``."""
VIRTQ_DESC_F_WRITE = 2
"""The buffer is device write-only (otherwise device read-only)."""
VIRTQ_DESC_F_INDIRECT = 4
"""The buffer holds a table of descriptors (needs VIRTIO_F_INDIRECT_DESC)."""
VIRTQ_DESC_FLAGS = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_INDIRECT
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

VIRTQ_DESC_SIZE = 16
USED_ELEM_SIZE = 8
MAX_QUEUE_SIZE = 32768
VIRTQ_DESC_ALIGN, VIRTQ_AVAIL_ALIGN, VIRTQ_USED_ALIGN = 16, 2, 4
"""Minimum alignments of the three areas (2.7, the table of sizes and alignments)."""
MAX_CHAIN_BYTES = 1 << 32
"""A driver must not make a chain longer than 2**32 bytes in total (2.7.5)."""

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


def desc_table_size(size: int) -> int:
    return VIRTQ_DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    return 6 + 2 * size


def used_ring_size(size: int) -> int:
    return 6 + USED_ELEM_SIZE * size


def is_queue_size(size: object) -> bool:
    """A valid queue size: a power of 2 from 1 to 32768."""
    return (isinstance(size, int) and not isinstance(size, bool) and 1 <= size <= MAX_QUEUE_SIZE
            and size & (size - 1) == 0)


@dataclass(frozen=True)
class Descriptor:
    """One ``struct virtq_desc`` (2.7.5)."""

    addr: int
    len: int
    flags: int = 0
    next: int = 0

    def encode(self) -> bytes:
        return _DESC.pack(self.addr, self.len, self.flags, self.next)

    @classmethod
    def decode(cls, data: bytes) -> "Descriptor":
        return cls(*_DESC.unpack(data))


@dataclass(frozen=True)
class QueueLayout:
    """Where a queue of ``size`` entries lies: the guest-physical addresses of its three areas."""

    size: int
    desc: int
    avail: int
    used: int

    def areas(self) -> tuple[tuple[str, int, int, int], ...]:
        """``(name, address, bytes, alignment)`` of the descriptor table, available and used ring."""
        return (("descriptor table", self.desc, desc_table_size(self.size), VIRTQ_DESC_ALIGN),
                ("available ring", self.avail, avail_ring_size(self.size), VIRTQ_AVAIL_ALIGN),
                ("used ring", self.used, used_ring_size(self.size), VIRTQ_USED_ALIGN))

    def check(self, memory: GuestMemory) -> None:
        """Raise :class:`VirtqueueError` unless the size is a power of 2 and each area is aligned and in memory."""
        if not is_queue_size(self.size):
            raise VirtqueueError(f"queue size {self.size} is not a power of 2 between 1 and {MAX_QUEUE_SIZE}")
        for name, address, length, align in self.areas():
            if address % align:
                raise VirtqueueError(f"the {name} at {address:#x} is not {align}-byte aligned")
            if not memory.contains(address, length):
                raise VirtqueueError(f"the {name} [{address:#x}, {address + length:#x}) is not inside guest memory")

    @classmethod
    def packed(cls, size: int, base: int) -> "QueueLayout":
        """The three areas one after another from ``base`` (16-aligned), each at its alignment."""
        desc = base
        avail = desc + desc_table_size(size)
        used = (avail + avail_ring_size(size) + VIRTQ_USED_ALIGN - 1) // VIRTQ_USED_ALIGN * VIRTQ_USED_ALIGN
        return cls(size, desc, avail, used)

    @property
    def end(self) -> int:
        """First address after the used ring."""
        return self.used + used_ring_size(self.size)


class Chain(NamedTuple):
    """A validated descriptor chain: its head's index, its buffers as ``(address, length)``, and the bytes
    of its device-readable buffers in order (read while validating: each range is looked up once).

    A named tuple, not a frozen dataclass: one is built per chain on the notification's hot path
    (there with ``tuple.__new__``, which skips the named tuple's Python-level ``__new__``).
    """

    head: int
    readable: tuple[tuple[int, int], ...]
    writable: tuple[tuple[int, int], ...]
    data: bytes | memoryview
    """A view into guest memory when the chain is one buffer (copy it before the guest runs again)."""


_new_chain = tuple.__new__


def _outside(where: str, index: int, addr: int, length: int) -> VirtqueueError:
    """The error for a descriptor whose buffer is not wholly inside guest memory."""
    return VirtqueueError(f"{where} {index}: buffer [{addr:#x}, {addr + length:#x}) is not inside guest memory")


class DeviceQueue:
    """The device's side of one split virtqueue (2.7.13 and 2.7.14, seen from the device).

    ``layout`` is checked at once (:meth:`QueueLayout.check`).  ``indirect``
    says whether VIRTIO_F_INDIRECT_DESC was negotiated; ``writable`` whether this
    queue may carry device-writable buffers (a transmit queue may not).
    :meth:`pending` counts the chains waiting, :meth:`pop` takes and validates
    the next one, :meth:`put_used` returns one, :meth:`publish_used` makes the
    returned ones visible by storing the used ``idx``.  Every check failure is a
    :class:`VirtqueueError`; the queue then stays where it was.
    """

    def __init__(self, memory: GuestMemory, layout: QueueLayout, *, indirect: bool = False,
                 writable: bool = True, last_avail: int = 0, used_idx: int = 0):
        layout.check(memory)
        self.memory = memory
        self.layout = layout
        self.size = layout.size
        self.indirect = indirect
        self.writable = writable
        self.last_avail = last_avail & 0xFFFF
        """The avail ``idx`` the device has consumed up to (its private copy, free-running)."""
        self.used_idx = used_idx & 0xFFFF
        """The used ``idx`` the device will publish next (free-running)."""
        # Live views of the three areas, bounds-checked once here: the hot path unpacks from them.
        self._desc = memory.view(layout.desc, desc_table_size(layout.size))
        self._avail = memory.view(layout.avail, avail_ring_size(layout.size))
        self._used_bytes = used_ring_size(layout.size)
        self._used = memory.view(layout.used, self._used_bytes)
        self._buffers = memory.window(layout.desc)
        """The region holding the descriptor table, where buffers usually are: each buffer's view comes
        from it (the same check as ``memory.view``, and a buffer elsewhere goes through ``memory``)."""
        self._native_sink: object = None
        self._native: NativeTransmit | None = None
        """:meth:`drain`'s C path into ``_native_sink`` (a Console), made at the first drain into it."""

    def avail_idx(self) -> int:
        return _U16.unpack_from(self._avail, 2)[0]

    def pending(self) -> int:
        """Chains the driver has made available and the device has not taken; more than the size is an error."""
        avail_idx = _U16.unpack_from(self._avail, 2)[0]
        waiting = (avail_idx - self.last_avail) & 0xFFFF
        if waiting > self.size:
            raise VirtqueueError(f"available idx {avail_idx} is {waiting} ahead of the device's "
                                 f"{self.last_avail}: more than the queue size {self.size}")
        return waiting

    def pop(self, gather: bool = True) -> Chain:
        """Take and validate the chain at the device's next available slot (call only while :meth:`pending`).

        With ``gather`` False a chain of several buffers comes without ``data`` (``b""``): a device that
        reads its buffers itself (the block device's megabyte writes) saves the copy.
        """
        slot = self.last_avail % self.size
        head = _U16.unpack_from(self._avail, 4 + 2 * slot)[0]
        if head >= self.size:
            raise VirtqueueError(f"available ring slot {slot} names descriptor {head}, past the queue size {self.size}")
        addr, length, flags, _next = _DESC.unpack_from(self._desc, VIRTQ_DESC_SIZE * head)
        if flags == 0 and length:  # the common case, one device-readable buffer: the same checks, less work
            try:
                data = self._buffers.peek(addr, length)
            except GuestMemoryError:
                raise _outside("descriptor", head, addr, length) from None
            chain = _new_chain(Chain, (head, ((addr, length),), (), data))
        else:
            chain = self._walk(head, gather)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return chain

    def drain(self, sink: Callable[[bytes | memoryview], object]) -> tuple[int, int, LabkitError | None]:
        """Consume every available chain of a queue whose device only reads its buffers (a transmit queue).

        Each chain is validated whole, as :meth:`pop` validates it; its device-readable
        bytes go to ``sink`` (a view into guest memory for a one-buffer chain: copy it
        before the guest runs again), and it comes back on the used ring with ``len``
        0; the used ``idx`` is published once, after the last.  Returns ``(chains,
        bytes, error)``: what was consumed and returned, and the error of the first
        bad chain (``None`` if there was none), whose bytes reach no sink and after
        which nothing is taken (the queue stays at that chain).

        Into a :class:`labkit.vmm.devices.console.Console`, the chains of one buffer in the
        queue's region go through C (``labkit.virtio.native``: the same checks, no Python per
        chain) up to the first other chain, and this loop takes over from there.  The one-buffer
        case of :meth:`pop` is written out here too, with the ring's fields in locals: this runs
        once per notification, and a call costs as much as the checks.
        """
        if sink is not self._native_sink:
            self._native_sink, self._native = sink, native_transmit(self, sink)
        chains = moved = 0
        if self._native is not None:
            chains, moved, stopped = self._native.drain(self)
            if not stopped:
                if chains:
                    self.memory.mark_written(self.layout.used, self._used_bytes)
                return chains, moved, None
        avail, desc, used, size, peek = self._avail, self._desc, self._used, self.size, self._buffers.peek
        last, used_idx = self.last_avail, self.used_idx
        error: LabkitError | None = None
        try:
            for _ in range(self.pending()):
                slot = last % size
                head = _U16.unpack_from(avail, 4 + 2 * slot)[0]
                if head >= size:
                    raise VirtqueueError(f"available ring slot {slot} names descriptor {head}, "
                                         f"past the queue size {size}")
                addr, length, flags, _next = _DESC.unpack_from(desc, VIRTQ_DESC_SIZE * head)
                if flags == 0 and length:
                    try:
                        data: bytes | memoryview = peek(addr, length)
                    except GuestMemoryError:
                        raise _outside("descriptor", head, addr, length) from None
                else:
                    data = self._walk(head).data
                sink(data)
                _USED_ELEM.pack_into(used, 4 + USED_ELEM_SIZE * (used_idx % size), head, 0)
                used_idx = (used_idx + 1) & 0xFFFF
                last = (last + 1) & 0xFFFF
                chains += 1
                moved += len(data)
        except (VirtqueueError, GuestMemoryError) as caught:
            error = caught
        finally:
            self.last_avail, self.used_idx = last, used_idx
            if chains:
                self.publish_used()
        return chains, moved, error

    def _read(self, where: str, index: int, addr: int, length: int) -> bytes:
        """The buffer's bytes; a range outside guest memory (GuestMemory's one check) is a ring error."""
        return bytes(self._view(where, index, addr, length))

    def _view(self, where: str, index: int, addr: int, length: int) -> memoryview:
        """A live read-only view of the buffer (no copy, not counted as written: the device only reads it); a
        range outside guest memory is a ring error."""
        try:
            return self._buffers.peek(addr, length)
        except GuestMemoryError:
            raise _outside(where, index, addr, length) from None

    def _walk(self, head: int, gather: bool = True) -> Chain:
        pieces: list[bytes] = []
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        total = 0
        seen: set[int] = set()
        index = head
        table, entries, where = self._desc, self.size, "descriptor"
        indirect_done = False
        while True:
            if index in seen:  # with every next below the table's size, a chain longer than it must loop
                raise VirtqueueError(f"chain from descriptor {head} loops back to {where} {index} "
                                     f"after {len(seen)} descriptors")
            seen.add(index)
            addr, length, flags, nxt = _DESC.unpack_from(table, VIRTQ_DESC_SIZE * index)
            if flags & ~VIRTQ_DESC_FLAGS:
                raise VirtqueueError(f"{where} {index} has flags {flags:#x}: only NEXT, WRITE and INDIRECT exist")
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise VirtqueueError(f"{where} {index} is INDIRECT but VIRTIO_F_INDIRECT_DESC was not negotiated")
                if indirect_done:
                    raise VirtqueueError(f"{where} {index} inside an indirect table is INDIRECT again")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError(f"{where} {index} sets both INDIRECT and NEXT")
                if length == 0 or length % VIRTQ_DESC_SIZE or length // VIRTQ_DESC_SIZE > MAX_QUEUE_SIZE:
                    raise VirtqueueError(f"{where} {index}: indirect table length {length} is not a multiple "
                                         f"of {VIRTQ_DESC_SIZE} from {VIRTQ_DESC_SIZE} to "
                                         f"{VIRTQ_DESC_SIZE * MAX_QUEUE_SIZE}")
                try:
                    table = self.memory.peek(addr, length)
                except GuestMemoryError:
                    raise VirtqueueError(f"{where} {index}: indirect table [{addr:#x}, {addr + length:#x}) "
                                         f"is not inside guest memory") from None
                entries, where = length // VIRTQ_DESC_SIZE, "indirect descriptor"
                indirect_done = True
                seen = set()
                index = 0
                continue
            if length == 0:
                raise VirtqueueError(f"{where} {index} has length 0")
            total += length
            if total > MAX_CHAIN_BYTES:
                raise VirtqueueError(f"chain from descriptor {head} is longer than 2**32 bytes")
            if flags & VIRTQ_DESC_F_WRITE:
                if not self.writable:
                    raise VirtqueueError(f"{where} {index} is device-writable (WRITE) on a queue the device "
                                         f"only reads (a transmit queue)")
                if not self.memory.contains(addr, length):
                    raise _outside(where, index, addr, length)
                writable.append((addr, length))
            elif writable:
                raise VirtqueueError(f"{where} {index} is device-readable after a device-writable one (2.7.4.2)")
            else:
                if gather:
                    pieces.append(self._read(where, index, addr, length))
                elif not self.memory.contains(addr, length):
                    raise _outside(where, index, addr, length)
                readable.append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return Chain(head, tuple(readable), tuple(writable), b"".join(pieces))
            if nxt >= entries:
                raise VirtqueueError(f"{where} {index}'s next is {nxt}, past the {entries} entries of its table")
            index = nxt

    def put_used(self, head: int, written: int) -> None:
        """Fill the next used-ring slot with ``{id: head, len: written}`` (visible after :meth:`publish_used`)."""
        _USED_ELEM.pack_into(self._used, 4 + USED_ELEM_SIZE * (self.used_idx % self.size), head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def publish_used(self) -> None:
        """Store the used ``idx``: the driver now sees every element put since (2.7.8: len before idx).

        The used ring's pages count as written by the host (``GuestMemory.mark_written``): its view was
        taken when the queue was made ready, and a diff snapshot or a migration round must still carry them.
        """
        _U16.pack_into(self._used, 2, self.used_idx)
        self.memory.mark_written(self.layout.used, self._used_bytes)


class DriverQueue:
    """The driver's side of a split virtqueue, for host code that builds rings in guest memory.

    Follows 2.7.13 "Supplying Buffers to The Device": descriptors are written
    first, then the available ring's slot, then ``idx``.  It writes whatever it
    is told (tests and the fuzz benchmark use it to build bad rings on purpose).
    """

    def __init__(self, memory: GuestMemory, layout: QueueLayout):
        if not is_queue_size(layout.size):
            raise ConfigError(f"queue size {layout.size} is not a power of 2 between 1 and {MAX_QUEUE_SIZE}")
        self.memory = memory
        self.layout = layout
        self.avail_idx = 0

    def clear(self) -> None:
        """Zero all three areas (a freshly allocated queue: both ``idx`` 0, used ``flags`` 0)."""
        for _name, address, length, _align in self.layout.areas():
            self.memory.write(address, bytes(length))
        self.avail_idx = 0

    def set_descriptor(self, index: int, descriptor: Descriptor) -> None:
        self.memory.write(self.layout.desc + VIRTQ_DESC_SIZE * index, descriptor.encode())

    def set_avail_slot(self, slot: int, head: int) -> None:
        self.memory.write(self.layout.avail + 4 + 2 * slot, _U16.pack(head & 0xFFFF))

    def set_avail_idx(self, idx: int) -> None:
        self.memory.write(self.layout.avail + 2, _U16.pack(idx & 0xFFFF))

    def add_chain(self, buffers: Sequence[tuple[int, int]], first: int) -> int:
        """Describe ``buffers`` (address, length) with descriptors ``first``, ``first + 1``, ... and make the
        chain available (not yet published); returns the next free descriptor index."""
        for offset, (address, length) in enumerate(buffers):
            last = offset == len(buffers) - 1
            index = first + offset
            self.set_descriptor(index, Descriptor(address, length, 0 if last else VIRTQ_DESC_F_NEXT, 0 if last
                                                  else index + 1))
        self.set_avail_slot(self.avail_idx % self.layout.size, first)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return first + len(buffers)

    def publish(self) -> None:
        """Store the available ``idx``: the device may now take every chain added."""
        self.set_avail_idx(self.avail_idx)

    def used_idx(self) -> int:
        return _U16.unpack(self.memory.read(self.layout.used + 2, 2))[0]

    def used_element(self, slot: int) -> tuple[int, int]:
        """``(id, len)`` of used-ring slot ``slot``."""
        return _USED_ELEM.unpack(self.memory.read(self.layout.used + 4 + USED_ELEM_SIZE * slot, USED_ELEM_SIZE))

