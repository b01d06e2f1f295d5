"""``Readable``: guest-physical memory as the x86 helpers read it (the page walk, instruction fetch).

The x86 layer sits below :mod:`labkit.memory`, so it names only the two
methods it calls; :class:`labkit.memory.GuestMemory` has them, and does the
bounds checks: a range outside guest memory raises
:class:`labkit.errors.GuestMemoryError`, never a short or wrapped read.
"""

from __future__ import annotations

from typing import Protocol


class Readable(Protocol):
    """Bounds-checked reads of guest-physical memory (:class:`labkit.memory.GuestMemory` is one)."""

    def read(self, address: int, size: int) -> bytes:
        """``size`` bytes at ``address``; ``GuestMemoryError`` unless all of them are guest memory."""
        ...

    def read_at_most(self, address: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``address``, fewer where guest memory ends, ``b""`` outside it."""
        ...
