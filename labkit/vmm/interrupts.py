"""The interrupt controller between labkit's devices and the vCPU: a PC's two cascaded 8259As.

:class:`InterruptController` holds the master 8259A (ports 0x20/0x21, IRQ 0-7)
and the slave (ports 0xA0/0xA1, IRQ 8-15), wired as on a PC: the slave's INT
output drives the master's IR2 (so line 2 is the cascade, not a device's).
Each is a :class:`~labkit.vmm.devices.pic.Pic8259`, whose module says what of
the chip is modelled.  The controller itself is the master's device on the
port bus; :attr:`InterruptController.slave_ports` is the slave's.  On top it
gives the run loop and the backends what they need from an interrupt
controller (``labkit.backend.Dispatcher``'s interrupt members, which the core
delegates here):

- ``interrupt_pending``: a plain bool, True while the PICs have a vector to
  deliver (an unmasked request above every level in service).  Backends read
  it before every guest entry;
- ``pending_vector()`` and ``acknowledge_interrupt(vector)``: the INTA cycles,
  split so a backend injects first and acknowledges once the vector is on its
  way (IRR -> ISR, on both chips for a slave's request);
- ``raise_irq(line)`` / ``lower_irq(line)``: an edge-triggered request line,
  0-15, from any thread; a rising edge that makes an interrupt pending calls
  ``kick`` (the backend's), so a guest spinning in a loop is interrupted;
- ``armed`` and ``wait(timeout)``: whether a HLT with IF = 1 should wait (some
  source may still raise a line that can reach the CPU), and the wait itself.

The cascade: the slave's INT is high while it has a request to deliver; its
rising edge latches IR2 at the master (only while the master is initialised
in cascade mode, ICW1.SNGL = 0, with ICW3 bit 2 set; otherwise it goes
nowhere).  The master's INTA for IR2 makes the slave answer with its vector;
INT falls in the INTA cycles, so a further slave request raises it again.  A
slave request that went away before the INTA (masked meanwhile) is answered
with the slave's IR7 vector and no ISR bit: the datasheet's spurious
interrupt, which a guest ends with an EOI to the master only.

Threads.  Devices on the bus and the backend call in from the vCPU thread; a
timer raises lines from its own thread.  Every change of the chips' state
happens under one lock, and ``interrupt_pending`` is rewritten under it after
each change.  Backends read ``interrupt_pending`` without the lock (the hot
path: once per guest entry); that is safe because a stale value is harmless
both ways: a stale False (a line rose just after the read) is followed by the
raising thread's ``kick``, which it calls after the store, so the run in
progress returns ``Interrupted`` (or the next one does at once) and the
backend reads the flag again before re-entering; a stale True cannot happen
from another thread (only the vCPU thread clears requests: acknowledge, EOI,
mask, ICW1), and ``pending_vector`` re-decides under the lock anyway,
returning ``None`` when nothing is left.  A bool attribute store or load is
atomic in CPython.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Protocol

from labkit.errors import ConfigError
from labkit.vmm.devices.pic import ICW1_SNGL, Pic8259, PicState

MASTER_PORT = 0x20
"""The master 8259A's command port on a PC; its data port is ``MASTER_PORT + 1``."""
SLAVE_PORT = 0xA0
"""The slave 8259A's command port; its data port is ``SLAVE_PORT + 1``."""
PORTS = 2
LINES = 16
"""IRQ 0-7 at the master, 8-15 at the slave."""
CASCADE_LINE = 2
"""The master's IR2 input carries the slave's INT; no device may drive it (a PC's IRQ 9 stands in)."""
SPURIOUS_LEVEL = 7


def _check_line(line: int) -> int:
    if isinstance(line, bool) or not isinstance(line, int) or not 0 <= line < LINES:
        raise ConfigError(f"interrupt line must be 0..{LINES - 1} (IRQ 0-7 at the master 8259A, 8-15 at the "
                          f"slave), not {line!r}")
    if line == CASCADE_LINE:
        raise ConfigError("interrupt line 2 is the master 8259A's cascade input from the slave; "
                          "use line 9, as a PC does")
    return line


