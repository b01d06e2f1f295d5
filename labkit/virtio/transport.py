"""The numbers a virtio driver and device share: status bits, feature bits, and the virtio-mmio registers.

Device status (virtio 1.x, 2.1), set by the driver in this order during
initialisation (3.1.1), except DEVICE_NEEDS_RESET, which only the device sets:
ACKNOWLEDGE 1, DRIVER 2, FEATURES_OK 8, DRIVER_OK 4; FAILED 128; DEVICE_NEEDS_RESET 64.

Feature bits (6): VIRTIO_F_INDIRECT_DESC 28, VIRTIO_F_VERSION_1 32 (a non-legacy
device offers it and the driver must accept it).

virtio-mmio registers (4.2.2, "MMIO Device Register Layout"): 32-bit little-endian
registers at these offsets from the device's base, R = read-only, W = write-only.
labkit places one device at ``layout.VIRTIO_MMIO_BASE``; its queue notification
goes to the port ``layout.VIRTIO_NOTIFY_PORT`` instead of ``QueueNotify``
(both work; see ``labkit.virtio.console``).
"""

from __future__ import annotations

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
