"""Debug-exit port: a guest ends its run with a status code by writing it here.

Like QEMU's isa-debug-exit, but the code is the value written (1, 2 or 4
bytes), not ``(value << 1) | 1``.  Reads return 0.
"""

from __future__ import annotations

from labkit.errors import ConfigError

from typing import Callable


class DebugExit:
    def __init__(self, on_exit: Callable[[int], None]):
        self._on_exit = on_exit

    def write(self, offset: int, size: int, value: int) -> None:
        self._on_exit(value)

    def read(self, offset: int, size: int) -> int:
        return 0

    def reset(self) -> None:
        """Nothing to reset: the port has no state of its own."""

    def save(self) -> dict:
        return {}

    def restore(self, state: dict) -> None:
        if state:
            raise ConfigError(f"the debug-exit port has no state to restore, got {state!r}")
