"""A virtio block device (virtio 1.x, 5.2; device ID 2) on the virtio-mmio transport, over a :class:`Disk`.

What is modelled: one request queue (5.2.2, ``requestq`` 0, at most 256
entries), the configuration field ``capacity`` (5.2.4: le64, in 512-byte
sectors; the other fields read 0, their features not offered), the features
VIRTIO_F_VERSION_1, VIRTIO_F_INDIRECT_DESC, VIRTIO_BLK_F_FLUSH and, for a
read-only disk, VIRTIO_BLK_F_RO, and the requests of 5.2.6::

    struct virtio_blk_req {              the chain, in this order
        le32 type;      le32 reserved;   device-readable, 16 bytes (the header)
        le64 sector;                     (in 512-byte units, whatever the disk's block size)
        u8 data[];                       device-readable for OUT, device-writable for IN / GET_ID
        u8 status;                       device-writable, the chain's last byte
    };

with ``type`` VIRTIO_BLK_T_IN 0 (read), OUT 1 (write), FLUSH 4, GET_ID 8 (a
20-byte serial, NUL-padded).  Every other type (DISCARD, WRITE_ZEROES, ...)
gets VIRTIO_BLK_S_UNSUPP.  Not modelled: interrupts (the guest polls the used
ring, as with the console), VIRTIO_F_EVENT_IDX, multiqueue, the geometry,
topology and discard fields.

Every value of a request is the guest's and is checked before the disk is
touched: a chain without a 16-byte header or without a device-writable last
byte cannot be answered and sets DEVICE_NEEDS_RESET (as QEMU's "missing
headers"), like any bad ring (:class:`labkit.virtio.ring.DeviceQueue`'s
checks).  A request that can be answered but is wrong (data not a whole
number of sectors, sectors past the capacity, data on the wrong side, a write
to a read-only disk) gets VIRTIO_BLK_S_IOERR and the disk is neither read nor
written; guest memory is written only in the chain's device-writable buffers.

A write the disk cannot store (:class:`labkit.errors.DatastoreFull`: the
datastore's capacity or ENOSPC) is not answered: the device takes the chain
back (the avail position steps back by one, nothing goes on the used ring),
pauses the machine with a message naming the disk and the shortage
(``DeviceContext.pause``, as QEMU's ``werror=enospc`` stops a VM), and asks to
be called at the next run (``DeviceContext.on_resume``), when it retries the
same chain and goes on with the rest of the queue.  A retry refused again
pauses again.  So every request the guest saw completed is stored, and none
is completed twice.  Other disk errors answer VIRTIO_BLK_S_IOERR.

The disk is opened where the machine's core runs (the emulator's worker
process, or beside KVM): :func:`block_devices` takes the image's path or a
function that opens it, never an open file (its descriptor would not exist in
the worker).
"""

from __future__ import annotations

import os
import struct
from typing import Any, Callable, Protocol, runtime_checkable

from labkit.errors import ConfigError, DatastoreFull, GuestMemoryError, StorageError, VirtqueueError
from labkit.memory import GuestMemory
from labkit.virtio import transport as t
from labkit.virtio.ring import Chain, DeviceQueue
from labkit.virtio.transport import INTERRUPT_USED_BUFFER, NotifyPort, VirtioMmioDevice
from labkit.vmm.devices.spec import DeviceContext, DeviceSpec
from labkit.x86 import layout

DEVICE_ID_BLOCK = 2
REQUESTQ = 0
SECTOR_SIZE = 512
"""``sector`` and ``capacity`` count 512-byte units (5.2.6.4), whatever the disk's block size."""

VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_FLUSH = 1 << 9
DEVICE_FEATURES = t.VIRTIO_F_VERSION_1 | t.VIRTIO_F_INDIRECT_DESC | VIRTIO_BLK_F_FLUSH

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_ID_BYTES = 20
HEADER = struct.Struct("<IIQ")
"""``type``, ``reserved``, ``sector``: the request's first 16 bytes."""

DEVICE_NAME = "virtio-blk"


