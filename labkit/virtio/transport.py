"""The numbers a virtio driver and device share: status bits, feature bits, and the virtio-mmio registers.

Device status (virtio 1.x, 2.1), set by the driver in this order during
initialisation (3.1.1), except DEVICE_NEEDS_RESET, which only the device sets:
ACKNOWLEDGE 1, DRIVER 2, FEATURES_OK 8, DRIVER_OK 4; FAILED 128; DEVICE_NEEDS_RESET 64.

Feature bits (6): VIRTIO_F_INDIRECT_DESC 28, VIRTIO_F_VERSION_1 32 (a non-legacy
device offers it and the driver must accept it).

virtio-mmio registers (4.2.2, "MMIO Device Register Layout"): 32-bit little-endian
registers at these offsets from the device's base, R = read-only, W = write-only.
labkit places the console at ``layout.VIRTIO_MMIO_BASE`` and the block device
at ``layout.VIRTIO_BLK_MMIO_BASE``; each device's queue notification goes to a
port of its own (``layout.VIRTIO_NOTIFY_PORT``, ``layout.VIRTIO_BLK_NOTIFY_PORT``)
as well as to ``QueueNotify`` (both work).

:class:`VirtioMmioDevice` is the part every device type shares (the registers,
status and feature negotiation, queue set-up and DEVICE_NEEDS_RESET), and
:class:`NotifyPort` the notification port; ``labkit.virtio.console`` and
``labkit.virtio.blk`` add what their device type does with a notification.
"""

from __future__ import annotations

from typing import Any

from labkit.errors import ConfigError, VirtqueueError
from labkit.memory import GuestMemory
from labkit.virtio.ring import DeviceQueue, QueueLayout

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_VERSION_1 = 1 << 32

MAGIC_VALUE = 0x74726976
"""``"virt"`` read as a little-endian 32-bit value."""
MMIO_VERSION = 2
"""virtio-mmio version 2: the non-legacy interface."""
VENDOR_ID = 0x4C42  # "LB": labkit
MMIO_SIZE = 0x200
"""Registers (0x000-0x0ff) and the device-specific configuration space from 0x100."""

# Register offsets (4.2.2).
MAGIC = 0x000                  # R
VERSION = 0x004                # R
DEVICE_ID = 0x008              # R
VENDOR = 0x00C                 # R
DEVICE_FEATURES = 0x010        # R  (32 bits selected by DEVICE_FEATURES_SEL)
DEVICE_FEATURES_SEL = 0x014    # W
DRIVER_FEATURES = 0x020        # W  (32 bits selected by DRIVER_FEATURES_SEL)
DRIVER_FEATURES_SEL = 0x024    # W
QUEUE_SEL = 0x030              # W
QUEUE_SIZE_MAX = 0x034         # R  (QueueNumMax before 1.2)
QUEUE_SIZE = 0x038             # W  (QueueNum)
QUEUE_READY = 0x044            # RW
QUEUE_NOTIFY = 0x050           # W
INTERRUPT_STATUS = 0x060       # R
INTERRUPT_ACK = 0x064          # W
STATUS = 0x070                 # RW (writing 0 resets the device)
QUEUE_DESC_LOW = 0x080         # W
QUEUE_DESC_HIGH = 0x084        # W
QUEUE_DRIVER_LOW = 0x090       # W  (the available ring)
QUEUE_DRIVER_HIGH = 0x094      # W
QUEUE_DEVICE_LOW = 0x0A0       # W  (the used ring)
QUEUE_DEVICE_HIGH = 0x0A4      # W
CONFIG_GENERATION = 0x0FC      # R
CONFIG = 0x100                 # device-specific configuration space


INTERRUPT_USED_BUFFER = 1
INTERRUPT_CONFIG_CHANGE = 2
QUEUE_ENTRIES_MAX = 256
"""What ``QueueSizeMax`` says for every queue of a labkit virtio device."""


