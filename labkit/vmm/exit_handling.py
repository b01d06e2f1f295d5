"""What each exit means: the one place that decides, for every backend.

A backend runs the guest and hands port and MMIO accesses to the dispatcher
(:class:`labkit.vmm.core.MachineCore`) while the guest waits; those accesses
never come here unless the dispatcher asked the backend to stop.  Every exit a
backend's ``run`` returns comes here, with the :class:`Situation` the core
was in, and :func:`decide` says what the core does next (:class:`Action`) and,
when the run ends, its :class:`~labkit.vmm.status.Status`.  The decision is made
on exit types and enums only, never on message text.

====================  ==========================================================
exit                  meaning
====================  ==========================================================
``Io`` / ``Mmio``     the dispatcher asked to stop after it: a device ended the
                      run (its status), a pause (``paused``), or one step
                      (``running``); else (a spurious stop) the guest goes on
``Interrupted``       a kick: a pause (``paused``), else the guest goes on (a
                      device raised a line; the backend injects it on re-entry)
``Hlt``               ``halted``; or, with RFLAGS.IF = 1 and an interrupt source
                      armed, wait for the interrupt and go on
``Timeout``           ``timeout`` (another ``run()`` continues)
``Shutdown``,         ``shutdown`` (a triple fault, or a reset/shutdown request)
``SystemEvent``
``InternalError``,    ``error``, with where it happened (the instruction at RIP)
``FailEntry``,
``EmulatorFailure``,
``Unsupported``, ...
====================  ==========================================================

A device's status (debug exit, fault port, a monitor's stop, a device's own
exception) wins over a pause; a pause wins over a step.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

from labkit import exits
from labkit.vmm.status import Status, StatusKind


class Action(Enum):
    """What the run loop does after an exit."""

    RESUME = "resume"
    """Run the guest again (nothing to record)."""
    WAIT = "wait"
    """The guest halted with interrupts enabled and an armed source: wait for a line, then run it again."""
    STOP = "stop"
    """The run returns with :attr:`Decision.status`."""


@dataclass(frozen=True, slots=True)
class Situation:
    """What the core knows besides the exit itself."""

    device_status: Status | None = None
    """The status a device set while the guest waited (``exited``, ``fault``, ``error``, ...)."""
    pause_requested: bool = False
    pause_message: str = ""
    """Why the machine pauses, when a device asked (``DeviceContext.pause``); empty for ``Machine.pause()``."""
    stepping: bool = False
    """The run returns after each recorded exit (``Machine.steps``)."""
    halt_can_wait: Callable[[], bool] = lambda: False
    """Whether a HLT waits for an interrupt: RFLAGS.IF = 1 and the interrupt controller is armed."""
    where: Callable[[], str] = lambda: ""
    """Where the guest is (``" at rip 0x...: insn"``), for error messages; called only for errors."""


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    status: Status | None = None
    record: bool = False
    """Whether the exit goes into the trace (absorbed port and MMIO exits are already there)."""


INTERNAL_ERROR_NAMES = {
    1: "KVM_INTERNAL_ERROR_EMULATION: KVM's instruction emulator could not run the instruction",
    2: "KVM_INTERNAL_ERROR_SIMUL_EX: an exception occurred while delivering another",
    3: "KVM_INTERNAL_ERROR_DELIVERY_EV: an event could not be delivered",
    4: "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON",
}

PAUSED = Status(StatusKind.PAUSED)
STEPPED = Status(StatusKind.RUNNING)


def paused(message: str = "") -> Status:
    """The status of a pause, with the device's reason if one asked for it."""
    return Status(StatusKind.PAUSED, message=message) if message else PAUSED


def decide(exit: exits.Exit, situation: Situation = Situation()) -> Decision:
    """What the core does after the backend returned ``exit``."""
    if isinstance(exit, (exits.Io, exits.Mmio)):  # already dispatched and recorded
        if situation.device_status is not None:
            return Decision(Action.STOP, situation.device_status)
        if situation.pause_requested:
            return Decision(Action.STOP, paused(situation.pause_message))
        if situation.stepping:
            return Decision(Action.STOP, STEPPED)
        return Decision(Action.RESUME)
    if isinstance(exit, exits.Interrupted):
        if situation.device_status is not None:
            return Decision(Action.STOP, situation.device_status)
        if situation.pause_requested:
            return Decision(Action.STOP, paused(situation.pause_message))
        return Decision(Action.RESUME)
    if isinstance(exit, exits.Hlt) and situation.halt_can_wait():
        return Decision(Action.WAIT, record=True)
    return Decision(Action.STOP, final_status(exit, situation.where), record=True)


def final_status(exit: exits.Exit, where: Callable[[], str] = lambda: "") -> Status:
    """The status of a run that ended with ``exit`` (any exit but an absorbed port, MMIO or kick exit)."""
    if isinstance(exit, exits.Hlt):
        return Status(StatusKind.HALTED)
    if isinstance(exit, (exits.Shutdown, exits.SystemEvent)):
        return Status(StatusKind.SHUTDOWN)
    if isinstance(exit, exits.Timeout):
        return Status(StatusKind.TIMEOUT, message=f"the guest did not stop within its {exit.budget_s:g} s budget")
    if isinstance(exit, exits.InternalError):
        meaning = INTERNAL_ERROR_NAMES.get(exit.suberror, f"suberror {exit.suberror}")
        return Status(StatusKind.ERROR, message=f"KVM_EXIT_INTERNAL_ERROR ({meaning}){where()}")
    if isinstance(exit, exits.FailEntry):
        return Status(StatusKind.ERROR, message="KVM_EXIT_FAIL_ENTRY: the CPU refused to enter the guest "
                                                f"(hardware reason {exit.hardware_entry_failure_reason:#x}); "
                                                "its start state is invalid")
    if isinstance(exit, exits.EmulatorFailure):
        return Status(StatusKind.ERROR, message=exit.message + where())
    if isinstance(exit, exits.Unsupported):
        return Status(StatusKind.ERROR, message=f"unsupported exit reason {exit.reason_number}")
    kind = getattr(exit, "kvm_exit", None) or type(exit).__name__
    return Status(StatusKind.ERROR, message=f"unexpected exit {kind}: {exit}")
