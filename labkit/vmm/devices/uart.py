"""Minimal 16550A UART, transmit only.

Modelled: THR (offset 0; DLL when LCR.DLAB is set), IER/DLM (1), IIR/FCR (2),
LCR (3), MCR (4), LSR (5), MSR (6), SCR (7), as named in the National
Semiconductor PC16550D datasheet.  LSR always reports the transmitter holding
register and the transmitter empty (THRE | TEMT), so guests that poll it before
each byte work.  Not modelled: receive, interrupts, FIFOs, modem lines, baud
timing.  What the guest transmits goes to a :class:`Console`.
"""

from __future__ import annotations

from labkit.errors import ConfigError

from labkit.vmm.devices.console import Console

LSR_THRE = 0x20
"""Transmitter holding register empty."""
LSR_TEMT = 0x40
"""Transmitter empty."""
LCR_DLAB = 0x80
"""Divisor latch access bit: offsets 0 and 1 address DLL/DLM instead of THR/IER."""


class Uart16550:
    """The guest's serial console."""

    REGISTERS = ("ier", "lcr", "mcr", "scr", "dll", "dlm")
    """The registers :meth:`save` keeps (the console keeps what was transmitted)."""

    def __init__(self, console: Console):
        self.console = console
        self.reset()

    def reset(self) -> None:
        """Power-on values: 8N1 line control, divisor 1 (115200 baud), no interrupts enabled."""
        self.ier = 0
        self.lcr = 0x03
        self.mcr = 0
        self.scr = 0
        self.dll = 0x01
        self.dlm = 0x00

    def save(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.REGISTERS}

    def restore(self, state: dict[str, int]) -> None:
        if set(state) != set(self.REGISTERS):
            raise ConfigError(f"a 16550 state has the registers {', '.join(self.REGISTERS)}; got {sorted(state)}")
        for name in self.REGISTERS:
            setattr(self, name, int(state[name]) & 0xFF)

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        dlab = self.lcr & LCR_DLAB
        if offset == 0 and not dlab:
            self.console.put(value)
        elif offset == 0:
            self.dll = value
        elif offset == 1:
            if dlab:
                self.dlm = value
            else:
                self.ier = value & 0x0F
        elif offset == 3:
            self.lcr = value
        elif offset == 4:
            self.mcr = value & 0x1F
        elif offset == 7:
            self.scr = value
        # FCR (2), LSR (5) and MSR (6) writes have nothing to model here.

    def read(self, offset: int, size: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == 0:
            return self.dll if dlab else 0  # RBR: nothing is ever received
        if offset == 1:
            return self.dlm if dlab else self.ier
        if offset == 2:
            return 0x01  # IIR: no interrupt pending
        if offset == 3:
            return self.lcr
        if offset == 4:
            return self.mcr
        if offset == 5:
            return LSR_THRE | LSR_TEMT
        if offset == 6:
            return 0xB0  # MSR: DCD, DSR, CTS asserted
        return self.scr