@runtime_checkable
class Disk(Protocol):
    """What the block device needs of a disk: ``size`` bytes, read, write, flush, close.

    ``labkit.storage``'s images (raw, qcow2 overlays, opened alone or through a
    ``Datastore``) are disks.  ``write`` raises :class:`labkit.errors.DatastoreFull`
    when it cannot store the bytes and then must have changed nothing the disk
    reads back.
    """

    size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class VirtioBlock(VirtioMmioDevice):
    """The device: virtio-mmio registers, the request queue, and the disk behind it.

    ``pause(message)`` and ``on_resume(callback)`` are the machine's (see
    :class:`labkit.vmm.devices.spec.DeviceContext`).  Counters for the lesson:
    ``requests`` answered, ``reads``/``writes`` and ``bytes_read``/``bytes_written``
    done on the disk, ``flushes``, ``errors`` (IOERR or UNSUPP answers),
    ``stalls`` (writes the disk could not store: each paused the machine).
    ``stalled`` says why the device waits, while it does.
    """

    DEVICE_ID = DEVICE_ID_BLOCK
    QUEUE_WRITABLE = (True,)
    COUNTERS = ("notifications", "ignored", "resets", "requests", "reads", "writes", "bytes_read",
                "bytes_written", "flushes", "errors", "stalls")
    KIND = "virtio block device"
    requests: int
    reads: int
    writes: int
    bytes_read: int
    bytes_written: int
    flushes: int
    errors: int
    stalls: int

    def __init__(self, memory: GuestMemory, disk: Disk, *, name: str = DEVICE_NAME, serial: bytes = b"",
                 pause: Callable[[str], None], on_resume: Callable[[Callable[[], None]], None]):
        if not isinstance(disk, Disk):
            raise ConfigError(f"a virtio block device needs a disk with size, read, write, flush and close, "
                              f"not {type(disk).__name__}")
        if disk.size % SECTOR_SIZE:
            raise ConfigError(f"a virtio block device's disk must be whole 512-byte sectors; {disk.size} bytes is not")
        self.disk = disk
        self.name = name
        self.serial = (serial or name.encode())[:VIRTIO_BLK_ID_BYTES]
        self.read_only = not getattr(disk, "writable", True)
        self.FEATURES = DEVICE_FEATURES | (VIRTIO_BLK_F_RO if self.read_only else 0)
        self._pause = pause
        self._on_resume = on_resume
        self.stalled: str | None = None
        super().__init__(memory)

    @property
    def capacity(self) -> int:
        """The disk's size in 512-byte sectors."""
        return self.disk.size // SECTOR_SIZE

    def config(self) -> bytes:
        """5.2.4: ``capacity`` (le64); the fields after it are not offered and read 0."""
        return struct.pack("<Q", self.capacity) + bytes(0x3C - 8)

    def save(self) -> dict[str, Any]:
        return {**super().save(), "stalled": self.stalled}

    def restore(self, state: dict[str, Any]) -> None:
        super().restore(state)
        self.stalled = state["stalled"]
        if self.stalled is not None:  # a machine saved while paused on a full disk retries when it runs
            self._on_resume(self._retry)

    def close(self) -> None:
        """Close the disk (the machine closes its devices)."""
        self.disk.close()

    # -- requests ------------------------------------------------------------

    def process(self, index: int, queue: DeviceQueue) -> None:
        """Answer every available request, in order; stop at one the disk cannot store (and pause)."""
        if self.stalled is not None:
            return  # the stalled request is retried when the machine runs again, and those after it then
        answered = 0
        try:
            waiting = queue.pending()
            while waiting:
                position = queue.last_avail
                chain = queue.pop(gather=False)  # the data is written to the disk from guest memory directly
                try:
                    written = self._answer(chain)
                except DatastoreFull as error:
                    queue.last_avail = position  # not taken: the same chain is retried
                    self._stall(error)
                    break
                queue.put_used(chain.head, written)
                answered += 1
                waiting -= 1
        except (VirtqueueError, GuestMemoryError) as error:
            self.fail(f"queue {REQUESTQ}: {error}")
        if answered:
            queue.publish_used()
            self.requests += answered
            self.interrupt_status |= INTERRUPT_USED_BUFFER

    def _stall(self, error: DatastoreFull) -> None:
        self.stalls += 1
        self.stalled = (f"{self.name}: a guest write to {self.disk_name()} cannot be stored: {error} "
                        f"(needs {error.needed} bytes, {error.available} free); the VM is paused, nothing it "
                        f"was told is written is lost; free space and run it again")
        self._on_resume(self._retry)
        self._pause(self.stalled)

    def _retry(self) -> None:
        """At the next run: take up the queue where it stopped (the stalled write first)."""
        self.stalled = None
        ring = self.rings[REQUESTQ]
        if ring is not None and not self.needs_reset and self.status & t.STATUS_DRIVER_OK:
            self.process(REQUESTQ, ring)

    def disk_name(self) -> str:
        return os.path.basename(str(getattr(self.disk, "filename", self.name)))

    def _answer(self, chain: Chain) -> int:
        """Carry out one request; its status byte written; returns the bytes written into the chain.

        Raises VirtqueueError for a chain that cannot carry a request, DatastoreFull for a write that cannot be
        stored (nothing of the request is answered then).
        """
        readable = sum(length for _address, length in chain.readable)
        writable = sum(length for _address, length in chain.writable)
        if readable < HEADER.size:
            raise VirtqueueError(f"request {chain.head}: {readable} device-readable bytes, fewer than the "
                                 f"{HEADER.size}-byte header (type, reserved, sector)")
        if writable < 1:
            raise VirtqueueError(f"request {chain.head}: no device-writable byte for the status")
        kind, _reserved, sector = HEADER.unpack(self._gather(chain, HEADER.size))
        out_bytes = readable - HEADER.size  # data the driver gave
        in_bytes = writable - 1  # room for data the device returns
        if kind == VIRTIO_BLK_T_IN:
            status = self._check_io(sector, in_bytes, out_bytes == 0)
            if status == VIRTIO_BLK_S_OK:
                status = self._disk_io(lambda: self._read(sector * SECTOR_SIZE, chain.writable, in_bytes))
        elif kind == VIRTIO_BLK_T_OUT:
            status = self._check_io(sector, out_bytes, in_bytes == 0 and not self.read_only)
            if status == VIRTIO_BLK_S_OK:
                status = self._disk_io(lambda: self._write(sector * SECTOR_SIZE, chain, out_bytes))
            in_bytes = 0
        elif kind == VIRTIO_BLK_T_FLUSH:
            status = self._disk_io(self._flush) if out_bytes == 0 and in_bytes == 0 else VIRTIO_BLK_S_IOERR
        elif kind == VIRTIO_BLK_T_GET_ID:
            status, in_bytes = VIRTIO_BLK_S_IOERR, min(in_bytes, VIRTIO_BLK_ID_BYTES)
            if out_bytes == 0:
                self._scatter(chain.writable, self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:in_bytes])
                status = VIRTIO_BLK_S_OK
        else:
            status = VIRTIO_BLK_S_UNSUPP
        if status != VIRTIO_BLK_S_OK:
            self.errors += 1
            in_bytes = 0
        address, length = chain.writable[-1]
        self.memory.write(address + length - 1, bytes((status,)))
        return in_bytes + 1

    def _check_io(self, sector: int, length: int, layout_ok: bool) -> int:
        """IOERR unless the data is on the right side, whole sectors, and inside the disk."""
        if not layout_ok or length % SECTOR_SIZE or sector > self.capacity \
                or length // SECTOR_SIZE > self.capacity - sector:
            return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK

    def _disk_io(self, operation: Callable[[], None]) -> int:
        """Run ``operation``; a disk error other than a full datastore is the guest's IOERR."""
        try:
            operation()
        except DatastoreFull:
            raise
        except (StorageError, OSError):
            return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK

    def _read(self, offset: int, buffers: tuple[tuple[int, int], ...], length: int) -> None:
        data = self.disk.read(offset, length) if length else b""
        self._scatter(buffers, data)
        self.reads += 1
        self.bytes_read += length

    def _scatter(self, buffers: tuple[tuple[int, int], ...], data: bytes) -> None:
        """``data`` into the device-writable buffers in order (never the status byte: ``data`` is shorter)."""
        done = 0
        for address, length in buffers:
            if done >= len(data):
                break
            piece = min(length, len(data) - done)
            self.memory.view(address, piece)[:] = data[done:done + piece]
            done += piece

    def _gather(self, chain: Chain, length: int) -> bytes:
        """The first ``length`` device-readable bytes of the chain (the header)."""
        if chain.data:
            return bytes(chain.data[:length])
        pieces, left = [], length
        for address, size in chain.readable:
            if not left:
                break
            pieces.append(self.memory.read(address, min(size, left)))
            left -= len(pieces[-1])
        return b"".join(pieces)

    def _write(self, offset: int, chain: Chain, length: int) -> None:
        """The device-readable bytes after the header to the disk from ``offset``, buffer by buffer, no copy."""
        skip = HEADER.size
        for address, size in chain.readable:
            if skip >= size:
                skip -= size
                continue
            self.disk.write(offset, self.memory.view(address + skip, size - skip))
            offset += size - skip
            skip = 0
        self.writes += 1
        self.bytes_written += length

    def _flush(self) -> None:
        self.disk.flush()
        self.flushes += 1


