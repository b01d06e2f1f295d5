"""The backend protocol, and how ``backend="auto"`` chooses one.

A backend only creates the VM, maps its memory, gets and sets registers, and
runs to the next exit.  Devices, tracing, monitors and snapshots sit above it
(``labkit.vmm``) and work the same on every backend.

Two implementations ship: :class:`labkit.kvm.KvmBackend` (``/dev/kvm``) and
:class:`labkit.emu.EmuBackend` (Unicorn).  ``labkit.vmm.fake.FakeBackend``
replays scripted exits for tests that need neither.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Mapping, Protocol, runtime_checkable

from labkit.errors import BackendUnavailable, ConfigError
from labkit.exits import Exit
from labkit.x86.state import Regs, SRegs

BACKEND_NAMES = ("auto", "kvm", "emu")


class Dispatcher(Protocol):
    """What a backend calls, while the guest waits, for each port or MMIO access.

    It is the device bus plus the trace.  For a read it returns the value the
    guest sees; for a write its return value is ignored.  After each call the
    backend checks ``stop``: when it is true, ``run`` returns that exit at once.
    """

    stop: bool

    def pio(self, port: int, size: int, is_write: bool, value: int, rip: int) -> int: ...

    def mmio(self, address: int, size: int, is_write: bool, value: int, rip: int) -> int: ...


@runtime_checkable
class Backend(Protocol):
    """One VM with one vCPU and ``memory_size`` bytes of RAM at guest-physical 0."""

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

    def run(self, dispatcher: Dispatcher, timeout: float) -> Exit:
        """Run the guest until an exit the dispatcher does not absorb.

        Port I/O and MMIO exits go to ``dispatcher`` and the guest goes on,
        unless ``dispatcher.stop`` is set; every other exit (HLT, shutdown, ...)
        ends the call and is returned.  After ``timeout`` seconds of guest time
        the call returns :class:`labkit.exits.Timeout`.  The guest can be run
        again from where it stopped.
        """
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Choice:
    """Which backend ``auto`` (or an explicit name) resolves to, and why."""

    name: str
    reason: str


def kvm_problem() -> str | None:
    """Why KVM cannot be used here, with how to fix it; ``None`` when it can."""
    from labkit.kvm.system import probe  # lazy: keeps `import labkit` fast

    status = probe()
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


def create_backend(name: str, memory_size: int, mode: int) -> Backend:
    """Create a backend by resolved name (``kvm`` or ``emu``) for a guest starting in ``mode``."""
    if name == "kvm":
        from labkit.kvm import KvmBackend

        return KvmBackend(memory_size=memory_size, mode=mode)
    if name == "emu":
        from labkit.emu import EmuBackend

        return EmuBackend(memory_size=memory_size, mode=mode)
    if name == "fake":
        from labkit.vmm.fake import FakeBackend

        return FakeBackend(memory_size=memory_size, mode=mode)
    raise ConfigError(f"cannot create backend {name!r}")
