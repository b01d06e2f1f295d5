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

import builtins
from typing import Any, Callable

from labkit.memory import GuestMemory
from labkit.vmm.devices.spec import DeviceContext, DeviceSpec
from labkit.virtio import native, transport as t
from labkit.virtio.ring import DeviceQueue
from labkit.virtio.transport import (INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_BUFFER, QUEUE_ENTRIES_MAX, NotifyPort,
                                     QueueConfig, VirtioMmioDevice)
from labkit.x86 import layout

DEVICE_ID_CONSOLE = 3
RECEIVEQ, TRANSMITQ = 0, 1
DEVICE_FEATURES = t.VIRTIO_F_VERSION_1 | t.VIRTIO_F_INDIRECT_DESC
QUEUE_SIZE_MAX = QUEUE_ENTRIES_MAX

DEVICE_NAME = "virtio-console"
NOTIFY_NAME = "virtio-notify"

__all__ = ["DEVICE_FEATURES", "DEVICE_ID_CONSOLE", "INTERRUPT_CONFIG_CHANGE", "INTERRUPT_USED_BUFFER", "NotifyPort",
           "QUEUE_SIZE_MAX", "QueueConfig", "RECEIVEQ", "TRANSMITQ", "VirtioConsole", "console_devices"]


class VirtioConsole(VirtioMmioDevice):
    """The device: virtio-mmio registers (:meth:`read`/:meth:`write` take offsets) and :meth:`notify`.

    ``memory`` is guest memory (every ring access goes through it), ``console``
    receives the transmitted bytes (a view into guest memory for a one-buffer
    chain: copy it, as ``Console.extend`` does).  When ``console`` is the machine's
    :class:`labkit.vmm.devices.console.Console` itself, one-buffer chains are copied
    into it in C (:meth:`DeviceQueue.drain`).  Counters for the lesson: ``notifications``
    (every one received), ``ignored`` (those the device did not act on: not
    DRIVER_OK, needing a reset, queue not ready, or not the transmit queue),
    ``chains`` and ``bytes`` consumed, ``resets`` by the driver.
    """

    DEVICE_ID = DEVICE_ID_CONSOLE
    FEATURES = DEVICE_FEATURES
    QUEUE_WRITABLE = (True, False)  # receiveq (never given a buffer back), transmitq (device reads only)
    COUNTERS: tuple[str, ...] = ("notifications", "ignored", "chains", "bytes", "resets")
    KIND = "virtio console"
    chains: int
    bytes: int

    def __init__(self, memory: GuestMemory, console: Callable[[builtins.bytes | memoryview], None]):
        self.console = console
        super().__init__(memory)

    @property
    def transmit(self) -> DeviceQueue | None:
        """The transmit queue's ring, while it is live."""
        return self.rings[TRANSMITQ]

    def save_rings(self) -> dict[str, Any]:
        transmit = self.transmit
        return {"last_avail": transmit.last_avail if transmit else 0,
                "used_idx": transmit.used_idx if transmit else 0}

    def restore_rings(self, state: dict[str, Any]) -> None:
        if self.queues[TRANSMITQ].ready:
            self.open_ring(TRANSMITQ, int(state["last_avail"]), int(state["used_idx"]))

    def open_ring(self, index: int, last_avail: int, used_idx: int) -> None:
        if index == TRANSMITQ:  # the receive queue is checked when made ready, but nothing is ever put on it
            super().open_ring(index, last_avail, used_idx)

    def process(self, index: int, queue: DeviceQueue) -> None:
        """On the transmit queue: consume every available chain (its bytes to the console), return each
        on the used ring, publish the used ``idx``."""
        if index != TRANSMITQ:
            self.ignored += 1
            return
        # Each chain validated whole (a bad chain's bytes never reach the console), returned with len 0
        # (a transmit buffer: the device wrote nothing into it), the used idx published once.
        consumed, moved, error = queue.drain(self.console)
        if consumed:
            self.chains += consumed
            self.bytes += moved
            self.interrupt_status |= INTERRUPT_USED_BUFFER
        if error is not None:
            self.fail(f"queue {TRANSMITQ}: {error}")


def console_devices(name: str = DEVICE_NAME, *, base: int = layout.VIRTIO_MMIO_BASE,
                    notify_port: int = layout.VIRTIO_NOTIFY_PORT) -> tuple[DeviceSpec, DeviceSpec]:
    """The virtio console for ``Machine(devices=...)``: its register block (MMIO) and its notify port (PIO).

    Both specs name the same device: the second's factory looks the first up by
    ``name`` (so list them in this order).  ``Machine.device_state(name)`` is the
    device's :meth:`VirtioConsole.save`.  The transmit queue's C drain (``labkit.virtio.native``) is
    built or loaded here, in the caller, so an emulator's worker forked after inherits it.
    """
    native.load()

    def build(context: DeviceContext) -> VirtioConsole:
        return VirtioConsole(context.memory, context.console)

    def build_port(context: DeviceContext) -> NotifyPort:
        return NotifyPort(context.device(name))

    return (DeviceSpec(name, "mmio", base, t.MMIO_SIZE, build),
            DeviceSpec(f"{name}-notify" if name != DEVICE_NAME else NOTIFY_NAME, "pio", notify_port, 2, build_port))
