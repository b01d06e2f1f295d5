"""Intel 8254 programmable interval timer, channel 0 (the PC's system timer on IRQ 0), on host time.

Ports (offsets from 0x40): 0 channel 0's counter, 3 the control word register;
names as in the Intel 8254 datasheet (order number 231164): CR (count
register: the count written), CE (counting element: the count now), OL
(output latch: a latched count), and the control word's SC, RW, M and BCD
fields.  The input clock is the PC's 1.193182 MHz (14.31818 MHz / 12), so a
count means what it means on a PC: count 1193 is one tick per 0.99985 ms.

Modelled: control words for channel 0 with RW = 1 (LSB only), 2 (MSB only),
3 (LSB then MSB) and the counter latch command (RW = 0); modes 0 (interrupt on
terminal count: one rising edge of OUT after the count), 2 (rate generator)
and 3 (square wave) (and 6, 7, which the datasheet makes 2, 3): both periodic
modes give one rising edge of OUT per period, which is what IRQ 0 sees; count
0 means 65536 (binary counting); reads of CE (or OL, once latched) through the
same RW sequence, CE computed from host time as the chip would count it (mode
3 by twos, as QEMU does).  Each rising edge of OUT is a pulse on the
interrupt line (``pulse_irq``); an edge that arrives while the PIC still holds
the previous one in IRR is lost there, as on a PC, and counted here in
``coalesced`` (so are edges the host thread woke too late to deliver one by
one: ``periods == delivered + coalesced + pending``).

Differences from the chip, on purpose: a period shorter than
:data:`MIN_PERIOD_S` (100 µs: counts below :data:`MIN_COUNT` = 120) runs at
100 µs instead, so a guest cannot make the host thread spin (``clamped`` says
when that happened; the CE a guest reads then counts down at the slower rate);
a new count takes effect at once (the chip finishes the current period first
in modes 2 and 3).  Time is the host's (``time.monotonic``): it goes on while
the guest is paused or between runs, where the ticks coalesce into one
request.

Not modelled; the guest gets ``labkit.errors.NotModelled`` naming it (the run ends with status ``error``): channels 1 and
2 (ports 0x41, 0x42, and control words selecting them), the read-back
command (SC = 3), BCD counting, modes 1, 4 and 5 (gate-triggered and strobes),
and a count written before any control word (the chip's mode is undefined
after power-on).  Reads of the write-only control word register return 0xFF.

The ticks come from one thread per timer ("labkit-pit"), started when the
guest first starts the counter, in the process that runs the guest (the
timer must be built there: on emulation, by a device factory in the worker).
:meth:`Pit8254.close` stops it.  Not ``labkit.watchdog.WATCHDOG``: it calls
its actions under its own lock, and a tick calls the backend's ``kick``, which
takes the backend's lock, while a run arms the watchdog: a lock-order cycle.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from labkit.errors import ConfigError, NotModelled

PIT_PORT = 0x40
"""Channel 0's counter on a PC; the control word register is ``PIT_PORT + 3``."""
PORTS = 4
PIT_HZ = 1_193_182
"""The 8254's input clock on a PC, in Hz."""
MIN_PERIOD_S = 100e-6
"""The shortest period labkit runs (see the module docstring); a Python thread holds it on 2 cores."""
MIN_COUNT = math.ceil(MIN_PERIOD_S * PIT_HZ)
"""The smallest count that runs at its real period (120)."""
IRQ_LINE = 0

CHANNEL0_DATA, CONTROL = 0, 3
RW_LATCH, RW_LSB, RW_MSB, RW_LSB_MSB = 0, 1, 2, 3
MODES = {0: 0, 2: 2, 3: 3, 6: 2, 7: 3}
"""Control-word M field -> the mode it selects (the datasheet's 6 and 7 are 2 and 3)."""


def _other_channel(port: int) -> NotModelled:
    return NotModelled(f"8254: channel {port} (port {PIT_PORT + port:#x}) is not modelled; only channel 0 is")


class InterruptLines(Protocol):
    """What the timer needs from an interrupt controller (``labkit.vmm.interrupts.InterruptController``)."""

    def pulse_irq(self, line: int) -> bool: ...

    def set_armed(self, line: int, armed: bool) -> None: ...


@dataclass(frozen=True, slots=True)
class PitState:
    """``Pit8254.save()``: channel 0's registers as plain ints; times as host nanoseconds since the count
    was loaded, so a restored timer goes on in the same phase."""

    mode: int = 0
    access: int = RW_LSB_MSB
    count: int = 0
    """CR: the count as written, 0..0xFFFF (0 counts 65536)."""
    programmed: bool = False
    """A control word was written since reset."""
    counting: bool = False
    write_msb_next: bool = False
    read_msb_next: bool = False
    latched: int = -1
    """OL while a latched count waits to be read, else -1."""
    latch_msb_next: bool = False
    elapsed_ns: int = 0
    """Host time since the count was loaded (while counting)."""
    edges: int = 0
    """Rising edges of OUT since the count was loaded."""
    periods: int = 0
    """Rising edges of OUT since reset (host time / period while counting)."""
    coalesced: int = 0
    """Edges that did not become a request of their own: IRR still held the last, or a late wake-up
    of the timer thread bunched them."""