def open_disk(source: Any) -> Disk:
    """The disk ``source`` names: a path (an image file, its format probed, opened for writing) or an opener."""
    if isinstance(source, (str, os.PathLike)):
        from labkit.storage import open_image

        return open_image(os.fspath(source), writable=True)
    if callable(source):
        disk = source()
        if not isinstance(disk, Disk):
            raise ConfigError(f"the disk opener returned {type(disk).__name__}, not a disk "
                              f"(size, read, write, flush, close)")
        return disk
    raise ConfigError(f"a block device's disk is an image path or a function that opens one, not "
                      f"{type(source).__name__} (an open disk would not exist in the emulator's worker process)")


def block_devices(disk: Any, name: str = DEVICE_NAME, *, base: int = layout.VIRTIO_BLK_MMIO_BASE,
                  notify_port: int = layout.VIRTIO_BLK_NOTIFY_PORT, serial: bytes = b"") -> list[DeviceSpec]:
    """The virtio block device for ``Machine(devices=...)``: its register block (MMIO) and notify port (PIO).

    ``disk`` is an image's path or a function returning an open :class:`Disk`
    (``lambda: datastore.open("vm1.qcow2")``); it is opened where the machine's
    core runs, and closed with the machine.  ``Machine.device_state(name)`` is
    the device's :meth:`VirtioBlock.save`.
    """
    if not (isinstance(disk, (str, os.PathLike)) or callable(disk)):
        open_disk(disk)  # raises the one clear error
    if not isinstance(serial, bytes) or len(serial) > VIRTIO_BLK_ID_BYTES:
        raise ConfigError(f"a virtio block serial is at most {VIRTIO_BLK_ID_BYTES} bytes, not {serial!r}")

    def build(context: DeviceContext) -> VirtioBlock:
        return VirtioBlock(context.memory, open_disk(disk), name=name, serial=serial, pause=context.pause,
                           on_resume=context.on_resume)

    def build_port(context: DeviceContext) -> NotifyPort:
        return NotifyPort(context.device(name))

    return [DeviceSpec(name, "mmio", base, t.MMIO_SIZE, build),
            DeviceSpec(f"{name}-notify", "pio", notify_port, 2, build_port)]


