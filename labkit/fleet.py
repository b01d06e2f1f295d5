"""Many VMs at once: :func:`run_many` starts machines concurrently and yields each one's outcome as it ends.

    >>> from labkit.fleet import VmSpec, run_many
    >>> specs = [VmSpec(f"vm{i}", "hello64", backend="emu") for i in range(4)]
    >>> sorted(outcome.status.value for outcome in run_many(specs))
    ['halted', 'halted', 'halted', 'halted']

Each VM is a :class:`labkit.Machine` of its own: its own guest, RAM, devices,
console and trace, nothing shared with the others.  How they run at once:

- **KVM**: one host thread per VM, which is one thread per vCPU (every labkit VM
  has one vCPU), all in the calling process.  ``KVM_RUN`` is a ctypes call through
  ``ctypes.CDLL``, which releases the GIL for the call, so the vCPU threads run
  guest code in parallel on every core (``benchmarks/bench_fleet.py`` measures it).
  Each VM's RAM is its own anonymous host mapping, each VM its own KVM VM fd.
- **Emulation**: one forked worker process per VM (``labkit.vmm.worker``), so an
  emulator crash takes down that VM only; the caller's thread for the VM only
  waits on the worker's socket.

Bounds, so one guest cannot exhaust the host: every VM's console keeps at most
``Console.capacity`` bytes (1 MiB; later bytes are counted in
``RunResult.console_dropped``, :attr:`VmOutcome.console_dropped`), and its trace keeps
at most ``VmSpec.trace_limit`` records (:data:`TRACE_LIMIT`; later exits are only
counted per reason, :attr:`VmOutcome.trace_dropped`), so a result is small enough to
arrive within the timeout even with 16 workers sharing 2 cores.  The number of
VMs, each VM's RAM and the RAM of all VMs running at once are capped by
:class:`FleetLimits`; going over raises :class:`labkit.errors.LimitError` naming the
limit and how to raise it, before any VM starts.

Lifetimes: every VM is closed (fds, mappings, its worker process) as soon as it
ends.  When the caller stops iterating early or is interrupted (``KeyboardInterrupt``
in the middle of the run), every running VM is paused, every runner thread joined and
every machine closed before the exception goes on; VMs not started are not started.
:class:`Fleet` is the same run with a live status view for a notebook
(:meth:`Fleet.statuses`), which is safe to read from another thread.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Iterator, Sequence

from labkit.backend import choose_backend
from labkit.errors import ConfigError, DeviceError, LabkitError, LimitError
from labkit.vmm.devices.spec import DeviceSpec
from labkit.vmm.machine import check_timeout
from labkit.vmm.status import RunResult, StatusKind
from labkit.x86 import layout

if TYPE_CHECKING:
    from labkit.guest import Guest
    from labkit.vmm.machine import Machine

TRACE_LIMIT = 4096
"""Trace records each fleet VM keeps (exits after that are counted per reason only)."""
PARAMETERS_ADDRESS = 0x80000
"""Where :attr:`VmSpec.parameters` are written before the run (the shipped guests' parameter block)."""
DEFAULT_TIMEOUT_S = 5.0
MiB = 1 << 20


@dataclass(frozen=True)
class FleetLimits:
    """What one :func:`run_many` may use; pass ``limits=FleetLimits(...)`` to raise a limit.

    ``max_vms``: VMs in one call; ``max_parallel``: VMs running at once;
    ``memory_per_vm``: one VM's guest RAM (bytes); ``memory_total``: the guest RAM of
    all VMs that may run at once (the ``max_parallel`` largest), in bytes.  Guest RAM
    is reserved up front on both backends (a KVM memory slot, the emulator's mapping)
    and touched as the guest uses it.
    """

    max_vms: int = 256
    max_parallel: int = 64
    memory_per_vm: int = 256 * MiB
    memory_total: int = 2048 * MiB

    def __post_init__(self) -> None:
        for name in ("max_vms", "max_parallel", "memory_per_vm", "memory_total"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"FleetLimits.{name} must be a positive integer, not {value!r}")


@dataclass(frozen=True)
class VmSpec:
    """One VM of a fleet: its name (unique in the fleet), guest and machine settings.

    ``guest`` is a :class:`labkit.Guest` or a shipped guest's name; ``devices`` are
    :class:`~labkit.vmm.devices.DeviceSpec` entries (built where the guest runs);
    ``parameters`` are written to guest RAM at :data:`PARAMETERS_ADDRESS` before the
    run (a guest's parameter block); ``timeout`` (seconds) overrides the fleet's.
    """

    name: str
    guest: Guest | str
    backend: str = "auto"
    memory: int = layout.DEFAULT_MEMORY
    devices: tuple[DeviceSpec, ...] = ()
    parameters: bytes = b""
    timeout: float | None = None
    trace_limit: int = TRACE_LIMIT

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"a VmSpec needs a non-empty name, not {self.name!r}")
        object.__setattr__(self, "devices", tuple(self.devices))
        for device in self.devices:
            if not isinstance(device, DeviceSpec):
                raise ConfigError(f"VmSpec {self.name!r}: devices must be labkit.vmm.devices.DeviceSpec "
                                  f"entries, not {type(device).__name__}")
        if not isinstance(self.parameters, (bytes, bytearray)):
            raise ConfigError(f"VmSpec {self.name!r}: parameters must be bytes, not {type(self.parameters).__name__}")
        object.__setattr__(self, "parameters", bytes(self.parameters))
        if self.timeout is not None:
            object.__setattr__(self, "timeout", check_timeout(self.timeout))
        if isinstance(self.trace_limit, bool) or not isinstance(self.trace_limit, int) or self.trace_limit < 0:
            raise ConfigError(f"VmSpec {self.name!r}: trace_limit must be a count >= 0, not {self.trace_limit!r}")
        layout.check_memory_size(self.memory)


