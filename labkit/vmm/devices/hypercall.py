"""Hypercall port: the paravirtual interface between a guest and labkit.

A guest writes a hypercall number from EAX to the port (``out HYPERCALL_PORT,
eax``), with arguments in RBX, RCX, RDX and RSI, and reads the result back with
``in eax, HYPERCALL_PORT``.  Numbers nobody registered return ``ENOSYS`` as a
negative value, like Linux system calls.  Every argument comes from the guest
and is checked where it is used: a buffer must lie inside guest RAM.  The
port is for ring-0 guests: from ring 3 the ``out`` raises #GP (IOPL 0), so a
kernel that runs deprivileged makes its hypercalls with ``int 4`` to the
paravirtual monitor instead (:mod:`labkit.monitor.paravirt`, its own ABI).

Built-in hypercalls:

==  ==========  ==========================================================
0   ``NOP``     returns 0: the bare cost of a hypercall round trip
1   ``WRITE``   RBX = guest-physical address, RCX = length: appends that
                buffer to the console in one exit (batched, virtio-style)
==  ==========  ==========================================================
"""

from __future__ import annotations

import errno
from collections import Counter
from typing import Callable

from labkit.errors import ConfigError
from labkit.memory import GuestMemory
from labkit.x86.state import Regs

HC_NOP = 0
HC_WRITE = 1
MAX_WRITE = 1 << 16
"""Largest buffer one ``WRITE`` hypercall may pass."""

Handler = Callable[[int, int, int, int], int]


def to_u32(value: int) -> int:
    """A (possibly negative) result as the 32-bit value the guest reads in EAX."""
    return value & 0xFFFFFFFF


class HypercallPort:
    """Dispatches hypercalls to registered handlers.

    ``regs`` returns the vCPU's general-purpose registers (a ``Regs``), ``memory``
    is guest memory (a :class:`GuestMemory`, or a memoryview of RAM at 0),
    ``console`` receives what ``WRITE`` passes.  Its state (:meth:`save`) is the
    last result and the call counts; the registered handlers are configuration.
    """

    def __init__(self, regs: Callable[[], Regs], memory: GuestMemory | memoryview,
                 console: Callable[[bytes], None]):
        self._regs = regs
        self._memory = memory if isinstance(memory, GuestMemory) else GuestMemory([(0, memory, False)])
        self._console = console
        self._handlers: dict[int, tuple[str, Handler]] = {}
        self.result = 0
        self.calls: Counter[str] = Counter()
        self.register(HC_NOP, "NOP", lambda a, b, c, d: 0)
        self.register(HC_WRITE, "WRITE", self._write)

    def register(self, number: int, name: str, handler: Handler) -> None:
        """Make hypercall ``number`` call ``handler(rbx, rcx, rdx, rsi)``; its return value goes to the guest."""
        if not 0 <= number <= 0xFFFFFFFF:
            raise ConfigError(f"hypercall number {number} is not a 32-bit value")
        if number in self._handlers:
            raise ConfigError(f"hypercall {number} is already {self._handlers[number][0]}")
        self._handlers[number] = (name, handler)

    def write(self, offset: int, size: int, value: int) -> None:
        entry = self._handlers.get(value & 0xFFFFFFFF)
        if entry is None:
            self.calls["unknown"] += 1
            self.result = to_u32(-errno.ENOSYS)
            return
        name, handler = entry
        self.calls[name] += 1
        regs = self._regs()
        self.result = handler(regs.rbx, regs.rcx, regs.rdx, regs.rsi)

    def read(self, offset: int, size: int) -> int:
        return self.result & ((1 << (8 * size)) - 1)

    def _write(self, address: int, length: int, _rdx: int, _rsi: int) -> int:
        if length > MAX_WRITE or not self._memory.contains(address, length):
            return to_u32(-errno.EFAULT)
        self._console(self._memory.read(address, length))
        return length

    def reset(self) -> None:
        """No result pending and no calls counted."""
        self.result = 0
        self.calls = Counter()

    def save(self) -> dict:
        return {"result": self.result, "calls": dict(self.calls)}

    def restore(self, state: dict) -> None:
        self.result = int(state["result"]) & 0xFFFFFFFF
        self.calls = Counter({str(name): int(count) for name, count in state["calls"].items()})
