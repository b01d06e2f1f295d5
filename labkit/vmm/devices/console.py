"""The guest's console: what the UART transmits and what ``WRITE`` hypercalls pass.

Kept up to ``capacity`` bytes; the rest is counted in ``dropped``, so a guest
printing forever cannot exhaust host memory.
"""

from __future__ import annotations

DEFAULT_CAPACITY = 1 << 20


class Console:
    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self.capacity = capacity
        self.output = bytearray()
        self.dropped = 0

    def put(self, byte: int) -> None:
        if len(self.output) < self.capacity:
            self.output.append(byte)
        else:
            self.dropped += 1

    def extend(self, data: bytes) -> None:
        room = self.capacity - len(self.output)
        self.output += data[:room]
        self.dropped += max(0, len(data) - room)

    def text(self) -> str:
        """Everything received so far, decoded as UTF-8 (bad bytes replaced)."""
        return self.output.decode("utf-8", errors="replace")
