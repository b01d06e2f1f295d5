"""The guest's console: what the UART transmits, what ``WRITE`` hypercalls pass and a virtio console receives.

Kept up to ``capacity`` bytes; the rest is counted in ``dropped``, so a guest
printing forever cannot exhaust host memory.  The bytes live in an anonymous
mapping of ``capacity`` bytes made at once (address space only: the kernel
allocates a page when it is first written), so the storage never moves and
never grows by copying, and the virtio console's C drain (``labkit.virtio.native``)
can copy into it and allocate the pages ahead in bulk.  A console is also a
sink: calling it appends, as :meth:`Console.extend` does.
"""

from __future__ import annotations

import mmap

DEFAULT_CAPACITY = 1 << 20


class Console:
    __slots__ = ("capacity", "storage", "length", "dropped")

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self.capacity = capacity
        self.storage = mmap.mmap(-1, max(capacity, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        """The bytes, ``length`` of them from the start (the rest was never written, or written before a reset)."""
        self.length = 0
        self.dropped = 0

    def put(self, byte: int) -> None:
        length = self.length
        if length < self.capacity:
            self.storage[length] = byte
            self.length = length + 1
        else:
            self.dropped += 1

    def extend(self, data: bytes | memoryview) -> None:
        length, size = self.length, len(data)
        room = self.capacity - length
        if size <= room:  # the common case, without a slice (a virtio notification's buffer comes here)
            self.storage[length:length + size] = data
            self.length = length + size
        else:
            kept = max(0, room)
            self.storage[length:length + kept] = data[:kept]
            self.length = length + kept
            self.dropped += size - kept

    __call__ = extend

    @property
    def output(self) -> bytes:
        """Everything received so far (a copy)."""
        return self.storage[:self.length]

    def since(self, start: int) -> bytes:
        """What was received after the first ``start`` bytes (a copy)."""
        return self.storage[start:self.length]

    def reset(self) -> None:
        """Empty, as at power-on (the pages stay allocated for what comes next)."""
        self.length = 0
        self.dropped = 0

    def save(self) -> dict:
        """What was received (``output``) and how many bytes were dropped past the capacity."""
        return {"output": self.output, "dropped": self.dropped}

    def restore(self, state: dict) -> None:
        output = bytes(state["output"])
        kept = output[:self.capacity]
        self.storage[:len(kept)] = kept
        self.length = len(kept)
        self.dropped = int(state["dropped"]) + len(output) - len(kept)

    def text(self) -> str:
        """Everything received so far, decoded as UTF-8 (bad bytes replaced)."""
        return self.storage[:self.length].decode("utf-8", errors="replace")
