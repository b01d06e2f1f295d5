"""The interrupt controller between labkit's devices and the vCPU: a PC's master 8259A.

:class:`InterruptController` is the device on ports 0x20/0x21 (one
:class:`~labkit.vmm.devices.pic.Pic8259`; its module says what of the chip is
modelled) plus what the run loop and the backends need from an interrupt
controller (``labkit.backend.Dispatcher``'s interrupt members, which the core
delegates here):

- ``interrupt_pending``: a plain bool, True while the PIC has a vector to
  deliver (an unmasked request above every level in service).  Backends read
  it before every guest entry;
- ``pending_vector()`` and ``acknowledge_interrupt(vector)``: the INTA cycles,
  split so a backend injects first and acknowledges once the vector is on its
  way (IRR -> ISR);
- ``raise_irq(line)`` / ``lower_irq(line)``: an edge-triggered request line,
  from any thread; a rising edge that makes an interrupt pending calls ``kick``
  (the backend's), so a guest spinning in a loop is interrupted;
- ``armed`` and ``wait(timeout)``: whether a HLT with IF = 1 should wait (some
  source may still raise an unmasked line), and the wait itself.

Threads.  Devices on the bus and the backend call in from the vCPU thread; a
timer raises lines from its own thread.  Every change of the chip's state
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
from typing import Callable

from labkit.errors import ConfigError
from labkit.vmm.devices.pic import LINES, Pic8259, PicState

MASTER_PORT = 0x20
"""The master 8259A's command port on a PC; its data port is ``MASTER_PORT + 1``."""
PORTS = 2


def _check_line(line: int) -> int:
    if isinstance(line, bool) or not isinstance(line, int) or not 0 <= line < LINES:
        raise ConfigError(f"interrupt line must be 0..{LINES - 1} (the master 8259A's IR inputs), not {line!r}")
    return line


@dataclass(frozen=True, slots=True)
class InterruptControllerState:
    """``InterruptController.save()``: the chip, the line levels, and the per-line counters."""

    pic: PicState
    lines: int = 0
    """Current level of each line (bit n = IR n is high)."""
    delivered: tuple[int, ...] = (0,) * LINES
    coalesced: tuple[int, ...] = (0,) * LINES


class InterruptController:
    """A PC's master 8259A as the vCPU's interrupt controller (see the module docstring).

    ``kick`` is called (from the raising thread, without any lock held) when a
    rising edge makes an interrupt pending.
    """

    def __init__(self, kick: Callable[[], None] | None = None):
        self._kick = kick
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._armed_lines = 0
        self._woken = False
        self.chip = Pic8259()
        self.interrupt_pending = False
        self._reset_locked()

    def _reset_locked(self) -> None:
        self.chip.reset()
        self._lines = 0
        self.delivered = [0] * LINES
        """Interrupts acknowledged (injected into the guest), per line."""
        self.coalesced = [0] * LINES
        """Rising edges lost because IRR still held the previous request, per line."""
        self.interrupt_pending = False

    # -- Device: ports 0x20 (command) and 0x21 (data) ------------------------------------

    def read(self, offset: int, size: int) -> int:
        """Byte reads of A0 = ``offset``; a wider access reads consecutive ports (as an 8-bit ISA
        device sees it); offsets past the chip's two ports read as nothing there (0xFF)."""
        value = 0
        with self._lock:
            for index in range(size):
                port = offset + index
                byte = self.chip.read(port) if 0 <= port < PORTS else 0xFF
                value |= byte << (8 * index)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """Byte writes, as :meth:`read`; writes past the chip's two ports are dropped."""
        with self._lock:
            try:
                for index in range(size):
                    port = offset + index
                    if 0 <= port < PORTS:
                        self.chip.write(port, (value >> (8 * index)) & 0xFF)
            finally:
                self._update_locked()

    # -- Dispatcher members (vCPU thread) --------------------------------------------------

    def pending_vector(self) -> int | None:
        """The vector the PIC would hand the CPU now, or ``None`` (nothing unmasked above what is in service)."""
        with self._lock:
            level = self.chip.pending_level()
            return None if level is None else self.chip.vector_base + level

    def acknowledge_interrupt(self, vector: int) -> None:
        """The guest has taken ``vector`` (the backend injected it): its request moves IRR -> ISR."""
        with self._lock:
            level = vector - self.chip.vector_base
            if not self.chip.initialised or not 0 <= level < LINES or not self.chip.irr & (1 << level):
                raise ConfigError(f"vector {vector:#x} is not requested at the PIC (vector base "
                                  f"{self.chip.vector_base:#x}, IRR {self.chip.irr:#04x}): it cannot be acknowledged")
            self.chip.acknowledge(level)
            self.delivered[level] += 1
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
            latched = self.chip.request(line)
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
        """True when a HLT with IF = 1 should wait: an interrupt is pending, or an initialised PIC has an
        unmasked line whose source may still raise it.  False when nothing can ever wake the guest."""
        with self._lock:
            if self.interrupt_pending:
                return True
            return self.chip.initialised and bool(self._armed_lines & ~self.chip.imr)

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

    def _update_locked(self) -> bool:
        """Recompute ``interrupt_pending``; returns whether it just became True (waiters are woken then)."""
        before = self.interrupt_pending
        now = self.chip.pending_level() is not None
        self.interrupt_pending = now
        if now and not before:
            self._changed.notify_all()
            return True
        return False

    # -- device state ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Power-on state: the chip uninitialised, all lines low, counters zero.  Which lines a source
        has armed (``set_armed``) is the sources' state and survives; they reset themselves."""
        with self._lock:
            self._reset_locked()

    def save(self) -> InterruptControllerState:
        with self._lock:
            return InterruptControllerState(self.chip.save(), self._lines, tuple(self.delivered),
                                            tuple(self.coalesced))

    def restore(self, state: InterruptControllerState) -> None:
        if not isinstance(state, InterruptControllerState):
            raise ConfigError(f"an InterruptController restores from an InterruptControllerState, "
                              f"not {type(state).__name__}")
        if isinstance(state.lines, bool) or not isinstance(state.lines, int) or not 0 <= state.lines < 1 << LINES:
            raise ConfigError(f"interrupt controller state: lines must be an {LINES}-bit mask, not {state.lines!r}")
        for name in ("delivered", "coalesced"):
            counts = getattr(state, name)
            if len(counts) != LINES or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                                               for c in counts):
                raise ConfigError(f"interrupt controller state: {name} must be {LINES} counts >= 0, not {counts!r}")
        with self._lock:
            self.chip.restore(state.pic)
            self._lines = state.lines
            self.delivered = list(state.delivered)
            self.coalesced = list(state.coalesced)
            self.interrupt_pending = False
            self._update_locked()
