"""The backend protocol, and how ``backend="auto"`` chooses one.

A backend only creates the VM, maps its memory, gets and sets registers,
injects interrupts it is told about, and runs to the next exit.  Devices,
tracing, monitors and snapshots sit above it (``labkit.vmm``) and work the
same on every backend.

Two implementations ship: :class:`labkit.kvm.KvmBackend` (``/dev/kvm``) and
:class:`labkit.emu.EmuBackend` (Unicorn).  The tests' ``tests/fakes.py`` has a
scripted one that replays exits, for testing the core without either.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping, Protocol, runtime_checkable

from labkit.errors import BackendUnavailable, ConfigError
from labkit.exits import Dispatcher, Exit
from labkit.x86.state import DebugRegs, FpuState, Regs, SRegs

if TYPE_CHECKING:  # imported lazily: keeps `import labkit` fast
    from labkit.kvm.controls import KvmExitControls

BACKEND_NAMES = ("auto", "kvm", "emu")


@runtime_checkable
class Backend(Protocol):
    """One VM with one vCPU: RAM at guest-physical 0 (``memory``), optional further regions."""

    kind: str
    """``"kvm"`` or ``"emu"`` (``"fake"`` in tests)."""

    memory: memoryview
    """Guest RAM, writable, guest-physical address 0 at index 0."""

    def describe(self) -> dict[str, str]:
        """What runs the guest, e.g. ``{"backend": "kvm", "flavour": "kvm_pvm", ...}``."""
        ...

    def get_regs(self) -> Regs: ...

    def set_regs(self, regs: Regs) -> None: ...

    def get_sregs(self) -> SRegs: ...

    def set_sregs(self, sregs: SRegs) -> None: ...

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]: ...

    def set_msrs(self, msrs: Mapping[int, int]) -> None: ...

    def get_fpu(self) -> FpuState:
        """x87 and SSE state (FXSAVE's view)."""
        ...

    def set_fpu(self, fpu: FpuState) -> None: ...

    def get_debug_regs(self) -> DebugRegs: ...

    def set_debug_regs(self, debug: DebugRegs) -> None: ...

    def pending_interrupt(self) -> int | None:
        """An external interrupt handed to the backend (acknowledged at the controller) but not yet
        delivered through the guest's IDT, or ``None``."""
        ...

    def run(self, dispatcher: Dispatcher, timeout: float) -> Exit:
        """Run the guest until an exit the dispatcher does not absorb.

        Port I/O and MMIO exits go to ``dispatcher`` and the guest goes on,
        unless ``dispatcher.stop`` is set; every other exit (HLT, shutdown, ...)
        ends the call and is returned.  After :class:`labkit.exits.Hlt`, RIP is
        after the ``hlt`` (the core decides whether the guest waits for an
        interrupt).  After ``timeout`` seconds of guest time the call returns
        :class:`labkit.exits.Timeout`.  After :meth:`kick` it returns
        :class:`labkit.exits.Interrupted`.  The guest can be run again from
        where it stopped, whatever the call returned.  An exception a
        dispatcher call raises ends the call and propagates to the caller.
        """
        ...

    def kick(self) -> None:
        """Make a ``run`` in progress return :class:`labkit.exits.Interrupted` at the next instruction boundary.

        Thread-safe.  The vCPU state is consistent afterwards (on KVM a pending
        ``in`` is completed first: ``KVM_RUN`` with ``immediate_exit``).  A kick
        while no run is in progress makes the next ``run`` return
        ``Interrupted`` at once, without running guest code.
        """
        ...

    def add_memory_region(self, guest_address: int, size: int, *, read_only: bool = False) -> memoryview:
        """Map ``size`` more bytes at ``guest_address`` and return them, writable by the host.

        Page-aligned, not overlapping RAM or another region, below
        ``layout.MAPPED_LIMIT``.  A guest write to a read-only region becomes an
        MMIO write to the dispatcher (``KVM_MEM_READONLY``); reads are plain
        memory reads.
        """
        ...

    def regions(self) -> list[tuple[int, memoryview, bool]]:
        """``(guest_address, view, read_only)`` of every region, RAM first."""
        ...

    def dirty_log_start(self) -> None:
        """Start logging the pages the guest writes, over every writable region
        (``KVM_MEM_LOG_DIRTY_PAGES`` on KVM; write tracking on the emulator)."""
        ...

    def dirty_log_fetch(self) -> list[int]:
        """Sorted guest-physical page frame numbers the guest wrote since the start or the
        previous fetch (``KVM_GET_DIRTY_LOG`` on KVM); fetching clears.  The host's own
        writes through the memoryviews are not logged."""
        ...

    def dirty_log_stop(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Choice:
    """Which backend ``auto`` (or an explicit name) resolves to, and why."""

    name: str
    reason: str


_KVM_PROVEN: set[str] = set()
"""The KVM devices a probe found usable in this process: later choices do not probe them again (a
probe creates and destroys a VM: on PVM about 0.2 ms of CPU and 5-25 ms of the kernel's teardown,
per Machine).  A failed probe is never remembered: the student may fix it and try again."""


def kvm_problem() -> str | None:
    """Why KVM cannot be used here, with how to fix it; ``None`` when it can."""
    from labkit.kvm.system import kvm_device, probe  # lazy: keeps `import labkit` fast

    device = kvm_device()
    if device in _KVM_PROVEN:
        return None
    status = probe(device)
    if status.usable:
        _KVM_PROVEN.add(device)
    return None if status.usable else status.problem


def choose_backend(name: str = "auto") -> Choice:
    """Resolve a backend name; ``auto`` picks KVM when it is usable, else emulation.

    ``LABKIT_BACKEND`` in the environment overrides ``auto`` (Binder sets ``emu``).
    Raises :class:`BackendUnavailable` when ``kvm`` is asked for and cannot be used.
    """
    if name not in BACKEND_NAMES:
        raise ConfigError(f"unknown backend {name!r}: choose one of {', '.join(BACKEND_NAMES)}")
    if name == "auto":
        forced = os.environ.get("LABKIT_BACKEND", "auto")
        if forced not in BACKEND_NAMES:
            raise ConfigError(f"LABKIT_BACKEND={forced!r} is not one of {', '.join(BACKEND_NAMES)}")
        if forced != "auto":
            return Choice(forced, f"LABKIT_BACKEND={forced} is set")
    if name == "emu":
        return Choice("emu", "emulation was asked for")
    problem = kvm_problem()
    if name == "kvm":
        if problem:
            raise BackendUnavailable(f"the KVM backend cannot run here: {problem}")
        return Choice("kvm", "KVM was asked for")
    if problem:
        return Choice("emu", f"KVM is not usable ({problem}); using emulation (Unicorn)")
    return Choice("kvm", "/dev/kvm is present and usable")


def create_backend(name: str, memory_size: int, mode: int, kvm_controls: KvmExitControls | None = None, *,
                   ram_fd: int | None = None) -> Backend:
    """Create a backend by resolved name (``kvm`` or ``emu``) for a guest starting in ``mode``.

    ``kvm_controls`` (:class:`labkit.kvm.controls.KvmExitControls`) go to the KVM
    backend; the emulator has no KVM exit controls and refuses them with :class:`ConfigError`.
    ``ram_fd`` (emulator only) is a file of ``memory_size`` bytes mapped shared as the guest's RAM
    (a machine in a worker process and its caller see the same pages).
    """
    if name == "kvm":
        from labkit.kvm import KvmBackend

        if ram_fd is not None:
            raise ConfigError("KVM's guest RAM is an anonymous mapping of its own; ram_fd is for the emulator")
        return KvmBackend(memory_size=memory_size, mode=mode, controls=kvm_controls)
    if kvm_controls is not None:
        raise ConfigError(f"KVM exit controls ({', '.join(kvm_controls.describe()) or 'none set'}) need the KVM "
                          f"backend; this machine runs on {name!r}, which has no KVM_RUN loop to control")
    if name == "emu":
        from labkit.emu import EmuBackend

        return EmuBackend(memory_size=memory_size, mode=mode, ram_fd=ram_fd)
    raise ConfigError(f"cannot create backend {name!r}")
