"""Backend-neutral VM exits.

Both backends report what stopped the guest with these objects: the KVM backend
decodes them from ``struct kvm_run``, the emulation backend makes them from
Unicorn's hooks.  Each class names the ``KVM_EXIT_*`` reason it corresponds to
(``kvm_exit``); labkit's own reasons, which have no KVM number, are numbered
from 1000 upwards.  A KVM reason labkit does not model is kept as
:class:`Unsupported`, never dropped.

Hot paths (a port write every few microseconds) do not build these objects;
they record raw tuples in the trace, which turns them into exits on demand.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Protocol, Union


class Dispatcher(Protocol):
    """What a backend calls, while the guest waits: each port or MMIO access, and the interrupt lines.

    It is the device bus, the interrupt controller and the trace
    (:class:`labkit.vmm.core.MachineCore`).  For a read it returns the value
    the guest sees; for a write its return value is ignored.  After each call
    the backend checks ``stop``: when it is true, ``run`` returns that exit
    (:class:`labkit.exits.Io` / :class:`labkit.exits.Mmio`) at once.

    Interrupts: before entering the guest, and after every absorbed exit, the
    backend reads ``interrupt_pending``.  When it is true it asks
    ``pending_vector()``; if the guest can take an external interrupt (RFLAGS.IF
    = 1 and no interrupt shadow: on KVM ``ready_for_interrupt_injection`` and
    ``if_flag`` in ``kvm_run``), it injects that vector (``KVM_INTERRUPT``; on
    the emulator, delivery through the guest's IDT with external-interrupt
    semantics: no error code, RIP of the next instruction) and then calls
    ``acknowledge_interrupt(vector)``.  If the guest cannot take it, the backend
    asks to be told when it can (``request_interrupt_window`` and
    ``KVM_EXIT_IRQ_WINDOW_OPEN`` on KVM) and injects it then.

    Backends only read ``stop`` and ``interrupt_pending`` (read-only here: the
    core keeps ``stop`` as an attribute and ``interrupt_pending`` as a property).
    This protocol lives here, below the backends, so that they can name it;
    :mod:`labkit.backend` re-exports it.
    """

    @property
    def stop(self) -> bool:
        """Whether ``run`` returns the exit it just handed over."""
        ...

    @property
    def interrupt_pending(self) -> bool:
        """Whether a line is raised and unmasked (cheap to read)."""
        ...

    def pio(self, port: int, size: int, is_write: bool, value: int, rip: int) -> int: ...

    def mmio(self, address: int, size: int, is_write: bool, value: int, rip: int) -> int: ...

    def pending_vector(self) -> int | None:
        """The vector to inject now, or ``None`` (the line went down meanwhile)."""
        ...

    def acknowledge_interrupt(self, vector: int) -> None:
        """``vector`` was injected: the controller moves it from requested to in service."""
        ...


class ExitReason(IntEnum):
    """Exit reason numbers: ``KVM_EXIT_*`` from linux/kvm.h, then labkit's own."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    X86_RDMSR = 29
    X86_WRMSR = 30
    X86_BUS_LOCK = 33
    NOTIFY = 37
    # labkit's own reasons, with no KVM number.
    TIMEOUT = 1000
    """The run's time budget ran out (on KVM: ``KVM_EXIT_INTR`` after labkit's watchdog fired)."""
    EMULATOR_ERROR = 1001
    """Unicorn stopped with an error it could not express as an exit, crashed or hung."""
    INTERRUPT = 1002
    """An external interrupt the guest took (the PIC's vector went in: KVM_INTERRUPT on KVM, labkit's
    delivery through the IDT on emulation); recorded when it is acknowledged, ``data`` = the vector.
    Not an exit: the guest goes on, but each one is a trace record so ticks can be counted."""


@dataclass(frozen=True, slots=True)
class Io:
    """A port I/O instruction (``in``/``out``): ``KVM_EXIT_IO``.

    ``data`` is the value written (for ``is_write``) or the value the guest read.
    """

    kvm_exit: ClassVar[str] = "KVM_EXIT_IO"
    reason: ClassVar[ExitReason] = ExitReason.IO
    port: int
    size: int
    is_write: bool
    data: int = 0


@dataclass(frozen=True, slots=True)
class Mmio:
    """An access to guest-physical memory with no RAM behind it: ``KVM_EXIT_MMIO``."""

    kvm_exit: ClassVar[str] = "KVM_EXIT_MMIO"
    reason: ClassVar[ExitReason] = ExitReason.MMIO
    address: int
    size: int
    is_write: bool
    data: int = 0


