"""How a run ended (:class:`StatusKind`, :class:`Status`), where it ran (:class:`Origin`), and what a run returns."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from labkit.backend import Backend
from labkit.trace import ExitTrace
from labkit.x86.arch import EXCEPTION_NAMES
from labkit.x86.state import Regs

if TYPE_CHECKING:  # KVM's module is imported only where KVM runs
    from labkit.kvm.stats import KvmRunStats


class StatusKind(str, Enum):
    """How a run ended.  A str-enum: ``StatusKind.HALTED == "halted"``."""

    RUNNING = "running"
    """Not ended: a step returned after one exit."""
    PAUSED = "paused"
    """``Machine.pause()`` stopped it; another ``run()`` continues where it stopped."""
    HALTED = "halted"
    EXITED = "exited"
    """The guest wrote a code to the debug-exit port."""
    SHUTDOWN = "shutdown"
    TIMEOUT = "timeout"
    """Its time budget ran out; another ``run()`` continues where it stopped."""
    FAULT = "fault"
    ERROR = "error"

    @property
    def resumable(self) -> bool:
        """Whether another ``run()`` continues the guest (paused, timed out, or between steps)."""
        return self in _RESUMABLE

    def __str__(self) -> str:
        return self.value


_RESUMABLE = frozenset({StatusKind.PAUSED, StatusKind.TIMEOUT, StatusKind.RUNNING})

KINDS = tuple(kind.value for kind in StatusKind)
"""Every status kind's value, for code that still compares strings."""


def exception_name(vector: int) -> str:
    """``"#GP (general protection)"`` for 13; ``"vector 0x80"`` for a software interrupt."""
    if vector in EXCEPTION_NAMES:
        short, name = EXCEPTION_NAMES[vector]
        return f"{short} ({name})"
    return f"vector {vector:#x}"


@dataclass(frozen=True, slots=True)
class Fault:
    """An exception the default handlers caught: which one, where, and its error code."""

    vector: int
    rip: int
    error_code: int | None = None
    cr2: int | None = None
    """The faulting linear address, for #PF."""

    def __str__(self) -> str:
        text = f"{exception_name(self.vector)} at rip {self.rip:#x}"
        if self.error_code is not None:
            text += f", error code {self.error_code:#x}"
        if self.cr2 is not None:
            text += f", cr2 {self.cr2:#x}"
        return text


@dataclass(frozen=True, slots=True)
class Status:
    """How a run ended (``running`` after a single step)."""

    kind: StatusKind
    code: int | None = None
    """The exit code, for ``exited``."""
    message: str = ""
    fault: Fault | None = None
    device: str | None = None
    """For ``error``: the device whose exception ended the run (``Machine.run`` raises ``DeviceError``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.kind, StatusKind):
            object.__setattr__(self, "kind", StatusKind(self.kind))  # ValueError for an unknown kind

    def __str__(self) -> str:
        if self.kind is StatusKind.EXITED:
            return f"exited with code {self.code}"
        if self.kind is StatusKind.FAULT:
            return f"fault: {self.fault}"
        if self.kind is StatusKind.SHUTDOWN:
            return "shutdown (triple fault)"
        return f"{self.kind.value}: {self.message}" if self.message else self.kind.value


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a result was measured, so a figure can label itself from the result alone."""

    backend: str
    """``"kvm"``, ``"emu"`` (``"fake"`` in tests)."""
    flavour: str | None
    """The KVM module (``"kvm_pvm"``, ``"kvm_intel"``, ``"kvm_amd"``) on KVM, else ``None``."""
    unicorn: str | None
    """Unicorn's version on the emulator, else ``None``."""
    labkit: str
    host: str
    """The host's name (``platform.node()``)."""

    @classmethod
    def of(cls, backend: Backend) -> "Origin":
        """The origin of runs on ``backend`` (a :class:`labkit.backend.Backend`), in this process."""
        import labkit

        kind = backend.kind
        flavour = getattr(backend, "flavour", None) if kind == "kvm" else None
        unicorn_version = None
        if kind == "emu":
            import unicorn  # already imported by the backend

            unicorn_version = unicorn.__version__
        return cls(kind, flavour, unicorn_version, labkit.__version__, platform.node())

    def __str__(self) -> str:
        engine = self.flavour if self.backend == "kvm" else (
            f"unicorn {self.unicorn}" if self.unicorn else self.backend)
        return f"{engine} on {self.host} (labkit {self.labkit})"


@dataclass(frozen=True)
class RunResult:
    """What ``Machine.run`` returns."""

    status: Status
    console: str
    regs: Regs
    trace: ExitTrace = field(repr=False)
    backend: str
    elapsed_s: float
    monitor: object = None
    """What the machine's monitor reports (``Monitor.summary()``), when it runs under one."""
    origin: Origin | None = None
    """Where it ran (backend, KVM flavour, versions, host).  Every result a Machine returns has one;
    ``None`` only in results built by hand."""
    console_dropped: int = 0
    """Console bytes dropped because the console's bound (``Console.capacity``) was reached."""
    kvm_stats: KvmRunStats | None = None
    """On KVM: the vCPU's own counters (binary stats fd) since the machine was made, beside the exits
    labkit's run loop saw (:class:`labkit.kvm.stats.KvmRunStats`).  ``None`` on the emulator, which has
    no KVM and so no such counters (``Machine.kvm_stats()`` says so in its error)."""

    @property
    def console_truncated(self) -> bool:
        """Whether the guest printed more than the console keeps (``console`` is cut; see ``console_dropped``)."""
        return self.console_dropped > 0

    @property
    def exits(self) -> dict[str, int]:
        """Exit counts by reason name."""
        return self.trace.by_reason()
