"""One guest on one backend with its devices: the run loop.

:class:`MachineCore` is what a backend's ``run`` calls back for every port and
MMIO exit and for interrupts (it implements :class:`labkit.backend.Dispatcher`),
and the loop that runs the backend until the guest stops.  What each returned
exit means is decided in one place, :func:`labkit.vmm.exit_handling.decide`;
this loop only runs the backend, records, and acts on the decision.
:class:`labkit.Machine` drives a core in the calling process, or inside a worker
process (``labkit.vmm.worker``) so that an emulator crash cannot take the
caller down; devices are built here from :class:`DeviceSpec` factories, so they
live wherever the core lives.

A run that ends ``paused``, ``timeout`` or ``running`` (after a step) continues
with another :meth:`MachineCore.run` or :meth:`MachineCore.step` exactly where it
stopped; a run that ended any other way is over.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any, Callable, Sequence

from labkit import exits
from labkit.backend import Backend, create_backend
from labkit.errors import ConfigError, LabkitError, NotModelled, SnapshotError
from labkit.exits import ExitReason
from labkit.memory import GuestMemory
from labkit.snapshot.image import MemoryImage
from labkit.memory import page_runs
from labkit.snapshot.state import SAVED_MSRS, GuestImage, MachineState, PageDiff, Region
from labkit.trace import ExitRecord, ExitTrace
from labkit.vmm.bus import Bus, Buses, PortBus
from labkit.vmm.devices import Console, DebugExit, HypercallPort, Uart16550
from labkit.vmm.devices.spec import DeviceContext, DeviceSpec, no_armed_lines
from labkit.vmm.exit_handling import Action, Situation, decide, paused
from labkit.vmm.fault import FaultReporter
from labkit.vmm.status import Origin, RunResult, Status, StatusKind
from labkit.x86 import layout
from labkit.x86.boot import RFLAGS_IF
from labkit.vmm.devices.timer import PIT_PORT, Pit8254
from labkit.vmm.interrupts import MASTER_PORT, SLAVE_PORT, InterruptController, InterruptLines
from labkit.x86.disasm import instruction_at
from labkit.x86.state import Regs, SRegs

if TYPE_CHECKING:  # lazily imported where used
    from labkit.guest import Guest
    from labkit.kvm.controls import KvmExitControls, MsrHandler
    from labkit.kvm.stats import KvmRunStats
    from labkit.vmm.host_memory import HostMapping
    from labkit.vmm.forwarding import Monitor
    from labkit.x86.boot import BootState

IO = int(ExitReason.IO)
MMIO = int(ExitReason.MMIO)
INTERRUPT = int(ExitReason.INTERRUPT)
RDMSR = int(ExitReason.X86_RDMSR)
WRMSR = int(ExitReason.X86_WRMSR)

LegacyDeviceSpec = tuple[str, int, int, Any]
"""``(bus, base, length, device)``: a device object built by the caller (in-process machines only)."""

WAIT_SLICE_S = 0.005
"""A halted guest waiting for an interrupt checks for a pause this often."""


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one :meth:`MachineCore.step` returns: only the exits recorded since the previous step."""

    records: tuple[ExitRecord, ...]
    status: Status


@dataclass(frozen=True)
class ResultUpdate:
    """A :class:`RunResult` without what the receiver already has: the trace records and console bytes
    past the counts it sent (:meth:`MachineCore.result_update`).  A worker sends this, not the whole
    trace, after every run, so a run's cost does not grow with everything the guest did before."""

    result: RunResult
    """The result with an empty trace and console."""
    new_records: list[tuple]
    new_handling: list[int]
    overflow_counts: dict[int, int]
    overflow_host_ns: dict[int, int]
    overflow_handling_ns: dict[int, int]
    console_tail: bytes

    def apply(self, trace: ExitTrace, console: bytearray) -> RunResult:
        """Bring the receiver's ``trace`` and ``console`` up to date and return the whole result."""
        trace.records.extend(self.new_records)
        trace.handling.extend(self.new_handling)
        trace.overflow_counts = dict(self.overflow_counts)
        trace.overflow_host_ns = dict(self.overflow_host_ns)
        trace.overflow_handling_ns = dict(self.overflow_handling_ns)
        console += self.console_tail
        return replace(self.result, trace=trace, console=console.decode("utf-8", errors="replace"))