class Pit8254:
    """8254 channel 0 driving ``line`` of ``interrupts`` (see the module docstring)."""

    # Channel 0's registers, as in PitState (set by _load).
    mode: int
    access: int
    count: int
    programmed: bool
    counting: bool
    write_msb_next: bool
    read_msb_next: bool
    latched: int
    latch_msb_next: bool
    edges: int
    periods: int
    coalesced: int

    def __init__(self, interrupts: InterruptLines, line: int = IRQ_LINE, *,
                 clock: Callable[[], float] = time.monotonic):
        self._interrupts = interrupts
        self._line = line
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._pid = os.getpid()
        self._t0 = 0.0
        self._load(PitState())

    # -- the Device --------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """Byte reads of consecutive ports (an 8-bit ISA device); past the four ports: nothing (0xFF)."""
        self._check_process()
        value = 0
        with self._lock:
            for index in range(size):
                value |= self._read_byte(offset + index) << (8 * index)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        self._check_process()
        with self._lock:
            for index in range(size):
                self._write_byte(offset + index, (value >> (8 * index)) & 0xFF)

    def _read_byte(self, port: int) -> int:
        if port == CHANNEL0_DATA:
            return self._read_counter()
        if port in (1, 2):
            raise _other_channel(port)
        return 0xFF  # the control word register is write-only; nothing is beyond it

    def _write_byte(self, port: int, value: int) -> None:
        if port == CHANNEL0_DATA:
            self._write_counter(value)
        elif port == CONTROL:
            self._control_word(value)
        elif port in (1, 2):
            raise _other_channel(port)

    def _control_word(self, value: int) -> None:
        select, access, mode, bcd = value >> 6, (value >> 4) & 3, (value >> 1) & 7, value & 1
        if select == 3:
            raise NotModelled(f"8254: the read-back command ({value:#04x}) is not modelled")
        if select != 0:
            raise NotModelled(f"8254: control word {value:#04x} selects channel {select}; only channel 0 "
                                      "is modelled")
        if access == RW_LATCH:
            if self.latched < 0:  # a second latch before the first is read is ignored (datasheet)
                self.latched = self._current_count()
                self.latch_msb_next = False
            return
        if bcd:
            raise NotModelled("8254: BCD counting (control word bit 0) is not modelled; count in binary")
        if mode not in MODES:
            raise NotModelled(f"8254: mode {mode} is not modelled (modes 0, 2 and 3 are)")
        self._stop()
        self.mode, self.access, self.programmed = MODES[mode], access, True
        self.write_msb_next = self.read_msb_next = False
        self.latched = -1

    def _write_counter(self, value: int) -> None:
        if not self.programmed:
            raise NotModelled("8254: a count was written to channel 0 before any control word; the "
                                      "chip's mode is undefined after power-on (write port 0x43 first)")
        if self.access == RW_LSB:
            self.count = value
        elif self.access == RW_MSB:
            self.count = value << 8
        elif not self.write_msb_next:
            self.count = (self.count & 0xFF00) | value
            self.write_msb_next = True
            if self.mode == 0:
                self._stop()  # mode 0: writing the first byte stops the count (datasheet)
            return
        else:
            self.count = (self.count & 0x00FF) | (value << 8)
            self.write_msb_next = False
        self._start()

    def _read_counter(self) -> int:
        if self.latched >= 0:
            value, high = self.latched, self.latch_msb_next
            if self.access == RW_LSB_MSB and not high:
                self.latch_msb_next = True
            else:
                self.latched, self.latch_msb_next = -1, False
            return (value >> 8) & 0xFF if high or self.access == RW_MSB else value & 0xFF
        value = self._current_count()
        if self.access == RW_LSB:
            return value & 0xFF
        if self.access == RW_MSB:
            return (value >> 8) & 0xFF
        high = self.read_msb_next
        self.read_msb_next = not high
        return (value >> 8) & 0xFF if high else value & 0xFF

    # -- counting ----------------------------------------------------------------------------

    @property
    def reload(self) -> int:
        """The count in input clocks: CR, with 0 meaning 65536."""
        return self.count or 0x10000

    @property
    def period_s(self) -> float:
        """Seconds between rising edges of OUT (mode 0: from the count's load to the edge), at least MIN_PERIOD_S."""
        return max(self.reload / PIT_HZ, MIN_PERIOD_S)

    @property
    def clamped(self) -> bool:
        """The count asks for a period below MIN_PERIOD_S, so it runs slower than on the chip."""
        return self.reload / PIT_HZ < MIN_PERIOD_S

    def _current_count(self) -> int:
        """CE now: what the chip's counting element would hold (0..0xFFFF)."""
        if not self.counting:
            return self.count
        clocks = int((self._clock() - self._t0) / self.period_s * self.reload + 1e-6)  # + float noise
        if self.mode == 2:
            return (self.reload - clocks % self.reload) & 0xFFFF
        if self.mode == 3:
            return (self.reload - (2 * clocks) % self.reload) & 0xFFFF
        return (self.reload - clocks) & 0xFFFF

    def _start(self) -> None:
        self._t0 = self._clock()
        self.edges = 0
        self.counting = True
        self._interrupts.set_armed(self._line, True)
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="labkit-pit", daemon=True)
            self._thread.start()
        self._changed.notify_all()

    def _stop(self) -> None:
        if self.counting:
            self.counting = False
            self._interrupts.set_armed(self._line, False)
            self._changed.notify_all()

    def _run(self) -> None:
        """The timer thread: sleeps until OUT's next rising edge, then pulses the line.

        The pulse (and the backend's kick it may cause) happens under this timer's lock, so
        when a guest's write to the timer returns, no edge of the old programming is still
        on its way, and ``save`` never sees an edge counted but not yet at the PIC.  Lock
        order: this timer's, then the controller's, then (after the controller's is
        released) the backend's kick; nothing takes them the other way round."""
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())  # no signal meant for a vCPU lands here
        with self._changed:
            while True:
                if self._closed:
                    return
                if not self.counting or (self.mode == 0 and self.edges):
                    self._changed.wait()
                    continue
                now = self._clock()
                due = int((now - self._t0) / self.period_s) - self.edges
                if due <= 0:
                    self._changed.wait(self._t0 + (self.edges + 1) * self.period_s - now)
                    continue
                if self.mode == 0:
                    due = 1  # OUT stays high until the next count or control word; CE counts on
                    self._interrupts.set_armed(self._line, False)
                self.edges += due
                self.periods += due
                self.coalesced += due - 1  # edges this late wake-up bunched: the PIC sees one
                if not self._interrupts.pulse_irq(self._line):
                    self.coalesced += 1

    # -- lifetime and device state -----------------------------------------------------------

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise ConfigError("this Pit8254 was built in another process; build it where the guest runs "
                              "(on emulation: with a device factory, inside the worker)")

    def close(self) -> None:
        """Stop counting and end the timer thread."""
        with self._changed:
            self._stop()
            self._closed = True
            self._changed.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=1.0)

    def reset(self) -> None:
        """Power-on: no control word, not counting, counters zero."""
        with self._lock:
            self._stop()
            self._load(PitState())

    def save(self) -> PitState:
        with self._lock:
            elapsed = round((self._clock() - self._t0) * 1e9) if self.counting else 0
            return PitState(self.mode, self.access, self.count, self.programmed, self.counting, self.write_msb_next,
                            self.read_msb_next, self.latched, self.latch_msb_next, elapsed, self.edges,
                            self.periods, self.coalesced)

    def restore(self, state: PitState) -> None:
        """Load ``state``; a counting timer goes on in the phase it was saved in."""
        self._check_process()
        _check_state(state)
        with self._lock:
            self._stop()
            self._load(state)
            if state.counting:
                self._start()
                self._t0 = self._clock() - state.elapsed_ns / 1e9
                self.edges = state.edges
                if self.mode == 0 and self.edges:  # its one edge has come: nothing more to raise
                    self._interrupts.set_armed(self._line, False)

    def _load(self, state: PitState) -> None:
        self.mode, self.access, self.count, self.programmed = state.mode, state.access, state.count, state.programmed
        self.counting = False
        self.write_msb_next, self.read_msb_next = state.write_msb_next, state.read_msb_next
        self.latched, self.latch_msb_next = state.latched, state.latch_msb_next
        self.edges, self.periods, self.coalesced = state.edges, state.periods, state.coalesced


