"""A host-side virtio-blk driver: requests built in guest RAM, as ``guests/blk64.S`` builds them, for tests and benchmarks.

:class:`BlockDriver` initialises a :class:`labkit.virtio.blk.VirtioBlock`
through its virtio-mmio registers (3.1.1, 4.2.3), lays the request queue out
at :data:`QUEUE_BASE`, and submits requests (5.2.6) as chains of three
descriptors: the 16-byte header (device-readable), the data (device-readable
for a write, device-writable for a read or GET_ID) and the status byte
(device-writable).  It writes whatever it is told, so the fuzz test builds bad
requests with it too.
"""

from __future__ import annotations

from dataclasses import dataclass

from labkit.errors import ConfigError
from labkit.memory import GuestMemory
from labkit.virtio import transport as t
from labkit.virtio.blk import HEADER, REQUESTQ, VirtioBlock
from labkit.virtio.ring import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, Descriptor, DriverQueue, QueueLayout

QUEUE_BASE = 0x81000
"""Descriptor table, then the available ring, then the used ring (``QueueLayout.packed``)."""
HEADERS = 0x88000
"""Request ``i``'s header at ``HEADERS + 16 * i`` and its status byte at ``STATUSES + i``."""
STATUSES = 0x8C000


@dataclass(frozen=True)
class Request:
    """One request: ``kind`` (VIRTIO_BLK_T_*), ``sector``, its data buffer in guest RAM and whether the device
    writes it (``into_guest``: a read or GET_ID)."""

    kind: int
    sector: int
    address: int = 0
    length: int = 0
    into_guest: bool = False


class BlockDriver:
    """Drives ``device`` over ``memory`` with a queue of ``size`` entries (three descriptors per request)."""

    def __init__(self, memory: GuestMemory, device: VirtioBlock, size: int = 256):
        self.memory = memory
        self.device = device
        self.layout = QueueLayout.packed(size, QUEUE_BASE)
        self.queue = DriverQueue(memory, self.layout)
        self.queue.clear()
        register = device.write
        register(t.STATUS, 4, 0)
        register(t.STATUS, 4, t.STATUS_ACKNOWLEDGE | t.STATUS_DRIVER)
        for word in (0, 1):
            register(t.DRIVER_FEATURES_SEL, 4, word)
            register(t.DRIVER_FEATURES, 4, (t.VIRTIO_F_VERSION_1 >> (32 * word)) & 0xFFFFFFFF)
        register(t.STATUS, 4, t.STATUS_ACKNOWLEDGE | t.STATUS_DRIVER | t.STATUS_FEATURES_OK)
        register(t.QUEUE_SEL, 4, REQUESTQ)
        register(t.QUEUE_SIZE, 4, size)
        for low, address in ((t.QUEUE_DESC_LOW, self.layout.desc), (t.QUEUE_DRIVER_LOW, self.layout.avail),
                             (t.QUEUE_DEVICE_LOW, self.layout.used)):
            register(low, 4, address & 0xFFFFFFFF)
            register(low + 4, 4, address >> 32)
        register(t.QUEUE_READY, 4, 1)
        register(t.STATUS, 4, t.STATUS_ACKNOWLEDGE | t.STATUS_DRIVER | t.STATUS_FEATURES_OK | t.STATUS_DRIVER_OK)

    def post(self, requests: list[Request]) -> list[int]:
        """Make ``requests`` available (not yet notified); returns each one's status-byte address."""
        statuses = []
        if len(requests) > self.layout.size // 3:
            raise ConfigError(f"at most {self.layout.size // 3} requests at once on a queue of {self.layout.size}")
        for request in requests:
            n = self.queue.avail_idx % (self.layout.size // 3)
            first = 3 * n
            header, status = HEADERS + 16 * n, STATUSES + n
            self.memory.write(header, HEADER.pack(request.kind, 0, request.sector))
            self.memory.write(status, b"\xff")
            chain = [Descriptor(header, HEADER.size, VIRTQ_DESC_F_NEXT, first + 1)]
            if request.length:
                flags = VIRTQ_DESC_F_NEXT | (VIRTQ_DESC_F_WRITE if request.into_guest else 0)
                chain.append(Descriptor(request.address, request.length, flags, first + 2))
            chain.append(Descriptor(status, 1, VIRTQ_DESC_F_WRITE, 0))
            for offset, descriptor in enumerate(chain):
                self.queue.set_descriptor(first + offset, descriptor)
            self.queue.set_avail_slot(self.queue.avail_idx % self.layout.size, first)
            self.queue.avail_idx = (self.queue.avail_idx + 1) & 0xFFFF
            statuses.append(status)
        self.queue.publish()
        return statuses

    def submit(self, requests: list[Request]) -> list[int | None]:
        """Post ``requests``, notify once, and return each one's status (``None``: not answered)."""
        statuses = self.post(requests)
        self.device.notify(REQUESTQ)
        return self.answers(statuses)

    def answers(self, statuses: list[int]) -> list[int | None]:
        """The status byte of each request, ``None`` where the device has not answered (still 0xff)."""
        return [None if byte == 0xFF else byte for byte in (self.memory.read(s, 1)[0] for s in statuses)]
