"""One Intel 8259A programmable interrupt controller: the register model, no threads.

Registers and commands are named as in the Intel 8259A datasheet (order number
231468): IRR (interrupt request register), ISR (in-service register), IMR
(interrupt mask register), ICW1-ICW4 (initialization command words) and
OCW1-OCW3 (operation command words).  Port offsets are the chip's A0 input:
offset 0 is the command port (0x20 on the PC's master), offset 1 the data port
(0x21).

Modelled (what PC guests use):

- the initialization sequence ICW1, ICW2 (vector base: T7-T3), ICW3 (when
  ICW1.SNGL = 0) and ICW4 (when ICW1.IC4 = 1);
  ICW1 clears IMR and ISR, forgets latched requests and selects IRR for reads;
- OCW1: IMR (a masked request still latches in IRR, as on the chip);
- OCW2: non-specific EOI, specific EOI, no-op, and "rotate in AEOI mode
  (clear)", which clears a mode this model never enters;
- OCW3: read IRR or ISR at the next command-port read; reset special mask mode;
- ICW4.AEOI (automatic end of interrupt: acknowledging does not set ISR);
- edge-triggered requests with fixed priority, IR0 highest, fully nested:
  a request is delivered only above every level in service.

Not modelled; the guest asking for one gets ``labkit.errors.NotModelled`` naming it (the run ends with status ``error``)
(the machine reports it as a device error, never behaves differently unsaid):
level-triggered mode (ICW1.LTIM), MCS-80/85 mode (ICW4.uPM = 0, which also
follows from leaving out ICW4), special fully nested mode (ICW4.SFNM), priority
rotation (OCW2 with R = 1, "set priority"), special mask mode (OCW3.SMM) and
the poll command (OCW3.P).  Cascading is the wiring of two chips
(``labkit.vmm.interrupts``): a chip stores ICW3 and ICW4's BUF and M/S bits
without acting on them (the wiring, not the buffered-mode pins, decides which
chip is the slave).  The edge-sense latch follows the datasheet's "the IR input must make a
low-to-high transition" but, as QEMU's model does, a request stays latched in
IRR when the line falls again before it is acknowledged (a timer's pulse).
"""

from __future__ import annotations

from dataclasses import dataclass

from labkit.errors import ConfigError, NotModelled

LINES = 8

ICW1_IC4 = 0x01
"""ICW4 needed."""
ICW1_SNGL = 0x02
"""Single (no ICW3): no slaves."""
ICW1_LTIM = 0x08
"""Level-triggered mode."""
ICW1_INIT = 0x10
"""Marks a command-port write as ICW1."""
ICW4_UPM = 0x01
"""8086/8088 mode (else MCS-80/85)."""
ICW4_AEOI = 0x02
"""Automatic end of interrupt."""
ICW4_SFNM = 0x10
"""Special fully nested mode."""
OCW3_MARK = 0x08
"""Marks a command-port write (with D4 = 0) as OCW3, else OCW2."""
OCW3_RR, OCW3_RIS, OCW3_P, OCW3_SMM, OCW3_ESMM = 0x02, 0x01, 0x04, 0x20, 0x40

# Where the chip is in its initialization sequence: the ICW the data port expects next.
READY, EXPECT_ICW2, EXPECT_ICW3, EXPECT_ICW4 = 0, 2, 3, 4
UNINITIALISED = -1
"""After power-on and ``reset``: no ICW1 yet, so no vector base; nothing is delivered."""


def _lowest_bit(mask: int) -> int:
    """The index of the lowest set bit (the highest priority level); ``LINES`` when none is set."""
    return (mask & -mask).bit_length() - 1 if mask else LINES


@dataclass(frozen=True, slots=True)
class PicState:
    """Everything an 8259A holds, as plain ints (``save``/``restore``)."""

    irr: int = 0
    isr: int = 0
    imr: int = 0
    icw1: int = 0
    icw2: int = 0
    """Vector base in T7-T3 (the low three bits are the level)."""
    icw3: int = 0
    icw4: int = 0
    init_step: int = UNINITIALISED
    read_isr: bool = False
    """OCW3.RIS as last set: a command-port read returns ISR (else IRR)."""


