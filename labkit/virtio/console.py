"""A virtio console (virtio 1.x, 5.3; device ID 3) on the virtio-mmio transport (4.2), transmit only.

What is modelled: the virtio-mmio registers (4.2.2; offsets in
``labkit.virtio.transport``) at ``layout.VIRTIO_MMIO_BASE``, the device status
and feature negotiation (2.1, 2.2, 3.1.1: the device offers VIRTIO_F_VERSION_1
and VIRTIO_F_INDIRECT_DESC and refuses FEATURES_OK for anything else), the two
queues of port 0 (5.3.2: 0 receiveq, 1 transmitq; at most 256 entries each), and
the transmit queue's semantics: every chain's device-readable bytes go to the
machine's console, in order, and the chain comes back on the used ring with
``len`` 0 (nothing written into it).  The receive queue never gets a buffer back
(there is no input).  Not modelled: the console's configuration fields and
features (size, multiport, emergency write; the config space reads 0), the
interrupt line (``InterruptStatus`` says what would have been signalled, but no
IRQ is raised: labkit's guests poll the used ring), VIRTIO_F_EVENT_IDX, packed
queues, queue reset.

Notifications: a 16-bit write of the queue index to the port
``layout.VIRTIO_NOTIFY_PORT`` (:class:`NotifyPort`: one PIO write, so
``KVM_IOEVENTFD`` can take it in the kernel and the host calls
:meth:`VirtioConsole.notify` later) or to ``QueueNotify`` (0x050).  The device
consumes every chain the driver has made available, synchronously, then
publishes the used ``idx`` once.

Hostile rings: every value the driver wrote is checked where it is used
(:class:`labkit.virtio.ring.DeviceQueue`).  A queue made ready with a bad size
or areas outside RAM, or a notification whose ring is bad (an index past the
ring, a loop, a length past RAM, a device-writable buffer on the transmit
queue, ...) sets DEVICE_NEEDS_RESET (2.1.2) and the device consumes nothing
more until the driver resets it (writes 0 to ``Status``); :attr:`VirtioConsole.error`
says what was wrong.  Chains before the bad one in the same notification were
consumed and returned; the bad chain's bytes reach no console.  Nothing is
raised into the machine's run, and the device writes only the used ring.
"""

from __future__ import annotations

from typing import Any, Callable

from labkit.errors import ConfigError, GuestMemoryError, VirtqueueError
from labkit.memory import GuestMemory
from labkit.vmm.devices.spec import DeviceContext, DeviceSpec
from labkit.virtio import transport as t
from labkit.virtio.ring import DeviceQueue, QueueLayout
from labkit.x86 import layout

DEVICE_ID_CONSOLE = 3
RECEIVEQ, TRANSMITQ = 0, 1
QUEUE_SIZE_MAX = 256
DEVICE_FEATURES = t.VIRTIO_F_VERSION_1 | t.VIRTIO_F_INDIRECT_DESC
INTERRUPT_USED_BUFFER = 1
INTERRUPT_CONFIG_CHANGE = 2

DEVICE_NAME = "virtio-console"
NOTIFY_NAME = "virtio-notify"


class QueueConfig:
    """What the driver wrote for one queue (the registers QueueSel selects)."""

    __slots__ = ("size", "ready", "desc", "driver", "device")

    def __init__(self) -> None:
        self.size = QUEUE_SIZE_MAX
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