class VmState(str, Enum):
    """Where a fleet VM is: waiting for a slot, being created, running, or how it ended.

    The ended states are the run's :class:`~labkit.vmm.status.StatusKind` (halted,
    exited, shutdown, fault, timeout, error, paused), so a status grid colours by one enum.
    """

    WAITING = "waiting"
    STARTING = "starting"
    RUNNING = "running"
    HALTED = "halted"
    EXITED = "exited"
    SHUTDOWN = "shutdown"
    FAULT = "fault"
    TIMEOUT = "timeout"
    ERROR = "error"
    PAUSED = "paused"
    """Stopped by :meth:`Fleet.stop` or an interrupt of the caller while running."""
    NOT_RUN = "not run"
    """Never started: the fleet was stopped or interrupted first."""

    @property
    def ended(self) -> bool:
        return self not in (VmState.WAITING, VmState.STARTING, VmState.RUNNING)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class VmOutcome:
    """How one fleet VM ended.

    ``status`` is the run's status kind (``StatusKind.ERROR`` when the machine could
    not even be made: then ``result`` is ``None`` and ``error`` says why); ``error``
    is ``""`` unless something went wrong outside the guest.  ``started_s`` and
    ``ended_s`` are seconds since the fleet started: from just before ``Machine.run``
    to its return (creating the machine is before ``started_s``, from ``created_s``).
    """

    name: str
    result: RunResult | None
    status: StatusKind
    error: str
    started_s: float
    ended_s: float
    backend: str
    created_s: float = 0.0

    @property
    def reason(self) -> str:
        """One line saying how it ended: the run's status (``fault: #UD ... at rip ...``) or the error."""
        if self.error:
            return self.error
        return str(self.result.status) if self.result is not None else str(self.status)

    @property
    def console(self) -> str:
        return self.result.console if self.result is not None else ""

    @property
    def console_dropped(self) -> int:
        """Console bytes past the console's bound (not kept)."""
        return self.result.console_dropped if self.result is not None else 0

    @property
    def trace_dropped(self) -> int:
        """Exits past the trace's bound: counted per reason in the trace, not kept as records."""
        return sum(self.result.trace.overflow_counts.values()) if self.result is not None else 0

    @property
    def run_s(self) -> float:
        return self.ended_s - self.started_s