@dataclass(frozen=True, slots=True)
class InterruptControllerState:
    """``InterruptController.save()``: both chips, the line levels, the cascade, and the per-line counters."""

    master: PicState
    slave: PicState = PicState()
    lines: int = 0
    """Current level of each line (bit n = IRQ n is high)."""
    slave_int: bool = False
    """The slave's INT output (the master's IR2 input) as last driven."""
    delivered: tuple[int, ...] = (0,) * LINES
    coalesced: tuple[int, ...] = (0,) * LINES


class InterruptLines(Protocol):
    """What :class:`labkit.vmm.core.MachineCore` needs of its interrupt controller.

    :class:`InterruptController` (the PC's two PICs) is the one labkit builds;
    tests give the core simpler stand-ins.
    """

    @property
    def interrupt_pending(self) -> bool: ...

    @property
    def armed(self) -> bool: ...

    def pending_vector(self) -> int | None: ...

    def acknowledge_interrupt(self, vector: int) -> None: ...

    def raise_irq(self, line: int) -> bool: ...

    def lower_irq(self, line: int) -> None: ...

    def wait(self, timeout: float) -> bool: ...


class InterruptController:
    """A PC's master and slave 8259A as the vCPU's interrupt controller (see the module docstring).

    ``kick`` is called (from the raising thread, without any lock held) when a
    rising edge makes an interrupt pending.
    """

    def __init__(self, kick: Callable[[], None] | None = None):
        self._kick = kick
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._armed_lines = 0
        self._woken = False
        self.master = Pic8259()
        self.slave = Pic8259()
        self.slave_ports = SlavePorts(self)
        """The slave's device on the port bus (``SLAVE_PORT``)."""
        self.interrupt_pending = False
        self._reset_locked()

    def _reset_locked(self) -> None:
        self.master.reset()
        self.slave.reset()
        self._lines = 0
        self._slave_int = False
        self.delivered = [0] * LINES
        """Interrupts acknowledged (injected into the guest), per line."""
        self.coalesced = [0] * LINES
        """Rising edges lost because IRR still held the previous request, per line."""
        self.interrupt_pending = False

    # -- Device: the master's ports 0x20 (command) and 0x21 (data) -------------------------------

    def read(self, offset: int, size: int) -> int:
        """Byte reads of A0 = ``offset``; a wider access reads consecutive ports (as an 8-bit ISA
        device sees it); offsets past the chip's two ports read as nothing there (0xFF)."""
        return self._read(self.master, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        """Byte writes, as :meth:`read`; writes past the chip's two ports are dropped."""
        self._write(self.master, offset, size, value)

    def _read(self, chip: Pic8259, offset: int, size: int) -> int:
        value = 0
        with self._lock:
            for index in range(size):
                port = offset + index
                byte = chip.read(port) if 0 <= port < PORTS else 0xFF
                value |= byte << (8 * index)
        return value

    def _write(self, chip: Pic8259, offset: int, size: int, value: int) -> None:
        with self._lock:
            try:
                for index in range(size):
                    port = offset + index
                    if 0 <= port < PORTS:
                        chip.write(port, (value >> (8 * index)) & 0xFF)
            finally:
                self._update_locked()

    # -- Dispatcher members (vCPU thread) --------------------------------------------------

    def pending_vector(self) -> int | None:
        """The vector the PICs would hand the CPU now, or ``None`` (nothing unmasked above what is in service)."""
        with self._lock:
            return self._pending_vector_locked()

    def acknowledge_interrupt(self, vector: int) -> None:
        """The guest has taken ``vector`` (the backend injected it): its request moves IRR -> ISR
        (at the master's IR2 and at the slave for a slave's request)."""
        with self._lock:
            master, slave = self.master, self.slave
            level = vector - master.vector_base
            cascaded = self._cascaded()
            if master.initialised and 0 <= level < 8 and master.irr & (1 << level) \
                    and not (cascaded and level == CASCADE_LINE):
                master.acknowledge(level)
                self.delivered[level] += 1
            elif cascaded and master.irr & (1 << CASCADE_LINE) and slave.initialised \
                    and 0 <= vector - slave.vector_base < 8:
                level = vector - slave.vector_base
                requested = bool(slave.irr & (1 << level))
                if not requested and level != SPURIOUS_LEVEL:
                    raise ConfigError(f"vector {vector:#x} is not requested at the slave PIC (IRR {slave.irr:#04x})")
                master.acknowledge(CASCADE_LINE)
                if requested:  # else the spurious IR7: no ISR bit at the slave
                    slave.acknowledge(level)
                    self.delivered[8 + level] += 1
                self._slave_int = False  # INT falls in the INTA cycles
            else:
                raise ConfigError(f"vector {vector:#x} is not requested at the PICs (vector bases "
                                  f"{master.vector_base:#x}/{slave.vector_base:#x}, IRR "
                                  f"{master.irr:#04x}/{slave.irr:#04x}): it cannot be acknowledged")
            self._update_locked()

    # -- lines (any thread) ------------------------------------------------------------------

    def raise_irq(self, line: int) -> bool:
        """Drive ``line`` high.  A rising edge latches a request in IRR; returns False when it did not
        (the line was already high, or IRR still held the previous request: counted in ``coalesced``)."""
        bit = 1 << _check_line(line)
        with self._lock:
            if self._lines & bit:
                return False
            self._lines |= bit
            latched = (self.master if line < 8 else self.slave).request(line % 8)
            if not latched:
                self.coalesced[line] += 1
            became_pending = self._update_locked()
        if became_pending and self._kick is not None:
            self._kick()
        return latched

    def lower_irq(self, line: int) -> None:
        """Drive ``line`` low (a latched request stays in IRR until acknowledged)."""
        bit = 1 << _check_line(line)
        with self._lock:
            self._lines &= ~bit

    def pulse_irq(self, line: int) -> bool:
        """A rising then falling edge (a timer's output pulse); returns what :meth:`raise_irq` returns."""
        latched = self.raise_irq(line)
        self.lower_irq(line)
        return latched

    def set_armed(self, line: int, armed: bool) -> None:
        """A source says whether it may still raise ``line`` by itself (a programmed timer does)."""
        bit = 1 << _check_line(line)
        with self._lock:
            self._armed_lines = (self._armed_lines | bit) if armed else (self._armed_lines & ~bit)
            self._changed.notify_all()

    # -- HLT --------------------------------------------------------------------------------

    @property
    def armed(self) -> bool:
        """True when a HLT with IF = 1 should wait: an interrupt is pending, or a line that can reach the
        CPU (its PIC initialised, unmasked, through the cascade for the slave's) has a source that may
        still raise it.  False when nothing can ever wake the guest."""
        with self._lock:
            if self.interrupt_pending:
                return True
            return bool(self._armed_lines & self._reachable_locked())

    def wait(self, timeout: float) -> bool:
        """Block until an interrupt is pending, :meth:`wake` is called, or ``timeout`` seconds pass;
        returns ``interrupt_pending``.  A :meth:`wake` before the wait makes it return at once."""
        with self._changed:
            if not self.interrupt_pending and not self._woken:
                timeout = min(max(timeout, 0.0), threading.TIMEOUT_MAX)
                self._changed.wait_for(lambda: self.interrupt_pending or self._woken, timeout)
            self._woken = False
            return self.interrupt_pending

    def wake(self) -> None:
        """End a :meth:`wait` in progress (or the next one) early: for a pause request."""
        with self._changed:
            self._woken = True
            self._changed.notify_all()

    # -- the cascade and the pending flag (under the lock) ----------------------------------------

    def _cascaded(self) -> bool:
        master = self.master
        return master.initialised and not master.icw1 & ICW1_SNGL and bool(master.icw3 & (1 << CASCADE_LINE))

    def _reachable_locked(self) -> int:
        """The lines whose requests can reach the CPU as things stand (bit n = IRQ n)."""
        master, lines = self.master, 0
        if master.initialised:
            lines = ~master.imr & 0xFF & ~(1 << CASCADE_LINE)
            if self._cascaded() and self.slave.initialised and not master.imr & (1 << CASCADE_LINE):
                lines |= (~self.slave.imr & 0xFF) << 8
        return lines

    def _pending_vector_locked(self) -> int | None:
        level = self.master.pending_level()
        if level is None:
            return None
        if level == CASCADE_LINE and self._cascaded():
            slave_level = self.slave.pending_level()
            return self.slave.vector_base + (SPURIOUS_LEVEL if slave_level is None else slave_level)
        return self.master.vector_base + level

    def _update_locked(self) -> bool:
        """Drive the slave's INT into the master's IR2, then recompute ``interrupt_pending``; returns
        whether it just became True (waiters are woken then)."""
        slave_int = self._cascaded() and self.slave.pending_level() is not None
        if slave_int and not self._slave_int:
            self.master.request(CASCADE_LINE)  # a rising edge on IR2
        self._slave_int = slave_int
        before = self.interrupt_pending
        now = self._pending_vector_locked() is not None
        self.interrupt_pending = now
        if now and not before:
            self._changed.notify_all()
            return True
        return False

    # -- device state ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Power-on state: both chips uninitialised, all lines low, counters zero.  Which lines a source
        has armed (``set_armed``) is the sources' state and survives; they reset themselves."""
        with self._lock:
            self._reset_locked()

    def save(self) -> InterruptControllerState:
        with self._lock:
            return InterruptControllerState(self.master.save(), self.slave.save(), self._lines, self._slave_int,
                                            tuple(self.delivered), tuple(self.coalesced))

    def restore(self, state: InterruptControllerState) -> None:
        if not isinstance(state, InterruptControllerState):
            raise ConfigError(f"an InterruptController restores from an InterruptControllerState, "
                              f"not {type(state).__name__}")
        if isinstance(state.lines, bool) or not isinstance(state.lines, int) or not 0 <= state.lines < 1 << LINES:
            raise ConfigError(f"interrupt controller state: lines must be a {LINES}-bit mask, not {state.lines!r}")
        if not isinstance(state.slave_int, bool):
            raise ConfigError(f"interrupt controller state: slave_int must be a bool, not {state.slave_int!r}")
        for name in ("delivered", "coalesced"):
            counts = getattr(state, name)
            if not isinstance(counts, tuple) or len(counts) != LINES or not all(
                    isinstance(count, int) and not isinstance(count, bool) and count >= 0 for count in counts):
                raise ConfigError(f"interrupt controller state: {name} must be {LINES} counts >= 0, not {counts!r}")
        master, slave = Pic8259(), Pic8259()
        master.restore(state.master)  # both checked before anything changes
        slave.restore(state.slave)
        with self._lock:
            self.master.restore(state.master)
            self.slave.restore(state.slave)
            self._lines = state.lines
            self._slave_int = state.slave_int
            self.delivered = list(state.delivered)
            self.coalesced = list(state.coalesced)
            self.interrupt_pending = False
            self._update_locked()


class SlavePorts:
    """The slave 8259A's ports 0xA0 (command) and 0xA1 (data): the device the port bus holds for it.

    Its state is the controller's: ``save``/``restore`` carry the slave chip only (the
    controller's own ``save`` carries both, the lines and the cascade)."""

    def __init__(self, controller: InterruptController):
        self._controller = controller

    def read(self, offset: int, size: int) -> int:
        return self._controller._read(self._controller.slave, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._controller._write(self._controller.slave, offset, size, value)

    def reset(self) -> None:
        controller = self._controller
        with controller._lock:
            controller.slave.reset()
            controller._update_locked()

    def save(self) -> PicState:
        with self._controller._lock:
            return self._controller.slave.save()

    def restore(self, state: PicState) -> None:
        Pic8259().restore(state)  # checked before anything changes
        controller = self._controller
        with controller._lock:
            controller.slave.restore(state)
            controller._update_locked()