class QueueConfig:
    """What the driver wrote for one queue (the registers QueueSel selects)."""

    __slots__ = ("size", "ready", "desc", "driver", "device")

    def __init__(self) -> None:
        self.size = QUEUE_ENTRIES_MAX
        self.ready = 0
        self.desc = 0
        self.driver = 0
        self.device = 0

    def layout(self) -> QueueLayout:
        return QueueLayout(self.size, self.desc, self.driver, self.device)

    def save(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    def restore(self, state: dict[str, int]) -> None:
        for name in self.__slots__:
            setattr(self, name, int(state[name]))


class VirtioMmioDevice:
    """A virtio device's virtio-mmio side (4.2.2): registers, status, features, queues; one per device type.

    A device type sets :attr:`DEVICE_ID`, :attr:`FEATURES` (what it offers; the
    driver may accept any subset that includes VIRTIO_F_VERSION_1),
    :attr:`QUEUE_WRITABLE` (one entry per queue: whether it may carry
    device-writable buffers) and implements :meth:`process` (a notification of
    a live queue) and, if it has one, :meth:`config` (its configuration space).
    The ring of a ready queue is a :class:`DeviceQueue` in :attr:`rings`; a bad
    queue or ring goes through :meth:`fail` (DEVICE_NEEDS_RESET, 2.1.2).  Only
    aligned 32-bit register accesses act; the configuration space may be read
    with 8-, 16-, 32- or 64-bit accesses (4.2.2.2) and is read-only here.
    """

    DEVICE_ID = 0
    FEATURES = VIRTIO_F_VERSION_1
    QUEUE_WRITABLE: tuple[bool, ...] = ()
    COUNTERS: tuple[str, ...] = ("notifications", "ignored", "resets")
    KIND = "virtio device"
    notifications: int
    ignored: int
    resets: int

    def __init__(self, memory: GuestMemory):
        self.memory = memory
        self.reset()

    # -- state ---------------------------------------------------------------

    def reset(self) -> None:
        """Power-on: the device's reset, and the counters at 0."""
        for name in self.COUNTERS:
            setattr(self, name, 0)
        self._device_reset()

    def _device_reset(self) -> None:
        """The driver's reset (status 0; 2.1, 4.2.2: queues not ready, interrupt status clear); counters kept."""
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.queues = [QueueConfig() for _ in self.QUEUE_WRITABLE]
        self.rings: list[DeviceQueue | None] = [None] * len(self.QUEUE_WRITABLE)
        self.error: str | None = None
        """Why the device needs a reset (None while it does not)."""

    def save(self) -> dict[str, Any]:
        """Registers, queue configuration, the rings' positions, counters and the error, as plain data."""
        return {"status": self.status, "device_features_sel": self.device_features_sel,
                "driver_features_sel": self.driver_features_sel, "driver_features": self.driver_features,
                "queue_sel": self.queue_sel, "interrupt_status": self.interrupt_status,
                "queues": [queue.save() for queue in self.queues], "error": self.error,
                **self.save_rings(), **{name: getattr(self, name) for name in self.COUNTERS}}

    def save_rings(self) -> dict[str, Any]:
        """The device's private ring positions (``last_avail``, used ``idx``) of each open ring."""
        return {"rings": [None if ring is None else [ring.last_avail, ring.used_idx] for ring in self.rings]}

    def restore(self, state: dict[str, Any]) -> None:
        missing = set(self.save()) - set(state)
        if missing:
            raise ConfigError(f"a {self.KIND} state needs {', '.join(sorted(missing))}")
        self.reset()
        for name in ("status", "device_features_sel", "driver_features_sel", "driver_features", "queue_sel",
                     "interrupt_status", *self.COUNTERS):
            setattr(self, name, int(state[name]))
        for queue, saved in zip(self.queues, state["queues"]):
            queue.restore(saved)
        self.error = state["error"]
        if not self.needs_reset:
            self.restore_rings(state)

    def restore_rings(self, state: dict[str, Any]) -> None:
        for index, position in enumerate(state["rings"]):
            if position is not None and self.queues[index].ready:
                self.open_ring(index, int(position[0]), int(position[1]))

    @property
    def needs_reset(self) -> bool:
        return bool(self.status & STATUS_DEVICE_NEEDS_RESET)

    def fail(self, reason: str) -> None:
        """DEVICE_NEEDS_RESET (2.1.2): stop consuming until the driver resets the device."""
        if self.error is None:
            self.error = reason
        self.status |= STATUS_DEVICE_NEEDS_RESET
        self.rings = [None] * len(self.rings)
        if self.status & STATUS_DRIVER_OK:  # the device must signal a configuration change
            self.interrupt_status |= INTERRUPT_CONFIG_CHANGE

    # -- what a device type provides -----------------------------------------

    def config(self) -> bytes:
        """The device-specific configuration space (its layout is the device type's); none by default."""
        return b""

    def process(self, index: int, ring: DeviceQueue) -> None:
        """An available-buffer notification of queue ``index``, whose ring is live."""
        raise NotImplementedError(f"{type(self).__name__} handles no queue notification")

    # -- virtio-mmio registers (4.2.2) ---------------------------------------

    def read(self, offset: int, size: int) -> int:
        if offset >= CONFIG:
            space = self.config()
            start = offset - CONFIG
            if size not in (1, 2, 4, 8) or start % size or start + size > len(space):
                return 0  # not a field of the configuration space
            return int.from_bytes(space[start:start + size], "little")
        if size != 4 or offset % 4:
            return 0  # the driver must use aligned 32-bit accesses; others read nothing
        queue = self._selected()
        if offset == MAGIC:
            return MAGIC_VALUE
        if offset == VERSION:
            return MMIO_VERSION
        if offset == DEVICE_ID:
            return self.DEVICE_ID
        if offset == VENDOR:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            return (self.FEATURES >> (32 * self.device_features_sel)) & 0xFFFFFFFF \
                if self.device_features_sel < 2 else 0
        if offset == QUEUE_SIZE_MAX:
            return QUEUE_ENTRIES_MAX if queue is not None else 0
        if offset == QUEUE_READY:
            return queue.ready if queue is not None else 0
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        return 0  # write-only registers and holes read 0 (ConfigGeneration: the config never changes)

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 4 or offset % 4 or offset >= CONFIG:
            return  # not an access the driver may make; the configuration space is read-only
        value &= 0xFFFFFFFF
        if offset == STATUS:
            self._write_status(value)
        elif offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            if self.driver_features_sel < 2 and not self.status & STATUS_FEATURES_OK:
                shift = 32 * self.driver_features_sel
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == QUEUE_NOTIFY:
            self.notify(value)
        elif offset == INTERRUPT_ACK:
            self.interrupt_status &= ~value
        else:
            self._write_queue(offset, value)

    def _selected(self) -> QueueConfig | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _write_queue(self, offset: int, value: int) -> None:
        queue = self._selected()
        if queue is None:
            return
        if offset == QUEUE_READY:
            if value & 1 and not queue.ready:
                self._make_ready(self.queue_sel)
            elif not value & 1:
                queue.ready = 0
                self.rings[self.queue_sel] = None
            return
        if queue.ready:
            return  # the driver must not change a ready queue's size or addresses (4.2.2.2)
        if offset == QUEUE_SIZE:
            queue.size = value
        elif offset in _LOW:
            setattr(queue, _LOW[offset], (getattr(queue, _LOW[offset]) & ~0xFFFFFFFF) | value)
        elif offset in _HIGH:
            setattr(queue, _HIGH[offset], (getattr(queue, _HIGH[offset]) & 0xFFFFFFFF) | (value << 32))

    def _make_ready(self, index: int) -> None:
        queue = self.queues[index]
        if queue.size > QUEUE_ENTRIES_MAX:
            self.fail(f"queue {index}: size {queue.size} is above QueueSizeMax {QUEUE_ENTRIES_MAX}")
            return
        try:
            queue.layout().check(self.memory)
        except VirtqueueError as error:
            self.fail(f"queue {index}: {error}")
            return
        queue.ready = 1
        if not self.needs_reset:
            self.open_ring(index, 0, 0)

    def open_ring(self, index: int, last_avail: int, used_idx: int) -> None:
        try:
            self.rings[index] = DeviceQueue(self.memory, self.queues[index].layout(),
                                            writable=self.QUEUE_WRITABLE[index],
                                            indirect=bool(self.driver_features & VIRTIO_F_INDIRECT_DESC),
                                            last_avail=last_avail, used_idx=used_idx)
        except VirtqueueError as error:
            self.fail(f"queue {index}: {error}")

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.resets += 1
            self._device_reset()
            return
        value &= 0xFF & ~STATUS_DEVICE_NEEDS_RESET  # only the device sets DEVICE_NEEDS_RESET
        if value & STATUS_FEATURES_OK and not self.status & STATUS_FEATURES_OK:
            accepted = (self.driver_features & ~self.FEATURES) == 0 \
                and bool(self.driver_features & VIRTIO_F_VERSION_1)
            if not accepted:  # the device leaves FEATURES_OK clear: the driver sees it did not take
                value &= ~STATUS_FEATURES_OK
        self.status = value | (self.status & STATUS_DEVICE_NEEDS_RESET)

    # -- the queue notification ---------------------------------------------

    def notify(self, value: int) -> None:
        """An available-buffer notification for queue ``value & 0xffff`` (no VIRTIO_F_NOTIFICATION_DATA).

        Ignored (counted) unless the device is DRIVER_OK, needs no reset and the queue is ready;
        else :meth:`process`.  Never raises for what the guest put in memory.
        """
        self.notifications += 1
        index = value & 0xFFFF
        ring = self.rings[index] if index < len(self.rings) else None
        if ring is None or self.status & (STATUS_DEVICE_NEEDS_RESET | STATUS_DRIVER_OK) != STATUS_DRIVER_OK:
            self.ignored += 1
            return
        self.process(index, ring)


_LOW = {QUEUE_DESC_LOW: "desc", QUEUE_DRIVER_LOW: "driver", QUEUE_DEVICE_LOW: "device"}
_HIGH = {QUEUE_DESC_HIGH: "desc", QUEUE_DRIVER_HIGH: "driver", QUEUE_DEVICE_HIGH: "device"}


class NotifyPort:
    """A queue-notify port: a 16-bit write of a queue index notifies ``device``.

    Reads return all ones, as an empty port; only the write is modelled.
    """

    def __init__(self, device: VirtioMmioDevice):
        if not isinstance(device, VirtioMmioDevice):
            raise ConfigError(f"a notify port needs a virtio device, not {type(device).__name__}")
        self.device = device
        self._notify = device.notify

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self._notify(value & 0xFFFF)

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def reset(self) -> None:
        """Nothing of its own: the device keeps the state."""

    def save(self) -> dict[str, int]:
        return {}

    def restore(self, state: dict[str, int]) -> None:
        """Nothing of its own to restore."""
