"""How a run ended, and what a run returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from labkit.trace import ExitTrace
from labkit.x86.arch import EXCEPTION_NAMES
from labkit.x86.state import Regs

KINDS = ("running", "halted", "exited", "shutdown", "timeout", "fault", "error")


class StatusKind(str, Enum):
    """How a run ended; a str-enum, so it still equals the old strings (``StatusKind.HALTED == "halted"``)."""

    RUNNING = "running"
    PAUSED = "paused"
    HALTED = "halted"
    EXITED = "exited"
    SHUTDOWN = "shutdown"
    TIMEOUT = "timeout"
    FAULT = "fault"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value

    @property
    def resumable(self) -> bool:
        """A run that ended so can go on with another ``run()``."""
        return self in (StatusKind.PAUSED, StatusKind.TIMEOUT, StatusKind.RUNNING)


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
    """How a run ended (``kind`` in :data:`KINDS`; ``running`` after a single step)."""

    kind: str
    code: int | None = None
    """The exit code, for ``exited``."""
    message: str = ""
    fault: Fault | None = None

    def __str__(self) -> str:
        if self.kind == "exited":
            return f"exited with code {self.code}"
        if self.kind == "fault":
            return f"fault: {self.fault}"
        if self.kind == "shutdown":
            return "shutdown (triple fault)"
        return f"{self.kind}: {self.message}" if self.message else self.kind


@dataclass(frozen=True)
class Origin:
    """Where a run happened: what figures and tables say measured it (never re-probed from the host)."""

    backend: str
    """``"kvm"`` or ``"emu"``."""
    flavour: str | None
    """``"kvm_pvm"``, ``"kvm_intel"``, ``"kvm_amd"`` for KVM; None for the emulator or when unknown."""
    unicorn: str | None
    """Unicorn's version, for the emulator; None otherwise."""
    labkit: str
    host: str
    """The host's name."""


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
    """Where the run happened (backend, KVM flavour, versions, host)."""

    @property
    def exits(self) -> dict[str, int]:
        """Exit counts by reason name."""
        return self.trace.by_reason()