# -- the guest driver's parameters and answer (guests/blk64.S) ------------------------------

PARAMS_ADDRESS = 0x80000
"""Where ``blk64`` reads its parameter block (``Machine.write_memory`` before the run)."""
PARAMS_MAGIC = 0x42504B42  # "BKPB"
PATTERNS = ("sequential", "random", "rewrite")
_MIX = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


def blk64_parameters(pattern: str = "sequential", sectors: int = 8, requests: int = 8, seed: int = 1) -> bytes:
    """The parameter block of ``blk64``: ``requests`` writes of ``sectors`` sectors each, where ``pattern`` says."""
    if pattern not in PATTERNS:
        raise ConfigError(f"the write pattern is one of {', '.join(PATTERNS)}, not {pattern!r}")
    if not 1 <= sectors <= 128 or not 1 <= requests < 1 << 32 or not 1 <= seed < 1 << 32:
        raise ConfigError(f"blk64 takes 1-128 sectors per request, at least one request and a seed from 1 to "
                          f"2**32-1; got {sectors}, {requests}, {seed}")
    return struct.pack("<5I", PARAMS_MAGIC, PATTERNS.index(pattern), sectors, requests, seed)


def blk64_sectors(pattern: str, sectors: int, requests: int, seed: int, capacity: int) -> list[int]:
    """The first sector of each of ``blk64``'s requests (the same computation as the guest's ``pick``)."""
    extents = capacity // sectors
    state, firsts = seed, []
    for number in range(requests):
        if pattern == "random":
            state ^= (state << 13) & _MASK
            state ^= state >> 7
            state ^= (state << 17) & _MASK
            extent = state % extents
        else:
            extent = number % 4 if pattern == "rewrite" else number
        firsts.append(extent * sectors)
    return firsts


def blk64_qword(index: int, seed: int) -> int:
    """What ``blk64`` writes as the ``index``-th 64-bit word of the disk."""
    return ((index * _MIX) & _MASK) ^ seed


def blk64_console(pattern: str = "sequential", sectors: int = 8, requests: int = 8, seed: int = 1, *,
                  capacity: int) -> str:
    """The console of a ``blk64`` run that verified everything, computed here without running it."""
    checksum = 0
    for first in blk64_sectors(pattern, sectors, requests, seed, capacity):
        for index in range(64 * first, 64 * (first + sectors)):
            checksum = (((checksum << 1) | (checksum >> 63)) & _MASK) + blk64_qword(index, seed) & _MASK
    return f"blk64 checksum {checksum:016x}\n"
