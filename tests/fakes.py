"""A scripted backend implementing :class:`labkit.backend.Backend`: for testing the core with neither KVM nor Unicorn.

Each script entry is one of

- an exit from :mod:`labkit.exits`: ``Io`` and ``Mmio`` go to the dispatcher as
  a real backend sends them (a read's value is kept in :attr:`FakeBackend.reads`),
  and the guest goes on unless the dispatcher sets ``stop``; any other exit ends
  ``run`` and is returned (``Hlt`` first moves RIP past the ``hlt``, as both
  real backends do);
- :class:`Do`: a callable run at that point, as if by another thread while the
  guest runs (``Do(core.request_pause)``);
- :class:`Store`: a guest write to memory (logged when the dirty log is on).

Before each entry, as a real backend before entering the guest, it injects a
pending interrupt when the guest's RFLAGS.IF is set (recorded in
:attr:`FakeBackend.injected`) and returns ``Interrupted`` after a :meth:`kick`.
When the script is used up, ``run`` returns ``Timeout``, as a guest that never stops would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from labkit import exits
from labkit.errors import ConfigError
from labkit.x86 import layout
from labkit.x86.boot import RFLAGS_IF
from labkit.x86.state import DebugRegs, FpuState, Regs, SRegs

HLT_LENGTH = 1


@dataclass(frozen=True)
class Do:
    """Run ``action()`` when the script reaches this entry."""

    action: Callable[[], object]


@dataclass(frozen=True)
class Store:
    """The guest writes ``data`` at guest-physical ``address``."""

    address: int
    data: bytes


class FakeBackend:
    kind = "fake"

    def __init__(self, memory_size: int = layout.MIN_MEMORY, mode: int = 64, script: Iterable = ()):
        self.mode = mode
        self.memory = memoryview(bytearray(memory_size))
        self._regions: list[tuple[int, memoryview, bool]] = [(0, self.memory, False)]
        self.script = list(script)
        self.reads: list[int] = []
        self.injected: list[int] = []
        self.runs = 0
        self._regs = Regs()
        self._sregs = SRegs()
        self._msrs: dict[int, int] = {}
        self._fpu = FpuState()
        self._debug = DebugRegs()
        self._kicked = False
        self._dirty: set[int] | None = None
        self.closed = False

    def describe(self) -> dict[str, str]:
        return {"backend": "fake", "flavour": "scripted exits"}

    def get_regs(self) -> Regs:
        return Regs(**self._regs.as_dict())

    def set_regs(self, regs: Regs) -> None:
        self._regs = Regs(**regs.as_dict())

    def get_sregs(self) -> SRegs:
        return self._sregs

    def set_sregs(self, sregs: SRegs) -> None:
        self._sregs = sregs

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        return {index: self._msrs.get(index, 0) for index in indices}

    def set_msrs(self, msrs: Mapping[int, int]) -> None:
        self._msrs.update(msrs)

    def get_fpu(self) -> FpuState:
        return self._fpu

    def set_fpu(self, fpu: FpuState) -> None:
        self._fpu = fpu

    def get_debug_regs(self) -> DebugRegs:
        return self._debug

    def set_debug_regs(self, debug: DebugRegs) -> None:
        self._debug = debug

    def pending_interrupt(self) -> int | None:
        return None

    def kick(self) -> None:
        self._kicked = True

    def add_memory_region(self, guest_address: int, size: int, *, read_only: bool = False) -> memoryview:
        if guest_address % layout.PAGE_SIZE or size % layout.PAGE_SIZE or size <= 0:
            raise ConfigError("a region is whole pages")
        if any(base < guest_address + size and guest_address < base + len(view) for base, view, _ in self._regions):
            raise ConfigError("regions overlap")
        view = memoryview(bytearray(size))
        self._regions.append((guest_address, view, read_only))
        return view

    def regions(self) -> list[tuple[int, memoryview, bool]]:
        return list(self._regions)

    def dirty_log_start(self) -> None:
        self._dirty = set()

    def dirty_log_fetch(self) -> list[int]:
        pages, self._dirty = sorted(self._dirty or ()), set()
        return pages

    def dirty_log_stop(self) -> None:
        self._dirty = None

    def _inject(self, dispatcher) -> None:
        if dispatcher.interrupt_pending and self._regs.rflags & RFLAGS_IF:
            vector = dispatcher.pending_vector()
            if vector is not None:
                self.injected.append(vector)
                dispatcher.acknowledge_interrupt(vector)

    def run(self, dispatcher, timeout: float) -> exits.Exit:
        self.runs += 1
        while True:
            if self._kicked:
                self._kicked = False
                return exits.Interrupted()
            self._inject(dispatcher)
            if not self.script:
                return exits.Timeout(budget_s=timeout)
            entry = self.script.pop(0)
            if isinstance(entry, Do):
                entry.action()
                continue
            if isinstance(entry, Store):
                self.memory[entry.address:entry.address + len(entry.data)] = entry.data
                if self._dirty is not None:
                    self._dirty.update(range(entry.address // layout.PAGE_SIZE,
                                             (entry.address + len(entry.data) - 1) // layout.PAGE_SIZE + 1))
                continue
            rip = self._regs.rip
            if isinstance(entry, exits.Io):
                value = dispatcher.pio(entry.port, entry.size, entry.is_write, entry.data, rip)
            elif isinstance(entry, exits.Mmio):
                value = dispatcher.mmio(entry.address, entry.size, entry.is_write, entry.data, rip)
            else:
                if isinstance(entry, exits.Hlt):
                    self._regs.rip += HLT_LENGTH
                return entry
            if not entry.is_write:
                self.reads.append(value)
            if dispatcher.stop:
                return entry

    def close(self) -> None:
        self.closed = True