class Pic8259:
    """One 8259A's registers and commands; ``read``/``write`` take the A0 offset (0 or 1).

    Not thread-safe: :class:`labkit.vmm.interrupts.InterruptController` serialises it.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Power-on: uninitialised, nothing requested, in service or masked."""
        self.restore(PicState())

    # -- state ------------------------------------------------------------------

    def save(self) -> PicState:
        return PicState(self.irr, self.isr, self.imr, self.icw1, self.icw2, self.icw3, self.icw4,
                        self.init_step, self.read_isr)

    def restore(self, state: PicState) -> None:
        if not isinstance(state, PicState):
            raise ConfigError(f"an 8259A restores from a PicState, not {type(state).__name__}")
        for name in ("irr", "isr", "imr", "icw1", "icw2", "icw3", "icw4"):
            value = getattr(state, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFF:
                raise ConfigError(f"8259A state: {name} must be a byte, not {value!r}")
        if state.init_step not in (UNINITIALISED, READY, EXPECT_ICW2, EXPECT_ICW3, EXPECT_ICW4):
            raise ConfigError(f"8259A state: init_step {state.init_step!r} is not a step of the ICW sequence")
        self.irr, self.isr, self.imr = state.irr, state.isr, state.imr
        self.icw1, self.icw2, self.icw3, self.icw4 = state.icw1, state.icw2, state.icw3, state.icw4
        self.init_step = state.init_step
        self.read_isr = bool(state.read_isr)

    @property
    def initialised(self) -> bool:
        """The ICW sequence is complete: the chip has a vector base and delivers requests."""
        return self.init_step == READY

    @property
    def vector_base(self) -> int:
        """ICW2's T7-T3: level ``n`` is delivered as vector ``vector_base + n``."""
        return self.icw2 & 0xF8

    @property
    def auto_eoi(self) -> bool:
        return bool(self.icw4 & ICW4_AEOI)

    # -- requests and delivery ------------------------------------------------------

    def request(self, level: int) -> bool:
        """A rising edge on IR ``level``: latch it in IRR.  Returns False when IRR already held it
        (the new request merges with the one not yet acknowledged)."""
        bit = 1 << level
        if self.irr & bit:
            return False
        self.irr |= bit
        return True

    def pending_level(self) -> int | None:
        """The level the chip would raise INT for: the highest-priority unmasked request above
        every level in service (fully nested mode); ``None`` when there is none."""
        if self.init_step != READY:
            return None
        level = _lowest_bit(self.irr & ~self.imr)
        if level < _lowest_bit(self.isr):
            return level
        return None

    def acknowledge(self, level: int) -> None:
        """The INTA cycles for ``level``: IRR -> ISR (only IRR cleared with AEOI)."""
        bit = 1 << level
        self.irr &= ~bit
        if not self.auto_eoi:
            self.isr |= bit

    # -- the ports -----------------------------------------------------------------

    def read(self, a0: int) -> int:
        if a0:
            return self.imr
        return self.isr if self.read_isr else self.irr

    def write(self, a0: int, value: int) -> None:
        value &= 0xFF
        if a0 == 0:
            if value & ICW1_INIT:
                self._icw1(value)
            elif value & OCW3_MARK:
                self._ocw3(value)
            else:
                self._ocw2(value)
            return
        step = self.init_step
        if step == EXPECT_ICW2:
            self.icw2 = value
            self.init_step = self._after(EXPECT_ICW2)
        elif step == EXPECT_ICW3:
            self.icw3 = value
            self.init_step = self._after(EXPECT_ICW3)
        elif step == EXPECT_ICW4:
            if not value & ICW4_UPM:
                raise NotModelled("8259A: ICW4 with uPM = 0 selects MCS-80/85 mode, which is not "
                                          "modelled (8086 mode needs uPM = 1)")
            if value & ICW4_SFNM:
                raise NotModelled("8259A: special fully nested mode (ICW4.SFNM) is not modelled")
            self.icw4 = value
            self.init_step = READY
        else:  # OCW1 (also before any ICW1, as on QEMU's model)
            self.imr = value

    def _icw1(self, value: int) -> None:
        if value & ICW1_LTIM:
            raise NotModelled("8259A: level-triggered mode (ICW1.LTIM) is not modelled; "
                                      "only edge-triggered requests are")
        if not value & ICW1_IC4:
            raise NotModelled("8259A: ICW1 without IC4 leaves ICW4 = 0, i.e. MCS-80/85 mode, which is "
                                      "not modelled: set IC4 and send ICW4 with uPM = 1")
        self.icw1 = value
        self.icw3 = self.icw4 = 0
        self.irr = self.isr = self.imr = 0
        self.read_isr = False
        self.init_step = EXPECT_ICW2

    def _after(self, step: int) -> int:
        """The ICW that follows ``step`` given ICW1 (ICW3 only when cascaded, ICW4 when IC4)."""
        if step == EXPECT_ICW2 and not self.icw1 & ICW1_SNGL:
            return EXPECT_ICW3
        return EXPECT_ICW4  # IC4 is always set: ICW1 without it is refused

    def _ocw2(self, value: int) -> None:
        command, level = value >> 5, value & 7
        if command == 0b001:  # non-specific EOI: the highest-priority level in service
            in_service = _lowest_bit(self.isr)
            if in_service < LINES:
                self.isr &= ~(1 << in_service)
        elif command == 0b011:  # specific EOI
            self.isr &= ~(1 << level)
        elif command in (0b010, 0b000):  # no operation; rotate in AEOI mode (clear): never set
            pass
        else:
            names = {0b100: "rotate in AEOI mode (set)", 0b101: "rotate on non-specific EOI",
                     0b110: "set priority", 0b111: "rotate on specific EOI"}
            raise NotModelled(f"8259A: OCW2 {value:#04x} ({names[command]}) is not modelled; "
                                      "priority is fixed, IR0 highest")

    def _ocw3(self, value: int) -> None:
        if value & OCW3_ESMM and value & OCW3_SMM:
            raise NotModelled("8259A: special mask mode (OCW3.ESMM|SMM) is not modelled")
        if value & OCW3_P:
            raise NotModelled("8259A: the poll command (OCW3.P) is not modelled")
        if value & OCW3_RR:
            self.read_isr = bool(value & OCW3_RIS)
