"""A backend that replays a script of exits: for tests that need neither KVM nor an emulator.

Each script entry is an exit from :mod:`labkit.exits`.  ``Io`` and ``Mmio``
entries go to the dispatcher as a real backend would send them (a read's
value is recorded in :attr:`FakeBackend.reads`); any other entry ends
``run`` and is returned.  When the script is used up, ``run`` returns
``Timeout``, as a guest that never stops would.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from labkit import exits
from labkit.backend import Dispatcher
from labkit.x86.state import Regs, SRegs


class FakeBackend:
    kind = "fake"

    def __init__(self, memory_size: int, mode: int, script: Iterable[exits.Exit] = ()):
        self.mode = mode
        self.memory = memoryview(bytearray(memory_size))
        self.script = list(script)
        self.reads: list[int] = []
        self._regs = Regs()
        self._sregs = SRegs()
        self._msrs: dict[int, int] = {}
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

    def run(self, dispatcher: Dispatcher, timeout: float) -> exits.Exit:
        while self.script:
            exit = self.script.pop(0)
            if isinstance(exit, exits.Io):
                value = dispatcher.pio(exit.port, exit.size, exit.is_write, exit.data, self._regs.rip)
            elif isinstance(exit, exits.Mmio):
                value = dispatcher.mmio(exit.address, exit.size, exit.is_write, exit.data, self._regs.rip)
            else:
                return exit
            if not exit.is_write:
                self.reads.append(value)
            if dispatcher.stop:
                return exit
        return exits.Timeout(budget_s=timeout)

    def close(self) -> None:
        self.closed = True
