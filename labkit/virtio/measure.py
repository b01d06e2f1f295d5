"""Byte-wise UART against the virtqueue: the same text, the exits and host time each path costs.

:func:`measure_console` runs one of two shipped guests on a real machine:

- ``path="uart"``: ``uart_console64`` writes the text byte by byte to the 16550A,
  polling LSR before each byte as a 16550 console driver does: two port-I/O
  exits per byte;
- ``path="ring"``: ``ring_console64``, a virtio 1.x driver, puts the text in
  ``buffer_bytes``-byte buffers on the virtio console's transmit queue and
  notifies once per ``batch`` buffers (``labkit.virtio.console``): a few dozen
  exits to set the device up (virtio-mmio register accesses), then one per batch.

The guests take their parameters from a block the host writes into guest RAM
before the run (:data:`PARAMS_ADDRESS`, with ``Machine.write_memory``), so
nothing is reassembled.  Both print :func:`expected_console`, and a
measurement says whether they did (``console_ok``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from labkit.errors import ConfigError
from labkit.vmm.machine import Machine, check_timeout
from labkit.vmm.status import StatusKind
from labkit.virtio.console import DEVICE_NAME, QUEUE_SIZE_MAX, console_devices
from labkit.x86 import layout

PARAMS_ADDRESS = 0x80000
"""Where the guests read their parameter block (just above the initial stack)."""
PARAMS_MAGIC = 0x42505156
"""``"VQPB"`` little-endian: the block is there."""
BUFFERS_ADDRESS = 0x100000
"""Where ``ring_console64`` puts its buffers (a batch's buffers one after another)."""
LINE_TEMPLATE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
LINE_BYTES = 64
MAX_KIB = 1024
"""The console keeps 1 MiB (``labkit.vmm.devices.console``)."""
MAX_BUFFER_BYTES = 1 << 16
MAX_BATCH_BYTES = 16 << 20
PATHS = ("uart", "ring")
GUESTS = {"uart": "uart_console64", "ring": "ring_console64"}
DEFAULT_BATCH = 16
DEFAULT_BUFFER_BYTES = 256


def expected_console(total_bytes: int) -> str:
    """The first ``total_bytes`` of the guests' text: 64-byte lines ``"line 00000 a..zA..Z\\n"``, numbered from 0."""
    lines = -(-total_bytes // LINE_BYTES)
    text = "".join(f"line {number % 100000:05d} {LINE_TEMPLATE}\n" for number in range(lines))
    return text[:total_bytes]


def parameter_block(total_bytes: int, buffer_bytes: int, batch: int, repeat: int = 1) -> bytes:
    """The bytes the guests read at :data:`PARAMS_ADDRESS` (five little-endian u32)."""
    return struct.pack("<5I", PARAMS_MAGIC, total_bytes, buffer_bytes, batch, repeat)


@dataclass(frozen=True)
class ConsoleMeasurement:
    """One run of :func:`measure_console`.

    ``exits`` counts every VM exit that reached labkit (userspace) in the run,
    set-up included; ``notifications`` the virtqueue notifications the device
    received (0 on the UART path); ``host_seconds`` the run's time on the host
    (guest execution included; on the emulator, emulator time); ``console_ok``
    whether the console showed exactly :func:`expected_console` and the guest
    exited with 0.
    """

    path: str
    kib: int
    bytes: int
    exits: int
    notifications: int
    host_seconds: float
    backend: str
    console_ok: bool
    batch: int
    buffer_bytes: int
    exits_by_reason: dict[str, int]
    status: str
    device: dict[str, Any] | None = None
    """The virtio device's saved state after the run (ring path)."""

    @property
    def exits_per_kib(self) -> float:
        return self.exits / self.kib

    @property
    def seconds_per_kib(self) -> float:
        return self.host_seconds / self.kib


def _whole(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be a whole number from {low} to {high}, not {value!r}")
    return value


def ring_memory(buffer_bytes: int, batch: int) -> int:
    """RAM for ``ring_console64``: the buffers of one batch above :data:`BUFFERS_ADDRESS`, whole 2 MiB."""
    needed = BUFFERS_ADDRESS + buffer_bytes * batch
    return max(layout.DEFAULT_MEMORY, -(-needed // (2 << 20)) * (2 << 20))


def measure_console(kib: int, path: str, batch: int = DEFAULT_BATCH, backend: str = "auto", *,
                    buffer_bytes: int = DEFAULT_BUFFER_BYTES, repeat: int = 1,
                    timeout: float = 60.0) -> ConsoleMeasurement:
    """Write ``kib`` KiB to the console through ``path`` (``"uart"`` or ``"ring"``) and count what it cost.

    ``batch`` buffers of ``buffer_bytes`` each go with one notification (ring
    path; 1 to 256); ``repeat`` posts every batch that many times (for the
    benchmark of one notification: the console then holds each batch
    ``repeat`` times and ``console_ok`` checks that).  ``backend`` as for
    :class:`labkit.Machine`.
    """
    kib = _whole("kib", kib, 1, MAX_KIB)
    if path not in PATHS:
        raise ConfigError(f"path must be 'uart' or 'ring', not {path!r}")
    batch = _whole("batch", batch, 1, QUEUE_SIZE_MAX)
    buffer_bytes = _whole("buffer_bytes", buffer_bytes, 1, MAX_BUFFER_BYTES)
    repeat = _whole("repeat", repeat, 1, 1 << 20)
    timeout = check_timeout(timeout)
    if buffer_bytes * batch > MAX_BATCH_BYTES:
        raise ConfigError(f"a batch of {batch} buffers of {buffer_bytes} bytes is more than "
                          f"{MAX_BATCH_BYTES >> 20} MiB")
    total = kib * 1024
    if repeat > 1 and (path == "uart" or total > 1024 * MAX_KIB // repeat):
        raise ConfigError("repeat is for the ring path, and the console keeps at most 1 MiB")
    ring = path == "ring"
    memory = ring_memory(buffer_bytes, batch) if ring else layout.DEFAULT_MEMORY
    with Machine(GUESTS[path], backend=backend, memory=memory,
                 devices=console_devices() if ring else ()) as machine:
        machine.write_memory(PARAMS_ADDRESS, parameter_block(total, buffer_bytes, batch, repeat))
        result = machine.run(timeout=timeout)
        device = machine.device_state(DEVICE_NAME) if ring else None
    expected = _expected(total, buffer_bytes * batch, repeat)
    ok = (result.status.kind is StatusKind.EXITED and result.status.code == 0 and result.console == expected)
    return ConsoleMeasurement(
        path=path, kib=kib, bytes=len(result.console.encode()), exits=result.trace.exit_count(),
        notifications=device["notifications"] if device else 0, host_seconds=result.elapsed_s,
        backend=result.backend, console_ok=ok, batch=batch if ring else 1,
        buffer_bytes=buffer_bytes if ring else 1, exits_by_reason=result.trace.by_kind()[0],
        status=str(result.status), device=device)


def _expected(total: int, batch_bytes: int, repeat: int) -> str:
    if repeat == 1:
        return expected_console(total)
    text = expected_console(total)
    return "".join(text[start:start + batch_bytes] * repeat for start in range(0, total, batch_bytes))
