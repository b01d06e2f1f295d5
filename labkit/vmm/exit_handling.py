"""What labkit does with each exit: a plain function of (exit, buses).

The run loop only runs the backend and calls this.  Port and MMIO exits that
the backend hands to the dispatcher on its hot path go to the same bus methods
without building exit objects; this function is the general path, and the one
tests feed with hand-made exits.
"""

from __future__ import annotations

from dataclasses import dataclass

from labkit import exits
from labkit.vmm.bus import Bus, PortBus
from labkit.vmm.status import Status


@dataclass(frozen=True, slots=True)
class Buses:
    pio: PortBus
    mmio: Bus


@dataclass(frozen=True, slots=True)
class Handled:
    """The outcome of one exit: the value a read returns, or the status that ends the run."""

    value: int = 0
    status: Status | None = None


INTERNAL_ERROR_NAMES = {
    1: "KVM_INTERNAL_ERROR_EMULATION: KVM's instruction emulator could not run the instruction",
    2: "KVM_INTERNAL_ERROR_SIMUL_EX: an exception occurred while delivering another",
    3: "KVM_INTERNAL_ERROR_DELIVERY_EV: an event could not be delivered",
    4: "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON",
}


def handle_exit(exit: exits.Exit, buses: Buses) -> Handled:
    """Dispatch one exit to the buses, or turn it into the status that ends the run."""
    if isinstance(exit, exits.Io):
        if exit.is_write:
            buses.pio.write(exit.port, exit.size, exit.data)
            return Handled()
        return Handled(buses.pio.read(exit.port, exit.size))
    if isinstance(exit, exits.Mmio):
        if exit.is_write:
            buses.mmio.write(exit.address, exit.size, exit.data)
            return Handled()
        return Handled(buses.mmio.read(exit.address, exit.size))
    if isinstance(exit, exits.Interrupted):
        return Handled()
    return Handled(status=final_status(exit))


def final_status(exit: exits.Exit) -> Status:
    """The status of a run that ended with ``exit``."""
    if isinstance(exit, exits.Hlt):
        return Status("halted")
    if isinstance(exit, (exits.Shutdown, exits.SystemEvent)):
        return Status("shutdown")
    if isinstance(exit, exits.Timeout):
        return Status("timeout", message=f"the guest did not stop within its {exit.budget_s:g} s budget")
    if isinstance(exit, exits.InternalError):
        meaning = INTERNAL_ERROR_NAMES.get(exit.suberror, f"suberror {exit.suberror}")
        return Status("error", message=f"KVM_EXIT_INTERNAL_ERROR ({meaning})")
    if isinstance(exit, exits.FailEntry):
        return Status("error", message="KVM_EXIT_FAIL_ENTRY: the CPU refused to enter the guest "
                                       f"(hardware reason {exit.hardware_entry_failure_reason:#x}); "
                                       "its start state is invalid")
    if isinstance(exit, exits.EmulatorFailure):
        return Status("error", message=exit.message)
    if isinstance(exit, exits.Unsupported):
        return Status("error", message=f"unsupported exit reason {exit.reason_number}")
    kind = getattr(exit, "kvm_exit", None) or type(exit).__name__
    return Status("error", message=f"unexpected exit {kind}: {exit}")
