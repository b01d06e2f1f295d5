"""Port and MMIO buses: devices on non-overlapping address ranges.

A device sees offsets from its base, never absolute addresses, and must treat
every value the guest supplies as hostile.  An access nothing claims is counted
and ignored (writes) or reads as all ones, as on a PC.
"""

from __future__ import annotations

import bisect
from typing import Protocol

from labkit.errors import ConfigError

SIZES = (1, 2, 4, 8)


class Device(Protocol):
    """A device model on a bus; ``offset`` is relative to the range it was registered at."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


def all_ones(size: int) -> int:
    """What a read of nothing returns: 0xFF, 0xFFFF, ... for ``size`` bytes."""
    return (1 << (8 * size)) - 1


_ALL_ONES = {size: all_ones(size) for size in SIZES}
MAX_UNCLAIMED = 4096
"""Distinct unclaimed addresses a bus keeps counts for (the port bus has 65,536 at most anyway)."""


class Bus:
    """One address space (``"pio"`` or ``"mmio"``) of devices at ``[base, base + length)``."""

    def __init__(self, name: str, limit: int):
        self.name = name
        self.limit = limit
        self._bases: list[int] = []
        self._ranges: list[tuple[int, int, Device]] = []
        self.unclaimed: dict[int, int] = {}
        """Accesses nothing claimed, by address: the first :data:`MAX_UNCLAIMED` distinct addresses."""
        self.unclaimed_elsewhere = 0
        """Accesses to unclaimed addresses past the first :data:`MAX_UNCLAIMED` (counted, not kept by address:
        a guest writing to random addresses must not grow the host's memory)."""

    def _unclaimed(self, address: int) -> None:
        counts = self.unclaimed
        if address in counts or len(counts) < MAX_UNCLAIMED:
            counts[address] = counts.get(address, 0) + 1
        else:
            self.unclaimed_elsewhere += 1

    def register(self, base: int, length: int, device: Device) -> None:
        """Place ``device`` at ``[base, base + length)``; overlapping an existing device is an error."""
        if length <= 0 or base < 0 or base + length > self.limit:
            raise ConfigError(f"{self.name} range {base:#x}+{length:#x} is outside [0, {self.limit:#x})")
        index = bisect.bisect_right(self._bases, base)
        if index > 0:
            prev_base, prev_end, prev = self._ranges[index - 1]
            if prev_end > base:
                raise ConfigError(
                    f"{type(device).__name__} at {self.name} {base:#x} overlaps "
                    f"{type(prev).__name__} at {prev_base:#x}-{prev_end - 1:#x}"
                )
        if index < len(self._ranges) and base + length > self._ranges[index][0]:
            nxt_base, nxt_end, nxt = self._ranges[index]
            raise ConfigError(
                f"{type(device).__name__} at {self.name} {base:#x} overlaps "
                f"{type(nxt).__name__} at {nxt_base:#x}-{nxt_end - 1:#x}"
            )
        self._bases.insert(index, base)
        self._ranges.insert(index, (base, base + length, device))

    def find(self, address: int) -> tuple[int, Device] | None:
        """The ``(base, device)`` claiming ``address``, or ``None``."""
        index = bisect.bisect_right(self._bases, address) - 1
        if index >= 0:
            base, end, device = self._ranges[index]
            if address < end:
                return base, device
        return None

    def devices(self) -> list[tuple[int, int, Device]]:
        """``(base, end, device)`` for every device, in address order."""
        return list(self._ranges)

    def read(self, address: int, size: int) -> int:
        hit = self.find(address)
        if hit is None:
            self._unclaimed(address)
            return all_ones(size)
        base, device = hit
        return device.read(address - base, size) & all_ones(size)

    def write(self, address: int, size: int, value: int) -> None:
        hit = self.find(address)
        if hit is None:
            self._unclaimed(address)
            return
        base, device = hit
        device.write(address - base, size, value & all_ones(size))


class PortBus(Bus):
    """The 64 KiB x86 I/O port space, with a per-port table for the hot path."""

    def __init__(self) -> None:
        super().__init__("port", 0x10000)
        self._by_port: dict[int, tuple[int, Device]] = {}

    def register(self, base: int, length: int, device: Device) -> None:
        super().register(base, length, device)
        for port in range(base, base + length):
            self._by_port[port] = (base, device)

    def find(self, address: int) -> tuple[int, Device] | None:
        return self._by_port.get(address)

    # The same as Bus.read/write, with the table lookup inlined: these run once per port exit.
    def read(self, address: int, size: int) -> int:
        hit = self._by_port.get(address)
        if hit is None:
            self.unclaimed[address] = self.unclaimed.get(address, 0) + 1
            return _ALL_ONES[size]
        return hit[1].read(address - hit[0], size) & _ALL_ONES[size]

    def write(self, address: int, size: int, value: int) -> None:
        hit = self._by_port.get(address)
        if hit is None:
            self.unclaimed[address] = self.unclaimed.get(address, 0) + 1
            return
        hit[1].write(address - hit[0], size, value & _ALL_ONES[size])


class Buses:
    """A machine's two buses: the I/O port space and the MMIO space above RAM."""

    __slots__ = ("pio", "mmio")

    def __init__(self, pio: PortBus, mmio: Bus):
        self.pio = pio
        self.mmio = mmio
