"""One guest on one backend with its devices: the run loop.

:class:`MachineCore` is what a backend's ``run`` calls back for every port and
MMIO exit (it implements :class:`labkit.backend.Dispatcher`), and the loop
that runs the backend until the guest stops.  :class:`labkit.Machine` drives a
core in the calling process, or inside a worker process (``labkit.vmm.worker``)
so that an emulator crash cannot take the caller down.
"""

from __future__ import annotations

import time
from dataclasses import replace
from time import perf_counter_ns
from typing import Sequence

from labkit import exits
from labkit.backend import create_backend
from labkit.errors import ConfigError, LabkitError
from labkit.exits import ExitReason
from labkit.trace import ExitTrace
from labkit.vmm.bus import Bus, Device, PortBus
from labkit.vmm.devices import Console, DebugExit, HypercallPort, Uart16550
from labkit.vmm.exit_handling import Buses, handle_exit
from labkit.vmm.fault import FaultReporter
from labkit.vmm.status import RunResult, Status
from labkit.x86 import layout
from labkit.x86.disasm import instruction_at
from labkit.x86.state import Regs, SRegs

IO = int(ExitReason.IO)
MMIO = int(ExitReason.MMIO)

DeviceSpec = tuple[str, int, int, Device]
"""``(bus, base, length, device)`` with bus ``"pio"`` or ``"mmio"``."""