@dataclass(frozen=True, slots=True)
class Hlt:
    """The guest executed ``hlt``: ``KVM_EXIT_HLT``."""

    kvm_exit: ClassVar[str] = "KVM_EXIT_HLT"
    reason: ClassVar[ExitReason] = ExitReason.HLT


@dataclass(frozen=True, slots=True)
class Shutdown:
    """A triple fault (a fault that could not be delivered): ``KVM_EXIT_SHUTDOWN``."""

    kvm_exit: ClassVar[str] = "KVM_EXIT_SHUTDOWN"
    reason: ClassVar[ExitReason] = ExitReason.SHUTDOWN


@dataclass(frozen=True, slots=True)
class Exception_:
    """An exception KVM hands to userspace: ``KVM_EXIT_EXCEPTION``."""

    kvm_exit: ClassVar[str] = "KVM_EXIT_EXCEPTION"
    reason: ClassVar[ExitReason] = ExitReason.EXCEPTION
    vector: int
    error_code: int = 0


@dataclass(frozen=True, slots=True)
class Hypercall:
    """A ``vmcall``/``vmmcall`` KVM passed to userspace: ``KVM_EXIT_HYPERCALL``."""

    kvm_exit: ClassVar[str] = "KVM_EXIT_HYPERCALL"
    reason: ClassVar[ExitReason] = ExitReason.HYPERCALL
    nr: int
    args: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Debug:
    """A debug exception or single step: ``KVM_EXIT_DEBUG``."""

    kvm_exit: ClassVar[str] = "KVM_EXIT_DEBUG"
    reason: ClassVar[ExitReason] = ExitReason.DEBUG
    exception: int = 0
    pc: int = 0


@dataclass(frozen=True, slots=True)
class FailEntry:
    """The CPU refused to enter the guest: ``KVM_EXIT_FAIL_ENTRY``."""

    kvm_exit: ClassVar[str] = "KVM_EXIT_FAIL_ENTRY"
    reason: ClassVar[ExitReason] = ExitReason.FAIL_ENTRY
    hardware_entry_failure_reason: int
    cpu: int = 0


@dataclass(frozen=True, slots=True)
class InternalError:
    """KVM could not handle the guest (often: emulation failed): ``KVM_EXIT_INTERNAL_ERROR``."""

    kvm_exit: ClassVar[str] = "KVM_EXIT_INTERNAL_ERROR"
    reason: ClassVar[ExitReason] = ExitReason.INTERNAL_ERROR
    suberror: int
    data: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Interrupted:
    """``KVM_RUN`` returned because a signal was pending: ``KVM_EXIT_INTR``."""

    kvm_exit: ClassVar[str] = "KVM_EXIT_INTR"
    reason: ClassVar[ExitReason] = ExitReason.INTR


@dataclass(frozen=True, slots=True)
class SystemEvent:
    """A reset, shutdown or crash request: ``KVM_EXIT_SYSTEM_EVENT``."""

    kvm_exit: ClassVar[str] = "KVM_EXIT_SYSTEM_EVENT"
    reason: ClassVar[ExitReason] = ExitReason.SYSTEM_EVENT
    type: int
    data: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Timeout:
    """The run's budget ran out before the guest stopped (labkit's own reason)."""

    kvm_exit: ClassVar[str | None] = None
    reason: ClassVar[ExitReason] = ExitReason.TIMEOUT
    budget_s: float


@dataclass(frozen=True, slots=True)
class EmulatorFailure:
    """Unicorn failed, crashed or hung; ``message`` says how (labkit's own reason)."""

    kvm_exit: ClassVar[str | None] = None
    reason: ClassVar[ExitReason] = ExitReason.EMULATOR_ERROR
    message: str


@dataclass(frozen=True, slots=True)
class Unsupported:
    """A ``KVM_EXIT_*`` reason labkit does not model, kept with its number."""

    kvm_exit: ClassVar[str | None] = None
    reason_number: int

    @property
    def reason(self) -> ExitReason | int:
        try:
            return ExitReason(self.reason_number)
        except ValueError:
            return self.reason_number


Exit = Union[
    Io, Mmio, Hlt, Shutdown, Exception_, Hypercall, Debug, FailEntry, InternalError,
    Interrupted, SystemEvent, Timeout, EmulatorFailure, Unsupported,
]


def reason_name(reason: int) -> str:
    """``"IO"`` for 2, ``"TIMEOUT"`` for 1000, ``"UNKNOWN_42"`` for a number with no name."""
    try:
        return ExitReason(reason).name
    except ValueError:
        return f"UNKNOWN_{reason}"