@dataclass(frozen=True)
class VmStatus:
    """One row of :meth:`Fleet.statuses`: a VM's state now and, once it ended, why."""

    name: str
    state: VmState
    backend: str
    reason: str = ""
    started_s: float | None = None
    ended_s: float | None = None


@dataclass
class _Slot:
    spec: VmSpec
    backend: str
    timeout: float
    state: VmState = VmState.WAITING
    machine: Machine | None = None
    outcome: VmOutcome | None = None
    thread: threading.Thread | None = None
    created_s: float | None = None
    started_s: float | None = None


def _mib(size: int) -> str:
    return f"{size / MiB:g} MiB"


class Fleet:
    """Many VMs run at once (see the module docstring); :meth:`run` yields their outcomes as they end.

    Everything is checked here, before any VM starts: unique names, each guest and
    backend, and the :class:`FleetLimits`.  ``max_parallel`` (default: all of them, up
    to ``limits.max_parallel``) VMs run at once; ``timeout`` is each VM's run budget
    unless its :class:`VmSpec` sets one.
    """

    def __init__(self, specs: Sequence[VmSpec], *, max_parallel: int | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, limits: FleetLimits | None = None):
        from labkit.guest import Guest

        limits = FleetLimits() if limits is None else limits
        if not isinstance(limits, FleetLimits):
            raise ConfigError(f"limits must be a labkit.fleet.FleetLimits, not {limits!r:.60}")
        specs = list(specs)
        for spec in specs:
            if not isinstance(spec, VmSpec):
                raise ConfigError(f"run_many takes labkit.fleet.VmSpec entries, not {type(spec).__name__}")
        if not specs:
            raise ConfigError("run_many needs at least one VmSpec")
        if len(specs) > limits.max_vms:
            raise LimitError(f"{len(specs)} VMs are more than the fleet's limit of {limits.max_vms} "
                             f"(FleetLimits.max_vms); raise it with limits=FleetLimits(max_vms={len(specs)})")
        names = [spec.name for spec in specs]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError(f"VM names must be unique in a fleet; repeated: {', '.join(duplicates)}")
        timeout = check_timeout(timeout)
        if max_parallel is None:
            max_parallel = min(len(specs), limits.max_parallel)
        if isinstance(max_parallel, bool) or not isinstance(max_parallel, int) or max_parallel < 1:
            raise ConfigError(f"max_parallel must be a positive integer, not {max_parallel!r}")
        if max_parallel > limits.max_parallel:
            raise LimitError(f"max_parallel={max_parallel} is more VMs at once than the fleet's limit of "
                             f"{limits.max_parallel} (FleetLimits.max_parallel); raise it with "
                             f"limits=FleetLimits(max_parallel={max_parallel})")
        for spec in specs:
            if spec.memory > limits.memory_per_vm:
                raise LimitError(f"VM {spec.name!r} asks for {_mib(spec.memory)} of RAM, more than the fleet's "
                                 f"limit of {_mib(limits.memory_per_vm)} per VM (FleetLimits.memory_per_vm); "
                                 f"raise it with limits=FleetLimits(memory_per_vm={spec.memory})")
        at_once = sum(sorted((spec.memory for spec in specs), reverse=True)[:max_parallel])
        if at_once > limits.memory_total:
            raise LimitError(f"{min(max_parallel, len(specs))} VMs at once may need {_mib(at_once)} of RAM, more "
                             f"than the fleet's total of {_mib(limits.memory_total)} (FleetLimits.memory_total); "
                             f"lower max_parallel or raise it with limits=FleetLimits(memory_total={at_once})")
        self._slots: list[_Slot] = []
        for spec in specs:
            if isinstance(spec.guest, str):
                Guest.named(spec.guest)  # a ConfigError for an unknown name now, not in a VM's thread
            elif not isinstance(spec.guest, Guest):
                raise ConfigError(f"VmSpec {spec.name!r}: guest must be a labkit.Guest or a shipped guest's "
                                  f"name, not {type(spec.guest).__name__}")
            choice = choose_backend(spec.backend)
            self._slots.append(_Slot(spec, choice.name, spec.timeout if spec.timeout is not None else timeout))
        if any(slot.backend == "emu" for slot in self._slots):
            from labkit.emu import prepare

            prepare()  # once, here: every worker forked later inherits it (16 threads must not race on it)
        self.max_parallel = max_parallel
        self.limits = limits
        self._lock = threading.Lock()
        self._stopping = False
        self._started = False
        self._t0 = time.monotonic()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self._shut_down()

    # --- the live view ------------------------------------------------------------------------

    def statuses(self) -> list[VmStatus]:
        """Every VM's state now (in the order of the specs); safe to call from any thread while it runs."""
        with self._lock:
            rows = []
            for slot in self._slots:
                outcome = slot.outcome
                rows.append(VmStatus(slot.spec.name, slot.state, slot.backend,
                                     outcome.reason if outcome is not None else "",
                                     slot.started_s, outcome.ended_s if outcome is not None else None))
            return rows

    def outcomes(self) -> list[VmOutcome]:
        """The outcomes so far, in the order of the specs."""
        with self._lock:
            return [slot.outcome for slot in self._slots if slot.outcome is not None]

    def stop(self) -> None:
        """Start no more VMs and pause the running ones (their outcome: ``paused``); any thread."""
        with self._lock:
            self._stopping = True
            running = [slot.machine for slot in self._slots if slot.machine is not None]
        for machine in running:
            try:
                machine.pause()
            except LabkitError:  # it ended or its worker died meanwhile: nothing left to pause
                pass

    def _now(self) -> float:
        return time.monotonic() - self._t0

    # --- running ------------------------------------------------------------------------------

    def run(self) -> Iterator[VmOutcome]:
        """Run the fleet, yielding each VM's :class:`VmOutcome` as it ends; can be iterated once.

        Stopping the iteration early, or an exception (``KeyboardInterrupt``) in the
        caller while it waits, stops the fleet: running VMs are paused, every machine is
        closed and every runner thread joined before the iteration ends.
        """
        with self._lock:
            if self._started:
                raise ConfigError("a Fleet runs once; make a new one to run the VMs again")
            self._started = True
        self._t0 = time.monotonic()
        ended: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        waiting = list(self._slots)
        running = 0
        yielded = 0
        try:
            while yielded < len(self._slots):
                while waiting and running < self.max_parallel and not self._stopping:
                    slot = waiting.pop(0)
                    slot.thread = threading.Thread(target=self._run_one, args=(slot, ended), daemon=True,
                                                   name=f"labkit-fleet-{slot.spec.name}")
                    slot.state = VmState.STARTING
                    running += 1
                    slot.thread.start()
                if self._stopping and waiting:
                    with self._lock:
                        for slot in waiting:
                            slot.state = VmState.NOT_RUN
                            slot.outcome = VmOutcome(slot.spec.name, None, StatusKind.ERROR,
                                                     "not run: the fleet was stopped first",
                                                     self._now(), self._now(), slot.backend)
                            ended.put(slot)
                    waiting = []
                # Short waits, so an interrupt is taken at once.  (No `continue` in the `except`: CPython
                # 3.11 raises a KeyboardInterrupt that lands on that jump outside this `try`, skipping
                # the `finally` below; measured.)
                finished = self._next_ended(ended)
                if finished is not None:
                    if finished.thread is not None:
                        finished.thread.join()
                        running -= 1
                    yielded += 1
                    if finished.outcome is not None:  # always set before the slot is queued
                        yield finished.outcome
        finally:
            self._shut_down()

    @staticmethod
    def _next_ended(ended: queue.SimpleQueue[_Slot]) -> _Slot | None:
        try:
            return ended.get(timeout=0.1)
        except queue.Empty:
            return None

    def _shut_down(self) -> None:
        """Pause what runs, start nothing more, and wait for every runner thread (each closes its machine)."""
        self.stop()
        threads = [slot.thread for slot in self._slots if slot.thread is not None]
        interrupted = False
        for thread in threads:
            while thread.is_alive():
                try:
                    thread.join(0.1)
                except KeyboardInterrupt:  # a second Ctrl-C: still finish closing, then raise it
                    interrupted = True
                    self.stop()
        with self._lock:
            for slot in self._slots:
                if slot.state is VmState.WAITING:
                    slot.state = VmState.NOT_RUN
                    slot.outcome = VmOutcome(slot.spec.name, None, StatusKind.ERROR,
                                             "not run: the fleet was stopped first", self._now(), self._now(),
                                             slot.backend)
        if interrupted:
            raise KeyboardInterrupt

    def _run_one(self, slot: _Slot, ended: queue.SimpleQueue[_Slot]) -> None:
        """A runner thread: make the VM, run it once, close it; never raises (every failure is the outcome)."""
        from labkit.vmm.machine import Machine

        spec = slot.spec
        slot.created_s = self._now()
        machine: Machine | None = None
        result: RunResult | None = None
        error = ""
        started = ended_at = self._now()
        try:
            machine = Machine(spec.guest, slot.backend, spec.memory, devices=spec.devices,
                              trace_limit=spec.trace_limit)
            if spec.parameters:
                machine.write_memory(PARAMETERS_ADDRESS, spec.parameters)
            with self._lock:
                go = not self._stopping
                if go:
                    slot.machine = machine
                    slot.state = VmState.RUNNING
                    slot.started_s = started = self._now()
            if go:
                try:
                    result = machine.run(slot.timeout)
                except DeviceError:
                    result = machine.last_result
                ended_at = self._now()
            else:
                error = "not run: the fleet was stopped while the VM was being made"
        except LabkitError as failure:
            error = str(failure)
        except Exception as failure:  # noqa: BLE001 - a VM's failure is its outcome, never the caller's crash
            error = f"{type(failure).__name__}: {failure}"
        finally:
            with self._lock:
                slot.machine = None
            if machine is not None:
                try:
                    machine.close()
                except Exception as failure:  # noqa: BLE001
                    error = error or f"closing the VM failed: {failure}"
        if result is None:
            status = StatusKind.ERROR
            state = VmState.NOT_RUN if error.startswith("not run") else VmState.ERROR
            ended_at = self._now()
        else:
            status = result.status.kind
            state = VmState(status.value)
        outcome = VmOutcome(spec.name, result, status, error, started, ended_at, slot.backend,
                            created_s=slot.created_s)
        with self._lock:
            slot.outcome = outcome
            slot.state = state
        ended.put(slot)


def run_many(specs: Sequence[VmSpec], *, max_parallel: int | None = None, timeout: float = DEFAULT_TIMEOUT_S,
             limits: FleetLimits | None = None) -> Iterator[VmOutcome]:
    """Run the VMs of ``specs`` at once (``max_parallel`` at a time) and yield each :class:`VmOutcome` as it ends.

    Checks everything (names, guests, backends, :class:`FleetLimits`) before the first VM
    starts.  Use :class:`Fleet` for a live status view while it runs.
    """
    return Fleet(specs, max_parallel=max_parallel, timeout=timeout, limits=limits).run()


__all__ = ["Fleet", "FleetLimits", "VmSpec", "VmOutcome", "VmState", "VmStatus", "run_many", "TRACE_LIMIT",
           "PARAMETERS_ADDRESS"]