class MachineCore:
    """Backend + buses + devices + trace for one guest.

    Not thread-safe, except :meth:`request_pause` and :meth:`kick`, and a
    device's ``raise_irq``/``lower_irq``, which may be called from any thread.
    ``backend`` is a backend name (``"kvm"``, ``"emu"``) or a backend object
    (tests pass a scripted one).
    """

    def __init__(self, guest: Guest, backend: str | Backend, memory_size: int, *,
                 devices: Sequence[DeviceSpec | LegacyDeviceSpec] = (), trace_limit: int | None = None,
                 monitor: Monitor | None = None, interrupts: InterruptLines | None = None,
                 kvm_controls: KvmExitControls | None = None, ram_fd: int | None = None):
        from labkit.x86.boot import boot_state, load_boot_state  # the boot builder pulls in the table builders

        self.guest = guest
        self._ram_shared = ram_fd is not None  # RAM is a file the caller reads too: never remapped here
        self._mapped_images: dict[int, MemoryImage] = {}  # region index -> the snapshot image mapped over it
        if isinstance(backend, str):
            self.backend = create_backend(backend, memory_size, guest.mode, kvm_controls, ram_fd=ram_fd)
        elif kvm_controls is not None:
            raise ConfigError("kvm_controls are applied when the core creates its KVM backend, not to a given one")
        else:
            self.backend = backend
        self.origin = Origin.of(self.backend)
        self.memory = GuestMemory.of(self.backend)
        self.stop = False
        self.status: Status | None = None
        """The latest run's status; ``None`` before the first run."""
        self.trace = ExitTrace() if trace_limit is None else ExitTrace(trace_limit)
        self.console = Console()
        self.buses = Buses(PortBus(), Bus("mmio", layout.MAPPED_LIMIT))
        self.interrupts: InterruptLines = interrupts if interrupts is not None else InterruptController(kick=self.kick)
        self.devices: dict[str, Any] = {}
        """Every device by name: the built-in ones and those given as specs."""
        self._names: dict[int, str] = {}  # id(device) -> name, for error messages
        # Bound once: the hot path runs per exit.
        self._pio_read, self._pio_write = self.buses.pio.read, self.buses.pio.write
        self._trace_records, self._trace_limit = self.trace.records, self.trace.limit
        self._trace_handling = self.trace.handling
        self._stepping = False
        self._step_out: list[tuple] = []
        self._resumed_ns = 0
        self._device_status: Status | None = None
        self._stop_regs: Regs | None = None
        self._pause_requested = False
        self._pause_message = ""
        self._resume_callbacks: list[Callable[[], None]] = []
        self._closing: list[Callable[[], None]] = []  # close() of devices built from specs that have one
        self._halted_waiting = False
        self._carried_vector: int | None = None
        self.monitor = monitor
        self.msr_handlers: dict[int, MsrHandler] = {}
        """The handlers of the MSRs KVM sends to userspace (``KvmExitControls.msrs``), by index."""
        try:
            for user_msr in (kvm_controls.msrs if kvm_controls is not None else ()):
                handler = user_msr.build()
                self.msr_handlers[user_msr.index] = handler
                self.devices[user_msr.name] = handler
            self._attach_devices(devices)
            entry = guest.load_address if guest.entry is None else guest.entry  # Guest fills it in: never None
            boot = boot_state(guest.mode, entry, memory_size, user=guest.user)
            load_boot_state(self.backend, boot, guest.code, guest.load_address, name=f"guest {guest.name!r}")
            if monitor is not None:
                self._attach_monitor(monitor, boot)
        except BaseException:
            self.backend.close()
            raise

    # -- set-up ---------------------------------------------------------------

    def _add(self, name: str, bus: str, base: int, length: int, device: object) -> None:
        if name in self.devices:
            raise ConfigError(f"two devices are named {name!r}")
        if bus not in ("pio", "mmio"):
            raise ConfigError(f"device {name!r}: a device goes on bus 'pio' or 'mmio', not {bus!r}")
        if bus == "mmio" and self.memory.contains(base, 1):
            raise ConfigError(f"MMIO device {name!r} at {base:#x} lies inside guest memory")
        getattr(self.buses, bus).register(base, length, device)
        self.devices[name] = device
        self._names[id(device)] = name

    def _attach_devices(self, extra: Sequence[DeviceSpec | LegacyDeviceSpec]) -> None:
        self.devices["console"] = self.console
        self._add("uart", "pio", layout.COM1_PORT, 8, Uart16550(self.console))
        self._add("debug-exit", "pio", layout.DEBUG_EXIT_PORT, 1, DebugExit(self._exit_requested))
        self.hypercalls = HypercallPort(self.backend.get_regs, self.memory, self.console.extend)
        self._add("hypercall", "pio", layout.HYPERCALL_PORT, 1, self.hypercalls)
        self.faults = FaultReporter(self.guest.mode, self.backend.get_regs, self.backend.get_sregs, self.memory,
                                    self._stopped_with)
        self._add("fault", "pio", layout.FAULT_PORT, 1, self.faults)
        self.pit = None
        if isinstance(self.interrupts, InterruptController):  # a PC's PICs and PIT (not a test's stand-in)
            self._add("pic", "pio", MASTER_PORT, 2, self.interrupts)
            self._add("pic-slave", "pio", SLAVE_PORT, 2, self.interrupts.slave_ports)
            self.pit = Pit8254(self.interrupts)
            self._add("pit", "pio", PIT_PORT, 4, self.pit)
        context = DeviceContext(memory=self.memory, regs=self.backend.get_regs,
                                raise_irq=self.interrupts.raise_irq, lower_irq=self.interrupts.lower_irq,
                                kick=self.kick, set_armed=getattr(self.interrupts, "set_armed", no_armed_lines),
                                console=self.console, device=self._built_device,
                                pause=self.request_pause, on_resume=self._resume_callbacks.append)
        for spec in extra:
            if isinstance(spec, DeviceSpec):
                device = spec.factory(context)
                self._add(spec.name, spec.bus, spec.base, spec.length, device)
                close = getattr(device, "close", None)
                if callable(close):
                    self._closing.append(close)
            elif isinstance(spec, tuple) and len(spec) == 4:
                bus, base, length, device = spec
                self._add(f"{type(device).__name__}@{bus}:{base:#x}", bus, base, length, device)
            else:
                raise ConfigError(f"a device is a labkit.vmm.devices.DeviceSpec, not {type(spec).__name__}")

    def _built_device(self, name: str) -> Any:
        """``DeviceContext.device``: a device already built into this machine."""
        device = self.devices.get(name)
        if device is None:
            raise ConfigError(f"no device named {name!r} is built yet (list its spec first); "
                              f"devices: {', '.join(sorted(self.devices))}")
        return device

    def _attach_monitor(self, monitor: Monitor, boot: BootState) -> None:
        from labkit.vmm import forwarding

        if self.guest.mode != 64:
            raise ConfigError("a monitor runs long-mode (64-bit) guests")
        forwarding.install(self.memory, boot.sregs.idt.base)
        context = forwarding.MonitorContext(self.memory, self._monitor_pio, self._stopped_with)
        self.trap_port = forwarding.TrapPort(monitor, self.backend, context)
        self._add("monitor", "pio", layout.TRAP_PORT, 1, self.trap_port)

    def _monitor_pio(self, port: int, size: int, is_write: bool, value: int) -> int:
        if is_write:
            self.buses.pio.write(port, size, value)
            return 0
        return self.buses.pio.read(port, size)

    # -- the Dispatcher the backend calls (hot path) ---------------------------

    def pio(self, port: int, size: int, is_write: bool, value: int, rip: int) -> int:
        started = perf_counter_ns()
        try:
            if is_write:
                self._pio_write(port, size, value)
            else:
                value = self._pio_read(port, size)
        except Exception as error:  # noqa: BLE001 - a device's bug ends the run, the same on every backend
            self._device_failed(self.buses.pio, "port", port, is_write, rip, error)
        self._record(IO, rip, port, size, is_write, value, started)
        return value

    def mmio(self, address: int, size: int, is_write: bool, value: int, rip: int) -> int:
        started = perf_counter_ns()
        try:
            if is_write:
                self.buses.mmio.write(address, size, value)
            else:
                value = self.buses.mmio.read(address, size)
        except Exception as error:  # noqa: BLE001
            self._device_failed(self.buses.mmio, "MMIO address", address, is_write, rip, error)
        self._record(MMIO, rip, address, size, is_write, value, started)
        # Never stop inside an MMIO access for a step or a pause: the emulator cannot finish the
        # instruction after such a stop and would run it (and the access) again.  A step ends at
        # the next exit instead; a pause comes through kick().  Only a device's status stops here.
        self.stop = self._device_status is not None
        return value

    def msr(self, index: int, is_write: bool, value: int, rip: int) -> int | None:
        """An ``rdmsr``/``wrmsr`` KVM sent to userspace (``KVM_EXIT_X86_RDMSR``/``WRMSR``): its handler answers.

        Returns the value read, or for a write 0; ``None`` makes KVM raise #GP in the
        guest (the handler refused, or no handler: as the CPU does for an unknown MSR).
        Recorded in the trace under ``X86_RDMSR``/``X86_WRMSR`` with the MSR index as
        the address.
        """
        started = perf_counter_ns()
        handler = self.msr_handlers.get(index)
        answer: int | None = None
        try:
            if handler is not None:
                if is_write:
                    answer = 0 if handler.write(value) else None
                else:
                    answer = handler.read()
        except Exception as error:  # noqa: BLE001 - a handler's bug ends the run, as a device's does
            self._device_failed_named(f"msr {index:#x}", "MSR", index, is_write, rip, error)
        self._record(WRMSR if is_write else RDMSR, rip, index, 8, is_write,
                     value if is_write else (answer if answer is not None else None), started)
        return answer

    def kernel_write(self, pio: bool, address: int, size: int, value: int) -> None:
        """A guest write KVM handled in the kernel (coalesced ring, ioeventfd), delivered to the device now.

        Not an exit, so not in the trace (``RunResult.kvm_stats.delivered`` counts them);
        the device sees it as the same write on its bus.
        """
        bus = self.buses.pio if pio else self.buses.mmio
        try:
            bus.write(address, size, value)
        except Exception as error:  # noqa: BLE001 - a device's bug ends the run, as on an exit
            hit = bus.find(address)
            name = self._names.get(id(hit[1]), type(hit[1]).__name__) if hit else "?"
            what = "port" if pio else "MMIO address"
            message = (f"device {name!r} failed on a write to {what} {address:#x} that KVM kept in the kernel "
                       f"(coalesced ring or ioeventfd), delivered at the next exit: {type(error).__name__}: {error}")
            if self._device_status is None:
                self._device_status = Status(StatusKind.ERROR, message=message, device=name)
            self.stop = True

    def _device_failed_named(self, name: str, what: str, address: int, is_write: bool, rip: int,
                             error: Exception) -> None:
        access = "write to" if is_write else "read of"
        message = (f"device {name!r} failed on a {access} {what} {address:#x} at guest rip {rip:#x}: "
                   f"{type(error).__name__}: {error}")
        if self._device_status is None:
            self._device_status = Status(StatusKind.ERROR, message=message, device=name)
        self.stop = True

    @property
    def interrupt_pending(self) -> bool:
        return self._carried_vector is not None or self.interrupts.interrupt_pending

    def pending_vector(self) -> int | None:
        if self._carried_vector is not None:
            return self._carried_vector
        return self.interrupts.pending_vector()

    def acknowledge_interrupt(self, vector: int) -> None:
        """The backend delivered ``vector`` to the guest: the controller is told, and the trace records it.

        A vector carried over from a snapshot (acknowledged at the controller before it was taken) is
        only handed over: the controller and the trace saw it already.
        """
        if self._carried_vector is not None and vector == self._carried_vector:
            self._carried_vector = None
            return
        started = perf_counter_ns()
        self.interrupts.acknowledge_interrupt(vector)
        self._record(INTERRUPT, None, None, None, None, vector, started)

    def _record(self, reason: int, rip: int | None, address: int | None, size: int | None,
                is_write: bool | None, data: int | None, started_ns: int) -> None:
        """``ExitTrace.add`` (its common case inlined: it runs once per exit) plus the step's own copy.

        ``started_ns`` is when the backend handed the exit to labkit: the record's handling time runs from it.
        """
        now = perf_counter_ns()
        record = (reason, rip, address, size, is_write, data, now - self._resumed_ns)
        records = self._trace_records
        if len(records) < self._trace_limit:
            records.append(record)
            self._trace_handling.append(now - started_ns)
        else:
            self.trace.add(*record, now - started_ns)
        self._resumed_ns = now
        if self._stepping:
            self._step_out.append(record)
            self.stop = True
        elif self._pause_requested:  # a pause that came between the loop's check and this exit
            self.stop = True

    def _exit_requested(self, code: int) -> None:
        self._device_status = Status(StatusKind.EXITED, code=code)
        self.stop = True

    def _stopped_with(self, status: Status, regs: Regs | None = None) -> None:
        """A device ended the run; ``regs`` are the guest's registers as it should be reported
        (at the fault, or at the trap a monitor handled), not the stub's labkit ran last."""
        self._device_status = status
        self._stop_regs = regs
        self.stop = True

    def _device_failed(self, bus: Bus, what: str, address: int, is_write: bool, rip: int,
                       error: Exception) -> None:
        hit = bus.find(address)
        name = self._names.get(id(hit[1]), type(hit[1]).__name__) if hit else "?"
        access = "write to" if is_write else "read of"
        if isinstance(error, NotModelled):  # the guest's doing: the run ends, nothing is raised
            message = (f"the guest's {access} {what} {address:#x} at rip {rip:#x} asked device {name!r} "
                       f"for what it does not model: {error}")
            status = Status(StatusKind.ERROR, message=message)
        else:
            message = (f"device {name!r} failed on a {access} {what} {address:#x} at guest rip {rip:#x}: "
                       f"{type(error).__name__}: {error}")
            status = Status(StatusKind.ERROR, message=message, device=name)
        if self._device_status is None:
            self._device_status = status
        self.stop = True

    # -- control from other threads ---------------------------------------------------

    def kick(self) -> None:
        """Make a run in progress leave the guest at the next instruction boundary (any thread)."""
        self.backend.kick()

    def request_pause(self, message: str = "") -> None:
        """Make the run in progress (or else the next one) return with status ``paused`` (any thread).

        ``message`` is the status's message: why a device paused the machine (``DeviceContext.pause``).
        """
        if message:
            self._pause_message = message
        self._pause_requested = True
        self.stop = True
        self.kick()

    # -- the run loop -----------------------------------------------------------

    def run(self, timeout: float, single_exit: bool = False) -> RunResult:
        """Run until the guest stops, a pause, or ``timeout`` seconds pass; with ``single_exit``, one step.

        A run that returned ``paused``, ``timeout`` or ``running`` continues from where it
        stopped; any other status is final and running again raises :class:`LabkitError`.
        """
        started = time.perf_counter()
        self._run(timeout, single_exit, timeout)
        return self.result(time.perf_counter() - started)

    def run_update(self, timeout: float, records_seen: int, console_seen: int) -> ResultUpdate:
        """:meth:`run`, returning only what the caller does not have yet (see :class:`ResultUpdate`)."""
        started = time.perf_counter()
        self._run(timeout, False, timeout)
        return self.result_update(records_seen, console_seen, time.perf_counter() - started)

    def result_update(self, records_seen: int, console_seen: int, elapsed_s: float = 0.0) -> ResultUpdate:
        """The current result as a :class:`ResultUpdate` for a caller holding ``records_seen`` trace
        records and ``console_seen`` console bytes."""
        whole = self.result(elapsed_s)
        trace = self.trace
        return ResultUpdate(replace(whole, trace=ExitTrace(0), console=""),
                            trace.records[records_seen:], trace.handling[records_seen:], trace.overflow_counts,
                            trace.overflow_host_ns, trace.overflow_handling_ns,
                            self.console.since(console_seen))

    def step(self, timeout: float, budget: float | None = None) -> StepResult:
        """Run to the next exit(s); return only the exits recorded by this step, and the status.

        A step ends after the first recorded exit, except that it does not stop
        inside an MMIO access (see :meth:`mmio`): then it ends at the exit after.
        ``budget`` is what a timeout's message names (the whole stepped run's budget).
        """
        seq = len(self.trace)
        self._step_out = []
        self._run(timeout, True, timeout if budget is None else budget)
        out, self._step_out = self._step_out, []
        records = tuple(ExitTrace.record_of(seq + index, *raw) for index, raw in enumerate(out))
        return StepResult(records, self.status or Status(StatusKind.RUNNING))

    def _run(self, timeout: float, stepping: bool, budget: float) -> None:
        if self.status is not None and not self.status.kind.resumable:
            raise LabkitError(f"the guest has already stopped ({self.status}); it cannot run again")
        deadline = time.monotonic() + timeout
        self._stepping = stepping
        self._stop_regs = None
        self._resumed_ns = perf_counter_ns()
        status: Status | None = None
        callbacks, self._resume_callbacks[:] = list(self._resume_callbacks), []
        for callback in callbacks:  # devices retry what stopped them (DeviceContext.on_resume) before the guest runs
            callback()
        try:
            while status is None:
                if self._pause_requested:
                    status = paused(self._pause_message)
                    break
                remaining = deadline - time.monotonic()
                if self._halted_waiting and self._carried_vector is not None:
                    self._halted_waiting = False  # an interrupt carried over from a snapshot wakes the HLT
                if self._halted_waiting:
                    status = self._wait_for_interrupt(remaining, budget)
                    continue
                self.stop = self._pause_requested
                if remaining <= 0:
                    exit: exits.Exit = exits.Timeout(budget_s=budget)
                else:
                    exit = self.backend.run(self, remaining)
                    if isinstance(exit, exits.Timeout):
                        exit = exits.Timeout(budget_s=budget)
                returned_ns = perf_counter_ns()  # the backend handed the exit over: labkit's handling starts
                decision = decide(exit, Situation(
                    device_status=self._device_status, pause_requested=self._pause_requested,
                    pause_message=self._pause_message, stepping=stepping and bool(self._step_out),
                    halt_can_wait=self._halt_can_wait, where=self._where))
                if decision.record:
                    self._record(int(exit.reason), self._rip(), None, None, None, None, returned_ns)
                if decision.action is Action.WAIT:
                    self._halted_waiting = True
                    if stepping:
                        status = Status(StatusKind.RUNNING)
                elif decision.action is Action.STOP:
                    status = decision.status
                elif stepping and self._step_out:
                    status = Status(StatusKind.RUNNING)
        finally:
            self._stepping = False
        if status.kind is StatusKind.PAUSED or not status.kind.resumable:
            self._pause_message = ""
            self._pause_requested = False  # consumed (a pause that lands in a step's end waits for the next)
        self.status = status

    def _wait_for_interrupt(self, remaining: float, budget: float) -> Status | None:
        """A HLT with interrupts enabled: wait (in slices, so a pause is seen) until a line rises."""
        if remaining <= 0:
            self._record(int(ExitReason.TIMEOUT), self._rip(), None, None, None, None, perf_counter_ns())
            return Status(StatusKind.TIMEOUT, message=f"the guest did not stop within its {budget:g} s budget")
        if self.interrupts.wait(min(remaining, WAIT_SLICE_S)):
            self._halted_waiting = False
        elif not self.interrupts.armed:  # the source went away while the guest waited: it halts for good
            self._halted_waiting = False
            return Status(StatusKind.HALTED)
        return None

    def _halt_can_wait(self) -> bool:
        return bool(self.interrupts.armed) and bool(self.backend.get_regs().rflags & RFLAGS_IF)

    def _where(self) -> str:
        """`` at rip 0x...: <instruction>`` for an error message, or ``""`` if the registers cannot be read."""
        try:
            regs, sregs = self.backend.get_regs(), self.backend.get_sregs()
        except LabkitError:
            return ""
        return f" at rip {regs.rip:#x}: {instruction_at(self.memory, sregs.cs.base + regs.rip, self.guest.mode)}"

    def _rip(self) -> int | None:
        try:
            return self.backend.get_regs().rip
        except LabkitError:
            return None

    def result(self, elapsed_s: float = 0.0) -> RunResult:
        status = self.status or Status(StatusKind.RUNNING)
        regs = self._stop_regs if self._stop_regs is not None else self.backend.get_regs()
        summary = self.monitor.summary() if self.monitor is not None else None
        return RunResult(status=status, console=self.console.text(), regs=regs, trace=self.trace,
                         backend=self.backend.kind, elapsed_s=elapsed_s, monitor=summary, origin=self.origin,
                         console_dropped=self.console.dropped, kvm_stats=self.kvm_stats_or_none())

    def kvm_stats_or_none(self) -> KvmRunStats | None:
        """The KVM backend's :meth:`~labkit.kvm.KvmBackend.run_stats`; ``None`` on any other backend."""
        run_stats = getattr(self.backend, "run_stats", None)
        return run_stats() if run_stats is not None else None

    def host_mappings(self) -> tuple[HostMapping, ...]:
        """Each memory region's host mapping, in the process that runs this core (:mod:`labkit.vmm.host_memory`)."""
        from labkit.vmm.host_memory import host_mappings

        return host_mappings(self.backend.regions())

    def kvm_stats(self) -> KvmRunStats:
        """The vCPU's counters beside the exits labkit saw; :class:`ConfigError` off KVM."""
        stats = self.kvm_stats_or_none()
        if stats is None:
            raise ConfigError(f"KVM's vCPU counters (binary stats fd, KVM_GET_STATS_FD) exist only on KVM; "
                              f"this machine runs on {self.backend.kind!r}, which has no such counters")
        return stats

    # -- inspection ---------------------------------------------------------------

    def regs(self) -> Regs:
        return self.backend.get_regs()

    def sregs(self) -> SRegs:
        return self.backend.get_sregs()

    def read_memory(self, address: int, size: int) -> bytes:
        return self.memory.read(address, size)

    def write_memory(self, address: int, data: bytes) -> None:
        self.memory.write(address, data)

    def device_state(self, name: str) -> Any:
        """The named device's ``save()``: plain data."""
        device = self.devices.get(name)
        if device is None:
            raise ConfigError(f"no device is named {name!r}; devices: {', '.join(sorted(self.devices))}")
        save = getattr(device, "save", None)
        if save is None:
            raise ConfigError(f"device {name!r} ({type(device).__name__}) has no save()")
        return save()

    def describe(self) -> dict[str, str]:
        return self.backend.describe()

    # -- snapshots ------------------------------------------------------------------

    def capture_state(self, memory: bool = True, shared_ram: bool = False) -> MachineState:
        """Everything the stopped vCPU, its memory and its devices are (:class:`labkit.snapshot.state.MachineState`).

        Call between runs.  With ``memory=False`` the regions' bytes are left out (a diff
        snapshot takes only the written pages: :meth:`written_pages_data`); with ``shared_ram`` only RAM's
        (the caller reads them from the RAM's memfd itself).  A machine with a monitor is refused: the monitor's own state (the
        kernel's virtual CPU, translations) lives outside the VM and is not saved.
        """
        if self.monitor is not None:
            raise SnapshotError(f"a machine with a monitor ({type(self.monitor).__name__}) cannot be snapshotted: "
                                "the monitor's state lives outside the VM and is not saved")
        devices = {}
        for name, device in self.devices.items():
            save = getattr(device, "save", None)
            if save is None or not callable(getattr(device, "restore", None)):
                if device is getattr(self.interrupts, "slave_ports", None):
                    continue  # the slave 8259A's state is part of the "pic" device's
                raise SnapshotError(f"device {name!r} ({type(device).__name__}) has no save()/restore(): "
                                    "it cannot be snapshotted")
            devices[name] = save()
        guest = self.guest
        regs = self._stop_regs if self._stop_regs is not None else self.backend.get_regs()
        return MachineState(
            guest=GuestImage(guest.name, guest.mode, guest.load_address, guest.entry or guest.load_address,
                             guest.user, guest.code),
            memory_size=self.memory.ram_size, taken_on={"backend": self.origin.backend, "flavour": self.origin.flavour,
                                                        "unicorn": self.origin.unicorn, "labkit": self.origin.labkit},
            regs=regs, sregs=self.backend.get_sregs(), msrs=self.backend.get_msrs(SAVED_MSRS),
            fpu=self.backend.get_fpu(), debug=self.backend.get_debug_regs(), devices=devices,
            regions=tuple(Region(address, len(view), read_only,
                                 MemoryImage.copy_of_memory(view, self._mapped_images.get(index))
                                 if memory and not (shared_ram and index == 0)
                                 else b"")
                          for index, (address, view, read_only) in enumerate(self.backend.regions())),
            status=self.status,
            halted_waiting=self._halted_waiting,
            pending_interrupt=self._carried_vector if self._carried_vector is not None
            else self.backend.pending_interrupt())

    def restore_state(self, state: MachineState, ram_in_place: bool = False) -> None:
        """Make this (new, not yet run) machine the one ``state`` was captured from: memory, vCPU, devices.

        The next :meth:`run` continues the guest where the captured one stopped.  With
        ``ram_in_place`` the state's RAM (region 0) is left out and the caller writes it into the RAM's
        memfd once this has returned.
        """
        if self.status is not None:
            raise SnapshotError("restore into a machine that has not run yet (create a new one)")
        ours = [(address, len(view), read_only) for address, view, read_only in self.backend.regions()]
        if not (state.has_memory or ram_in_place and all(len(r.data) == r.size for r in state.regions[1:])):
            raise SnapshotError("this state has no memory (a diff snapshot's): restore its full state")
        theirs = state.layout()
        for address, size, read_only in theirs[len(ours):]:
            self.backend.add_memory_region(address, size, read_only=read_only)
        if [(a, n, r) for a, n, r in theirs[:len(ours)]] != ours:
            raise SnapshotError(f"the snapshot's memory layout {theirs} does not fit this machine's {ours}")
        missing = sorted(set(state.devices) - set(self.devices))
        if missing:
            raise SnapshotError(f"the snapshot has state for devices this machine lacks: {', '.join(missing)} "
                                "(give the same DeviceSpecs as the machine it was taken of)")
        for index, ((_, view, _), region) in enumerate(zip(self.backend.regions(), state.regions)):
            if ram_in_place and index == 0:
                continue
            if isinstance(region.data, MemoryImage) and region.data.can_map_over(view) \
                    and not (self._ram_shared and index == 0):
                region.data.map_private_over(view)  # copy-on-write: no copy now, one per page the guest writes
                self._mapped_images[index] = region.data  # what the pages not written since hold
            else:
                view[:] = region.data
        self.backend.set_sregs(state.sregs)
        self.backend.set_msrs(state.msrs)
        self.backend.set_regs(state.regs)
        self.backend.set_fpu(state.fpu)
        self.backend.set_debug_regs(state.debug)
        for name, device_state in state.devices.items():
            try:
                self.devices[name].restore(device_state)
            except (KeyError, TypeError, ValueError) as error:
                raise SnapshotError(f"device {name!r} cannot take the snapshot's state: {error}") from None
        if state.status is not None and not isinstance(state.status, Status):
            raise SnapshotError(f"the snapshot's run status is a {type(state.status).__name__}, not a Status")
        if state.status is not None and not state.status.kind.resumable:
            self.status = state.status  # a finished guest stays finished
        self._halted_waiting = state.halted_waiting
        self._carried_vector = state.pending_interrupt

    def start_page_tracking(self) -> None:
        """Count the pages written from now on: by the guest (the backend's dirty log) and by the host."""
        self.backend.dirty_log_start()
        self.backend.dirty_log_fetch()
        self.memory.track_writes(True)

    def take_written_pages(self) -> list[int]:
        """Pages written since tracking started or the last take (the guest's and the host's), sorted."""
        guest, host = self.backend.dirty_log_fetch(), self.memory.take_written()
        return sorted(set(guest) | host) if host else sorted(guest)  # already ascending: a linear check

    def written_pages_data(self) -> PageDiff:
        """The pages written since tracking started or the last take, with their bytes now (copied into a
        :class:`MemoryImage`, one ``pwrite`` per run of consecutive pages)."""
        pages = self.take_written_pages()
        breaks = [edge >> 12 for address, view, _ in self.backend.regions() for edge in (address, address + len(view))]
        parts = [self.memory.peek(first << 12, count << 12) for first, count in page_runs(pages, breaks)]
        return PageDiff(tuple(pages), MemoryImage.concatenation(parts) if parts else b"")

    def capture_diff(self) -> tuple[MachineState, PageDiff]:
        """:meth:`capture_state` without memory and :meth:`written_pages_data`: a diff snapshot's two halves."""
        return self.capture_state(False), self.written_pages_data()

    def capture_diff_pages(self) -> tuple[MachineState, list[int]]:
        """:meth:`capture_state` without memory and :meth:`take_written_pages`, in one call (one round trip to
        a worker, whose caller reads the pages from the RAM's memfd itself)."""
        return self.capture_state(False), self.take_written_pages()

    def stop_page_tracking(self) -> None:
        self.memory.track_writes(False)
        self.backend.dirty_log_stop()

    def close(self) -> None:
        if self.pit is not None:
            self.pit.close()
        for close in self._closing:  # a disk's file and lock go with the machine
            close()
        self.backend.close()
