"""``Machine``: one guest, one backend, its devices, and the trace of every exit.

    >>> from labkit import Machine
    >>> result = Machine("hello64", backend="emu").run()
    >>> result.console, str(result.status)
    ('Hello from 64-bit mode!\\n', 'halted')

On the emulation backend the machine runs in a forked worker process (see
``labkit.vmm.worker``): an emulator crash or hang becomes a run with status
``error``, never a dead notebook kernel.  KVM keeps the guest behind the
kernel's own boundary, so it runs in the calling process unless ``isolate=True``.
Devices are given as :class:`labkit.vmm.devices.DeviceSpec` factories and built
where the guest runs; their state is read with :meth:`Machine.device_state`.

A run that returns ``paused`` (:meth:`Machine.pause`, from another thread) or
``timeout`` continues with another :meth:`Machine.run`, exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import weakref
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from labkit.backend import choose_backend
from labkit.errors import ConfigError, DeviceError, EmulatorError, SnapshotError
from labkit.memory import memory_file
from labkit.trace import ExitRecord, ExitTrace
from labkit.vmm.core import LegacyDeviceSpec, MachineCore
from labkit.vmm.devices.spec import DeviceSpec
from labkit.vmm.status import RunResult, Status, StatusKind
from labkit.vmm.worker import GRACE_S, Worker, WorkerDied
from labkit.x86 import layout
from labkit.x86.state import Regs, SRegs

if TYPE_CHECKING:  # imported where used: guest pulls in the assembler, forwarding the trap stubs
    from labkit.guest import Guest
    from labkit.snapshot import Snapshot
    from labkit.snapshot.state import PageDiff
    from labkit.kvm.controls import KvmExitControls
    from labkit.kvm.stats import KvmRunStats
    from labkit.vmm.forwarding import Monitor
    from labkit.vmm.host_memory import HostMapping

MAX_TIMEOUT_S = 3600.0


def check_timeout(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout) \
            or not 0 < timeout <= MAX_TIMEOUT_S:
        raise ConfigError(f"timeout must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], not {timeout!r}")
    return float(timeout)


class Machine:
    """A virtual machine running one guest.

    ``guest`` is a :class:`labkit.Guest` or the name of a shipped guest.
    ``backend`` is ``"auto"`` (KVM when usable, else emulation; see
    :attr:`backend_reason`), ``"kvm"`` or ``"emu"``.  ``devices`` adds
    :class:`~labkit.vmm.devices.DeviceSpec` entries to the standard UART,
    debug-exit, hypercall and fault ports; each is built by its factory where the
    guest runs (in the worker process on emulation).  The old
    ``(bus, base, length, device)`` tuples still work in-process (``isolate=False``)
    only.  ``monitor`` (a :class:`labkit.monitor.Monitor`)
    receives every exception of a long-mode guest (see ``labkit.monitor.forwarding``);
    what it reports comes back in ``RunResult.monitor``.  ``kvm_controls`` (a
    :class:`labkit.kvm.KvmExitControls`) sets KVM's exit controls: KVM only, a
    :class:`ConfigError` on the emulator.
    """

    def __init__(self, guest: Guest | str, backend: str = "auto", memory: int = layout.DEFAULT_MEMORY, *,
                 isolate: bool | None = None, devices: Sequence[DeviceSpec | LegacyDeviceSpec] = (),
                 trace_limit: int | None = None, monitor: Monitor | None = None,
                 kvm_controls: KvmExitControls | None = None):
        from labkit.guest import Guest

        if isinstance(guest, str):
            guest = Guest.named(guest)
        elif not isinstance(guest, Guest):
            raise ConfigError(f"a Machine runs a labkit.Guest or a shipped guest's name, not {type(guest).__name__}")
        self.guest = guest
        self.memory_size = layout.check_memory_size(memory)
        choice = choose_backend(backend)
        if kvm_controls is not None:
            from labkit.kvm.controls import KvmExitControls

            if not isinstance(kvm_controls, KvmExitControls):
                raise ConfigError(f"kvm_controls must be a labkit.kvm.KvmExitControls, not {kvm_controls!r:.60}")
            if choice.name != "kvm":
                raise ConfigError(f"kvm_controls need KVM, but this machine runs on the emulator "
                                  f"({choice.reason}): the emulator has no KVM exits to control")
        self.backend = choice.name
        self.backend_reason = choice.reason
        self.isolated = (choice.name == "emu") if isolate is None else bool(isolate)
        self._last: RunResult | None = None
        self._latest_snapshot: bytes | None = None
        devices = tuple(devices)
        if self.isolated:
            for spec in devices:
                if not isinstance(spec, DeviceSpec):
                    raise ConfigError(
                        "this machine runs in a worker process, so a device object made here would be a copy "
                        "the guest never touches: pass labkit.vmm.devices.DeviceSpec(name, bus, base, length, "
                        f"factory) instead of {type(spec).__name__} {spec!r:.60}")

        # An emulated machine's RAM is a memfd that its worker maps and this process keeps open: a
        # snapshot or a restore reads or writes the file here (pread/pwrite: no page faults on our side)
        # instead of sending the pages through the worker's socket.
        ram_fd = _ram_file(self.memory_size) if self.isolated and choice.name == "emu" else None
        self._ram_fd = ram_fd

        def make_core() -> MachineCore:
            try:
                return MachineCore(guest, choice.name, self.memory_size, devices=devices, trace_limit=trace_limit,
                                   monitor=monitor, kvm_controls=kvm_controls, ram_fd=ram_fd)
            finally:
                if ram_fd is not None:
                    os.close(ram_fd)  # in the worker: its mapping (and the mmap object's own descriptor) keeps it

        if self.isolated:
            if choice.name == "emu":
                from labkit.emu import prepare

                prepare()
            try:
                self._worker: Worker | None = Worker(make_core, (ram_fd,) if ram_fd is not None else ())
            except BaseException:
                if ram_fd is not None:
                    os.close(ram_fd)
                raise
            self._core: MachineCore | None = None
            # The caller's copy of the worker's trace and console: each run sends only what is new.
            self._trace = ExitTrace() if trace_limit is None else ExitTrace(trace_limit)
            self._console = bytearray()
            self._finalizer: weakref.finalize[Any, Any] = weakref.finalize(self, _close_worker, self._worker, ram_fd)
        else:
            self._worker = None
            self._core = make_core()
            self._finalizer = weakref.finalize(self, self._core.close)

    def __repr__(self) -> str:
        return f"<Machine {self.guest.name!r} on {self.backend}>"

    def _call(self, name: str, *args: Any, timeout: float | None = None) -> Any:
        if not self._finalizer.alive:
            raise ConfigError("this Machine is closed")
        if self._worker is None:
            return getattr(self._core, name)(*args)
        if timeout is None:
            return self._worker.call(name, *args)
        return self._worker.call(name, *args, timeout=timeout)

    def run(self, timeout: float = 5.0) -> RunResult:
        """Run the guest until it halts, exits, faults, shuts down, is paused, or ``timeout`` seconds pass.

        After ``paused`` or ``timeout`` another ``run()`` continues where it stopped.
        Raises :class:`labkit.errors.DeviceError` when a device's exception ended the
        run (:attr:`last_result` keeps the result).
        """
        timeout = check_timeout(timeout)
        try:
            if self._worker is None:
                result = self._call("run", timeout, False)
            else:
                update = self._call("run_update", timeout, len(self._trace.records), len(self._console),
                                    timeout=timeout + GRACE_S)
                result = update.apply(self._trace, self._console)
        except WorkerDied as died:
            result = self._lost(str(died))
        self._last = result
        self._raise_for_device(result.status)
        return result

    def steps(self, timeout: float = 5.0) -> Iterator[ExitRecord]:
        """Run the guest one exit at a time, yielding each exit's trace record; ends when the guest stops.

        The whole stepped run shares one ``timeout``; :attr:`last_result` has the status after it.
        Each step transfers only its new records (constant cost per exit, however long the run).
        """
        timeout = check_timeout(timeout)
        deadline = time.monotonic() + timeout
        status = Status(StatusKind.RUNNING)
        try:
            while status.kind is StatusKind.RUNNING:
                remaining = max(deadline - time.monotonic(), 0.0)
                try:
                    step = self._call("step", remaining, timeout, timeout=remaining + GRACE_S)
                except WorkerDied as died:
                    self._last = self._lost(str(died))
                    return
                status = step.status
                yield from step.records
        finally:  # also when the caller stops iterating early: last_result is the state then
            if self._worker is None or self._worker.alive:
                try:
                    if self._worker is None:
                        self._last = self._call("result")
                    else:
                        update = self._call("result_update", len(self._trace.records), len(self._console))
                        self._last = update.apply(self._trace, self._console)
                except WorkerDied as died:
                    self._last = self._lost(str(died))
        self._raise_for_device(status)

    def pause(self) -> None:
        """Make the run in progress return with status ``paused`` (call from another thread).

        With no run in progress, the next run returns ``paused`` at once.  Another
        ``run()`` continues the guest exactly where it stopped.
        """
        if not self._finalizer.alive:
            raise ConfigError("this Machine is closed")
        if self._core is not None:
            self._core.request_pause()
        elif self._worker is not None:
            self._worker.poke("request_pause")

    # --- snapshots ------------------------------------------------------------------------------

    def snapshot(self, parent: Snapshot | None = None) -> Snapshot:
        """The VM's whole state now (between runs, after any step, or after a pause) as a :class:`labkit.Snapshot`.

        Without ``parent``: a full snapshot (registers, MSRs, FPU, memory, devices).  With
        ``parent`` (this machine's previous snapshot): a diff holding only the pages the guest
        or the host wrote since that one, from KVM's dirty log or the emulator's write
        tracking.  Every snapshot starts counting written pages afresh, so the next one can be a diff;
        :meth:`stop_page_tracking` ends that (on the emulator the tracking costs every guest store a
        page-table lookup; on KVM, a write fault per page first written after each snapshot).
        """
        from labkit.snapshot import Snapshot
        from labkit.snapshot.image import MemoryImage

        if parent is not None:
            if self._latest_snapshot is None or parent.id != self._latest_snapshot:
                raise SnapshotError("a diff snapshot's parent must be this machine's latest snapshot "
                                    "(the written pages are counted from that one)")
            if self._ram_fd is None:
                state, diff = self._call("capture_diff")
            else:
                state, pages = self._call("capture_diff_pages")
                diff = self._written_pages_here(pages)
            snapshot = Snapshot(state, parent=parent, diff=diff)
        else:
            if self._ram_fd is None:
                state = self._call("capture_state", True)
            else:
                state = self._call("capture_state", True, True)
                ram = dataclasses.replace(state.regions[0],
                                          data=MemoryImage.copy_of_file(self._ram_fd, self.memory_size))
                state = dataclasses.replace(state, regions=(ram,) + state.regions[1:])
            self._call("start_page_tracking")
            snapshot = Snapshot(state)
        self._latest_snapshot = snapshot.id
        return snapshot

    def _written_pages_here(self, pages: list[int]) -> PageDiff:
        """The worker's written ``pages`` with their bytes, copied in the kernel from the RAM's file into a
        :class:`MemoryImage` (pages of other regions, if any, read through the worker)."""
        from labkit.snapshot.image import MemoryImage
        from labkit.memory import page_runs
        from labkit.snapshot.state import PageDiff

        fd = self._ram_fd
        assert fd is not None
        ram_pages = self.memory_size >> 12
        parts: list[bytes | tuple[int, int, int]] = []
        for first, count in page_runs(pages, [ram_pages]):  # one copy per run of consecutive pages
            if first < ram_pages:
                parts.append((fd, first << 12, count << 12))
            else:
                parts.append(self._call("read_memory", first << 12, count << 12))
        return PageDiff(tuple(pages), MemoryImage.concatenation(parts) if parts else b"")

    def stop_page_tracking(self) -> None:
        """Stop counting written pages (the next snapshot must be a full one)."""
        self._call("stop_page_tracking")
        self._latest_snapshot = None

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot, backend: str = "auto", *, isolate: bool | None = None,
                      devices: Sequence[DeviceSpec] = (), trace_limit: int | None = None) -> Machine:
        """A new machine that continues where ``snapshot`` was taken, on ``backend`` (either backend).

        ``devices`` must be the same :class:`DeviceSpec` list the snapshotted machine had
        (their state is restored by name).  The trace starts empty; the console holds what
        the guest had written before the snapshot.
        """
        machine = cls(snapshot.guest(), backend, snapshot.state.memory_size, isolate=isolate, devices=devices,
                      trace_limit=trace_limit)
        try:
            machine.restore(snapshot)
        except BaseException:
            machine.close()
            raise
        return machine

    def restore(self, snapshot: Snapshot) -> None:
        """Make this machine, which has not run yet, continue where ``snapshot`` was taken.

        :meth:`from_snapshot` creates the machine and calls this; a live migration creates the
        target machine first and restores into it once the source has stopped.
        """
        from labkit.snapshot.image import MemoryImage

        state = snapshot.state
        ram = state.regions[0] if state.regions else None
        size = self.memory_size
        if self._ram_fd is None or ram is None or (ram.address, ram.size, len(ram.data)) != (0, size, size):
            self._call("restore_state", state)  # in the core (which also names what does not fit)
            return
        self._call("restore_state", dataclasses.replace(state, regions=(dataclasses.replace(ram, data=b""),)
                                                        + state.regions[1:]), True)
        if isinstance(ram.data, MemoryImage):
            ram.data.copy_into_file(self._ram_fd)  # in the kernel: no page of it passes through this process
        else:
            _write_all(self._ram_fd, ram.data)

    def kvm_stats(self) -> KvmRunStats:
        """KVM's own counters for this machine's vCPU (binary stats fd, ``KVM_GET_STATS_FD``) since it was
        made, beside the exits labkit's run loop saw (:class:`labkit.kvm.stats.KvmRunStats`).

        :class:`ConfigError` on the emulator: it has no KVM and so no such counters.
        ``RunResult.kvm_stats`` holds the same at the end of each run (``None`` on the emulator).
        """
        return self._call("kvm_stats")

    def host_mappings(self) -> tuple[HostMapping, ...]:
        """Where this VM's RAM lives on the host: one :class:`labkit.vmm.host_memory.HostMapping` per memory
        region (the process holding it, the host address range, its ``/proc/<pid>/maps`` line).

        On KVM without ``isolate`` that is the calling process; otherwise the machine's worker.
        """
        return self._call("host_mappings")

    def device_state(self, name: str) -> Any:
        """The named device's saved state (its ``save()``: plain data), read where the device lives."""
        return self._call("device_state", name)

    @staticmethod
    def _raise_for_device(status: Status) -> None:
        if status.kind is StatusKind.ERROR and status.device is not None:
            raise DeviceError(status.message)

    def _lost(self, message: str) -> RunResult:
        last = self._last
        return RunResult(status=Status(StatusKind.ERROR, message=message),
                         console=last.console if last else "",
                         regs=last.regs if last else Regs(),
                         trace=last.trace if last else ExitTrace(),
                         backend=self.backend, elapsed_s=0.0, origin=last.origin if last else None,
                         console_dropped=last.console_dropped if last else 0)

    @property
    def last_result(self) -> RunResult | None:
        """The result of the latest ``run`` or ``steps``."""
        return self._last

    def regs(self) -> Regs:
        """The vCPU's general-purpose registers, RIP and RFLAGS now."""
        return self._call("regs")

    def sregs(self) -> SRegs:
        """Segment, descriptor-table and control registers now."""
        return self._call("sregs")

    def read_memory(self, address: int, size: int) -> bytes:
        """A copy of ``size`` bytes of guest RAM at guest-physical ``address``."""
        return self._call("read_memory", address, size)

    def write_memory(self, address: int, data: bytes) -> None:
        """Store ``data`` in guest RAM at guest-physical ``address`` (before a run: a guest's parameters).

        Bounds-checked by :class:`labkit.memory.GuestMemory` (a range outside guest memory raises
        :class:`labkit.errors.GuestMemoryError`); the host's write is not in the dirty log.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ConfigError(f"write_memory takes bytes, not {type(data).__name__}")
        self._call("write_memory", address, bytes(data))

    def describe(self) -> dict[str, str]:
        """What runs the guest (backend, flavour, versions) and why it was chosen."""
        return {**self._call("describe"), "reason": self.backend_reason}

    def close(self) -> None:
        """Release the VM (and stop the worker process, if any)."""
        self._finalizer()

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ram_file(size: int) -> int:
    """A memfd of ``size`` bytes for an emulated machine's RAM (its pages are allocated as they are touched)."""
    return memory_file("labkit-guest-ram", size, EmulatorError, "the emulated machine's RAM")


def _write_all(fd: int, data: bytes) -> None:
    view, offset = memoryview(data), 0
    while offset < len(view):
        offset += os.pwrite(fd, view[offset:], offset)


def _close_worker(worker: Worker, ram_fd: int | None) -> None:
    worker.close()
    if ram_fd is not None:
        os.close(ram_fd)