class MachineCore:
    """Backend + buses + devices + trace for one guest.  Not thread-safe."""

    def __init__(self, guest, backend_name: str, memory_size: int, *,
                 devices: Sequence[DeviceSpec] = (), trace_limit: int | None = None, monitor=None):
        from labkit.x86.boot import boot_state  # the boot builder pulls in the table builders

        self.guest = guest
        self.backend = create_backend(backend_name, memory_size, guest.mode)
        self.stop = False
        self.status: Status | None = None
        self.trace = ExitTrace() if trace_limit is None else ExitTrace(trace_limit)
        self.console = Console()
        self.buses = Buses(PortBus(), Bus("mmio", layout.MAPPED_LIMIT))
        # Bound once: the hot path runs per exit.
        self._pio_read, self._pio_write = self.buses.pio.read, self.buses.pio.write
        self._trace_records, self._trace_limit = self.trace.records, self.trace.limit
        self._single_exit = False
        self._resumed_ns = 0
        self._stop_regs: Regs | None = None
        self.monitor = monitor
        try:
            self._attach_devices(devices)
            boot = boot_state(guest.mode, guest.entry, memory_size, user=guest.user)
            self._load(boot, guest)
            if monitor is not None:
                self._attach_monitor(monitor, boot)
        except BaseException:
            self.backend.close()
            raise

    # -- set-up ---------------------------------------------------------------

    def _attach_devices(self, extra: Sequence[DeviceSpec]) -> None:
        pio = self.buses.pio
        pio.register(layout.COM1_PORT, 8, Uart16550(self.console))
        pio.register(layout.DEBUG_EXIT_PORT, 1, DebugExit(self._exit_requested))
        self.hypercalls = HypercallPort(self.backend.get_regs, self.backend.memory, self.console.extend)
        pio.register(layout.HYPERCALL_PORT, 1, self.hypercalls)
        self.faults = FaultReporter(self.guest.mode, self.backend, self._stopped_with)
        pio.register(layout.FAULT_PORT, 1, self.faults)
        for bus, base, length, device in extra:
            if bus not in ("pio", "mmio"):
                raise ConfigError(f"a device goes on bus 'pio' or 'mmio', not {bus!r}")
            if bus == "mmio" and base < len(self.backend.memory):
                raise ConfigError(f"MMIO device at {base:#x} lies inside guest RAM "
                                  f"(which ends at {len(self.backend.memory):#x})")
            getattr(self.buses, bus).register(base, length, device)

    def _attach_monitor(self, monitor, boot) -> None:
        from labkit.monitor import forwarding

        if self.guest.mode != 64:
            raise ConfigError("a monitor runs long-mode (64-bit) guests")
        forwarding.install(self.backend.memory, boot.sregs.idt.base)
        context = forwarding.MonitorContext(self.backend.memory, self._monitor_pio, self._stopped_with)
        self.trap_port = forwarding.TrapPort(monitor, self.backend, context)
        self.buses.pio.register(layout.TRAP_PORT, 1, self.trap_port)

    def _monitor_pio(self, port: int, size: int, is_write: bool, value: int) -> int:
        if is_write:
            self.buses.pio.write(port, size, value)
            return 0
        return self.buses.pio.read(port, size)

    def _load(self, boot, guest) -> None:
        memory = self.backend.memory
        for address, data in boot.memory:
            memory[address:address + len(data)] = data
        end = guest.load_address + len(guest.code)
        if end > len(memory):
            raise ConfigError(f"guest {guest.name!r} ends at {end:#x}, beyond guest RAM ({len(memory):#x} bytes)")
        memory[guest.load_address:end] = guest.code
        self.backend.set_sregs(boot.sregs)
        if boot.msrs:
            self.backend.set_msrs(boot.msrs)
        self.backend.set_regs(boot.regs)

    # -- the Dispatcher the backend calls (hot path) ---------------------------

    def pio(self, port: int, size: int, is_write: bool, value: int, rip: int) -> int:
        if is_write:
            self._pio_write(port, size, value)
        else:
            value = self._pio_read(port, size)
        self._record(IO, rip, port, size, is_write, value)
        return value

    def mmio(self, address: int, size: int, is_write: bool, value: int, rip: int) -> int:
        if is_write:
            self.buses.mmio.write(address, size, value)
        else:
            value = self.buses.mmio.read(address, size)
        self._record(MMIO, rip, address, size, is_write, value)
        return value

    def _record(self, reason: int, rip, address, size, is_write, data) -> None:
        """``ExitTrace.add`` (its common case inlined: it runs once per exit) plus the single-step check."""
        now = perf_counter_ns()
        records = self._trace_records
        if len(records) < self._trace_limit:
            records.append((reason, rip, address, size, is_write, data, now - self._resumed_ns))
        else:
            self.trace.add(reason, rip, address, size, is_write, data, now - self._resumed_ns)
        self._resumed_ns = now
        if self._single_exit:
            self.stop = True

    def _exit_requested(self, code: int) -> None:
        self.status = Status("exited", code=code)
        self.stop = True

    def _stopped_with(self, status: Status, regs: Regs | None = None) -> None:
        """A device ended the run; ``regs`` are the guest's registers as it should be reported
        (at the fault, or at the trap a monitor handled), not the stub's labkit ran last."""
        self.status = status
        self._stop_regs = regs
        self.stop = True

    # -- the run loop -----------------------------------------------------------

    def run(self, timeout: float, single_exit: bool = False) -> RunResult:
        """Run until the guest stops or ``timeout`` seconds pass; with ``single_exit``, until the next exit.

        A run stopped after one exit by ``single_exit`` has the status ``running``.
        """
        if self.status is not None:
            raise LabkitError(f"the guest has already stopped ({self.status}); create a new Machine to run it again")
        started = time.perf_counter()
        deadline = time.monotonic() + timeout
        self._single_exit = single_exit
        self._resumed_ns = perf_counter_ns()
        while self.status is None:
            self.stop = False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                exit: exits.Exit = exits.Timeout(budget_s=timeout)
            else:
                exit = self.backend.run(self, remaining)
            if isinstance(exit, (exits.Io, exits.Mmio)):
                if single_exit:
                    break
                continue  # a device stopped the run: its status is set
            if isinstance(exit, exits.Timeout):
                exit = exits.Timeout(budget_s=timeout)
            self._record(int(exit.reason), self._rip(), None, None, None, None)
            handled = handle_exit(exit, self.buses)
            if handled.status is not None:
                self.status = self._explain(exit, handled.status)
            elif single_exit:
                break
        return self.result(time.perf_counter() - started)

    def _explain(self, exit: exits.Exit, status: Status) -> Status:
        """Add where it happened to an error status: the instruction KVM could not emulate, say."""
        if status.kind != "error" or not isinstance(exit, (exits.InternalError, exits.EmulatorFailure)):
            return status
        try:
            regs, sregs = self.backend.get_regs(), self.backend.get_sregs()
        except LabkitError:
            return status
        address = sregs.cs.base + regs.rip
        where = f" at rip {regs.rip:#x}: {instruction_at(self.backend.memory, address, self.guest.mode)}"
        return replace(status, message=status.message + where)

    def _rip(self) -> int | None:
        try:
            return self.backend.get_regs().rip
        except LabkitError:
            return None

    def result(self, elapsed_s: float = 0.0) -> RunResult:
        status = self.status or Status("running")
        regs = self._stop_regs if self._stop_regs is not None else self.backend.get_regs()
        summary = self.monitor.summary() if self.monitor is not None else None
        return RunResult(status=status, console=self.console.text(), regs=regs, trace=self.trace,
                         backend=self.backend.kind, elapsed_s=elapsed_s, monitor=summary)

    # -- inspection ---------------------------------------------------------------

    def regs(self) -> Regs:
        return self.backend.get_regs()

    def sregs(self) -> SRegs:
        return self.backend.get_sregs()

    def read_memory(self, address: int, size: int) -> bytes:
        memory = self.backend.memory
        if address < 0 or size < 0 or address + size > len(memory):
            raise ConfigError(f"[{address:#x}, {address + size:#x}) is outside guest RAM (0 to {len(memory):#x})")
        return bytes(memory[address:address + size])

    def describe(self) -> dict[str, str]:
        return self.backend.describe()

    def close(self) -> None:
        self.backend.close()