def _check_state(state: PitState) -> None:
    if not isinstance(state, PitState):
        raise ConfigError(f"an 8254 restores from a PitState, not {type(state).__name__}")

    def integer(name: str, low: int, high: float) -> None:
        value = getattr(state, name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"8254 state: {name} must be an integer in [{low}, {high}], not {value!r}")

    if state.mode not in (0, 2, 3):
        raise ConfigError(f"8254 state: mode must be 0, 2 or 3, not {state.mode!r}")
    if state.access not in (RW_LSB, RW_MSB, RW_LSB_MSB):
        raise ConfigError(f"8254 state: access must be 1, 2 or 3, not {state.access!r}")
    integer("count", 0, 0xFFFF)
    integer("latched", -1, 0xFFFF)
    for name in ("elapsed_ns", "edges", "periods", "coalesced"):
        integer(name, 0, math.inf)
    for name in ("programmed", "counting", "write_msb_next", "read_msb_next", "latch_msb_next"):
        if not isinstance(getattr(state, name), bool):
            raise ConfigError(f"8254 state: {name} must be a bool, not {getattr(state, name)!r}")
    if state.counting and not state.programmed:
        raise ConfigError("8254 state: counting without a control word")
    period_s = max((state.count or 0x10000) / PIT_HZ, MIN_PERIOD_S)
    if state.counting and state.edges > state.elapsed_ns / 1e9 / period_s + 1:
        raise ConfigError(f"8254 state: {state.edges} edges cannot have happened in {state.elapsed_ns} ns")
