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

    def extend(self, data: bytes | memoryview) -> None:
        room = self.capacity - len(self.output)
        if len(data) <= room:  # the common case, without a slice (a virtio notification's buffer comes here)
            self.output += data
        else:
            self.output += data[:max(0, room)]
            self.dropped += len(data) - max(0, room)

    def reset(self) -> None:
        """Empty, as at power-on."""
        self.output = bytearray()
        self.dropped = 0

    def save(self) -> dict:
        """What was received (``output``) and how many bytes were dropped past the capacity."""
        return {"output": bytes(self.output), "dropped": self.dropped}

    def restore(self, state: dict) -> None:
        self.output = bytearray(state["output"][:self.capacity])
        self.dropped = int(state["dropped"]) + max(0, len(state["output"]) - self.capacity)

    def text(self) -> str:
        """Everything received so far, decoded as UTF-8 (bad bytes replaced)."""
        return self.output.decode("utf-8", errors="replace")