class VirtioConsole:
    """The device: virtio-mmio registers (:meth:`read`/:meth:`write` take offsets) and :meth:`notify`.

    ``memory`` is guest memory (every ring access goes through it), ``console``
    receives the transmitted bytes.  Counters for the lesson: ``notifications``
    (every one received), ``ignored`` (those that found nothing to do: device not
    live, queue not ready or not a transmit queue), ``chains`` and ``bytes``
    consumed.
    """

    def __init__(self, memory: GuestMemory, console: Callable[[bytes], None]):
        self.memory = memory
        self.console = console
        self.reset()

    # -- state ---------------------------------------------------------------

    def reset(self) -> None:
        """Power-on: the device's reset, and the counters at 0."""
        self.notifications = 0
        self.ignored = 0
        self.chains = 0
        self.bytes = 0
        self.resets = 0
        self._device_reset()

    def _device_reset(self) -> None:
        """The driver's reset (status 0; 2.1, 4.2.2: queues not ready, interrupt status clear); counters kept."""
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.queues = [QueueConfig(), QueueConfig()]
        self.transmit: DeviceQueue | None = None
        self.error: str | None = None
        """Why the device needs a reset (None while it does not)."""

    COUNTERS = ("notifications", "ignored", "chains", "bytes", "resets")

    def save(self) -> dict[str, Any]:
        """Registers, queue configuration, the device's ring positions, counters and the error, as plain data."""
        transmit = self.transmit
        return {"status": self.status, "device_features_sel": self.device_features_sel,
                "driver_features_sel": self.driver_features_sel, "driver_features": self.driver_features,
                "queue_sel": self.queue_sel, "interrupt_status": self.interrupt_status,
                "queues": [queue.save() for queue in self.queues],
                "last_avail": transmit.last_avail if transmit else 0, "used_idx": transmit.used_idx if transmit else 0,
                "error": self.error, **{name: getattr(self, name) for name in self.COUNTERS}}

    def restore(self, state: dict[str, Any]) -> None:
        self.reset()
        for name in ("status", "device_features_sel", "driver_features_sel", "driver_features", "queue_sel",
                     "interrupt_status", *self.COUNTERS):
            setattr(self, name, int(state[name]))
        for queue, saved in zip(self.queues, state["queues"]):
            queue.restore(saved)
        self.error = state["error"]
        if self.queues[TRANSMITQ].ready and not self.needs_reset:
            self._open_transmit(int(state["last_avail"]), int(state["used_idx"]))

    @property
    def needs_reset(self) -> bool:
        return bool(self.status & t.STATUS_DEVICE_NEEDS_RESET)

    def _fail(self, reason: str) -> None:
        """DEVICE_NEEDS_RESET (2.1.2): stop consuming until the driver resets the device."""
        if self.error is None:
            self.error = reason
        self.status |= t.STATUS_DEVICE_NEEDS_RESET
        self.transmit = None
        if self.status & t.STATUS_DRIVER_OK:  # the device must signal a configuration change
            self.interrupt_status |= INTERRUPT_CONFIG_CHANGE

    # -- virtio-mmio registers (4.2.2) ---------------------------------------

    def read(self, offset: int, size: int) -> int:
        if offset >= t.CONFIG:
            return 0  # no console configuration fields are offered
        if size != 4 or offset % 4:
            return 0  # the driver must use aligned 32-bit accesses; others read nothing
        queue = self._selected()
        if offset == t.MAGIC:
            return t.MAGIC_VALUE
        if offset == t.VERSION:
            return t.MMIO_VERSION
        if offset == t.DEVICE_ID:
            return DEVICE_ID_CONSOLE
        if offset == t.VENDOR:
            return t.VENDOR_ID
        if offset == t.DEVICE_FEATURES:
            return (DEVICE_FEATURES >> (32 * self.device_features_sel)) & 0xFFFFFFFF \
                if self.device_features_sel < 2 else 0
        if offset == t.QUEUE_SIZE_MAX:
            return QUEUE_SIZE_MAX if queue is not None else 0
        if offset == t.QUEUE_READY:
            return queue.ready if queue is not None else 0
        if offset == t.INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == t.STATUS:
            return self.status
        return 0  # write-only registers and holes read 0 (ConfigGeneration: the config never changes)

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 4 or offset % 4 or offset >= t.CONFIG:
            return  # not an access the driver may make; nothing to configure
        value &= 0xFFFFFFFF
        if offset == t.STATUS:
            self._write_status(value)
        elif offset == t.DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == t.DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == t.DRIVER_FEATURES:
            if self.driver_features_sel < 2 and not self.status & t.STATUS_FEATURES_OK:
                shift = 32 * self.driver_features_sel
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif offset == t.QUEUE_SEL:
            self.queue_sel = value
        elif offset == t.QUEUE_NOTIFY:
            self.notify(value)
        elif offset == t.INTERRUPT_ACK:
            self.interrupt_status &= ~value
        else:
            self._write_queue(offset, value)

    def _selected(self) -> QueueConfig | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _write_queue(self, offset: int, value: int) -> None:
        queue = self._selected()
        if queue is None:
            return
        if offset == t.QUEUE_READY:
            if value & 1 and not queue.ready:
                self._make_ready(queue)
            elif not value & 1:
                queue.ready = 0
                if queue is self.queues[TRANSMITQ]:
                    self.transmit = None
            return
        if queue.ready:
            return  # the driver must not change a ready queue's size or addresses (4.2.2.2)
        if offset == t.QUEUE_SIZE:
            queue.size = value
        elif offset in (t.QUEUE_DESC_LOW, t.QUEUE_DRIVER_LOW, t.QUEUE_DEVICE_LOW):
            name = {t.QUEUE_DESC_LOW: "desc", t.QUEUE_DRIVER_LOW: "driver", t.QUEUE_DEVICE_LOW: "device"}[offset]
            setattr(queue, name, (getattr(queue, name) & ~0xFFFFFFFF) | value)
        elif offset in (t.QUEUE_DESC_HIGH, t.QUEUE_DRIVER_HIGH, t.QUEUE_DEVICE_HIGH):
            name = {t.QUEUE_DESC_HIGH: "desc", t.QUEUE_DRIVER_HIGH: "driver", t.QUEUE_DEVICE_HIGH: "device"}[offset]
            setattr(queue, name, (getattr(queue, name) & 0xFFFFFFFF) | (value << 32))

    def _make_ready(self, queue: QueueConfig) -> None:
        if queue.size > QUEUE_SIZE_MAX:
            self._fail(f"queue {self.queue_sel}: size {queue.size} is above QueueSizeMax {QUEUE_SIZE_MAX}")
            return
        try:
            queue.layout().check(self.memory)
        except VirtqueueError as error:
            self._fail(f"queue {self.queue_sel}: {error}")
            return
        queue.ready = 1
        if queue is self.queues[TRANSMITQ] and not self.needs_reset:
            self._open_transmit(0, 0)

    def _open_transmit(self, last_avail: int, used_idx: int) -> None:
        try:
            self.transmit = DeviceQueue(self.memory, self.queues[TRANSMITQ].layout(), writable=False,
                                        indirect=bool(self.driver_features & t.VIRTIO_F_INDIRECT_DESC),
                                        last_avail=last_avail, used_idx=used_idx)
        except VirtqueueError as error:
            self._fail(f"queue {TRANSMITQ}: {error}")

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.resets += 1
            self._device_reset()
            return
        value &= 0xFF & ~t.STATUS_DEVICE_NEEDS_RESET  # only the device sets DEVICE_NEEDS_RESET
        if value & t.STATUS_FEATURES_OK and not self.status & t.STATUS_FEATURES_OK:
            accepted = (self.driver_features & ~DEVICE_FEATURES) == 0 \
                and bool(self.driver_features & t.VIRTIO_F_VERSION_1)
            if not accepted:  # the device leaves FEATURES_OK clear: the driver sees it did not take
                value &= ~t.STATUS_FEATURES_OK
        self.status = value | (self.status & t.STATUS_DEVICE_NEEDS_RESET)

    # -- the queue notification ---------------------------------------------

    def notify(self, value: int) -> None:
        """An available-buffer notification for queue ``value & 0xffff`` (no VIRTIO_F_NOTIFICATION_DATA).

        On the transmit queue of a live device: consume every available chain
        (its bytes to the console), return each on the used ring, publish the
        used ``idx``.  Never raises for what the guest put in memory.
        """
        self.notifications += 1
        queue = self.transmit
        if value & 0xFFFF != TRANSMITQ or queue is None or self.needs_reset \
                or not self.status & t.STATUS_DRIVER_OK:
            self.ignored += 1
            return
        consumed = 0
        try:
            waiting = queue.pending()
            while waiting:
                chain = queue.pop()
                data = queue.read(chain)
                self.console(data)
                queue.put_used(chain.head, 0)  # a transmit buffer: the device wrote nothing into it
                consumed += 1
                self.bytes += len(data)
                waiting -= 1
        except (VirtqueueError, GuestMemoryError) as error:
            self._fail(f"queue {TRANSMITQ}: {error}")
        if consumed:
            queue.publish_used()
            self.chains += consumed
            self.interrupt_status |= INTERRUPT_USED_BUFFER


