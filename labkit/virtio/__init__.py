"""Paravirtual I/O: a virtio console and a virtio block device on split virtqueues (virtio 1.x).

- :mod:`labkit.virtio.ring`: the split virtqueue's layout in guest memory (2.7) and its checks;
- :mod:`labkit.virtio.transport`: status and feature bits (2.1, 6), virtio-mmio registers (4.2.2);
- :mod:`labkit.virtio.console`: the console device (5.3, transmit queue) and its DeviceSpecs;
- :mod:`labkit.virtio.blk`: the block device (5.2) over a disk image, and its DeviceSpecs;
- :mod:`labkit.virtio.blk_driver`: a host-side block driver (tests, benchmarks);
- :mod:`labkit.virtio.measure`: byte-wise UART against the ring, on a real machine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from labkit._lazy import lazy_exports

_EXPORTS = {
    "VirtioConsole": "labkit.virtio.console",
    "NotifyPort": "labkit.virtio.console",
    "console_devices": "labkit.virtio.console",
    "VirtioBlock": "labkit.virtio.blk",
    "Disk": "labkit.virtio.blk",
    "block_devices": "labkit.virtio.blk",
    "BlockDriver": "labkit.virtio.blk_driver",
    "Descriptor": "labkit.virtio.ring",
    "QueueLayout": "labkit.virtio.ring",
    "DeviceQueue": "labkit.virtio.ring",
    "DriverQueue": "labkit.virtio.ring",
    "ConsoleMeasurement": "labkit.virtio.measure",
    "measure_console": "labkit.virtio.measure",
    "expected_console": "labkit.virtio.measure",
    "console_table": "labkit.virtio.measure",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

if TYPE_CHECKING:  # pragma: no cover
    from labkit.virtio.blk import Disk, VirtioBlock, block_devices
    from labkit.virtio.blk_driver import BlockDriver
    from labkit.virtio.console import NotifyPort, VirtioConsole, console_devices
    from labkit.virtio.measure import ConsoleMeasurement, console_table, expected_console, measure_console
    from labkit.virtio.ring import Descriptor, DeviceQueue, DriverQueue, QueueLayout