class NotifyPort:
    """The queue-notify port (``layout.VIRTIO_NOTIFY_PORT``): a write of a queue index notifies ``device``.

    Reads return 0xffff, as an empty port; only the write is modelled.
    """

    def __init__(self, device: VirtioConsole):
        if not isinstance(device, VirtioConsole):
            raise ConfigError(f"the notify port needs a VirtioConsole, not {type(device).__name__}")
        self.device = device

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.device.notify(value & 0xFFFF)

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def reset(self) -> None:
        """Nothing of its own: the device keeps the state."""

    def save(self) -> dict[str, int]:
        return {}

    def restore(self, state: dict[str, int]) -> None:
        """Nothing of its own to restore."""


def console_devices(name: str = DEVICE_NAME, *, base: int = layout.VIRTIO_MMIO_BASE,
                    notify_port: int = layout.VIRTIO_NOTIFY_PORT) -> tuple[DeviceSpec, DeviceSpec]:
    """The virtio console for ``Machine(devices=...)``: its register block (MMIO) and its notify port (PIO).

    Both specs name the same device: the second's factory looks the first up by
    ``name`` (so list them in this order).  ``Machine.device_state(name)`` is the
    device's :meth:`VirtioConsole.save`.
    """

    def build(context: DeviceContext) -> VirtioConsole:
        return VirtioConsole(context.memory, context.console)

    def build_port(context: DeviceContext) -> NotifyPort:
        return NotifyPort(context.device(name))

    return (DeviceSpec(name, "mmio", base, t.MMIO_SIZE, build),
            DeviceSpec(f"{name}-notify" if name != DEVICE_NAME else NOTIFY_NAME, "pio", notify_port, 2, build_port))
