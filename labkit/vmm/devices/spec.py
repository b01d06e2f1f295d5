"""How a device is given to a machine (:class:`DeviceSpec`) and what it may use (:class:`DeviceContext`).

A device is built by the machine's core from a spec, inside the process
where the core runs (a worker process on the emulation backend), so the guest's
accesses and the caller's ``Machine.device_state(name)`` see the same object on
every backend.  A device object built by the caller and copied into a worker
would be a different object there: the caller's copy would never change.

Every device has the device-state interface (:class:`StatefulDevice`):
``reset()`` to its power-on state, ``save()`` to plain data (ints, bytes,
strings, lists and dicts of them), ``restore(state)`` from what ``save``
returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

from labkit.errors import ConfigError
from labkit.memory import GuestMemory
from labkit.x86.state import Regs

BUSES = ("pio", "mmio")


def no_armed_lines(line: int, armed: bool) -> None:
    """``set_armed`` of a machine whose interrupt controller has none (a test's stand-in)."""
    raise ConfigError(f"this machine's interrupt controller cannot arm line {line}: it has no set_armed")


def no_console(data: bytes | memoryview) -> None:
    """``console`` of a context without a machine console (a test's stand-in)."""
    raise ConfigError("this device context has no console to write to")


def no_devices(name: str) -> Any:
    """``device`` of a context without a machine (a test's stand-in)."""
    raise ConfigError(f"this device context has no machine whose device {name!r} could be looked up")


def no_pause(message: str) -> None:
    """``pause`` of a context without a machine (a test's stand-in)."""
    raise ConfigError(f"this device context has no machine to pause ({message})")


def no_resume(callback: Callable[[], None]) -> None:
    """``on_resume`` of a context without a machine (a test's stand-in)."""
    raise ConfigError("this device context has no machine whose next run could call back")


@dataclass(frozen=True)
class DeviceContext:
    """What a device may use: guest memory, the vCPU's registers, interrupt lines, and a kick.

    ``raise_irq``/``lower_irq`` drive a line of the machine's interrupt
    controller and may be called from any thread; ``kick`` makes a running guest
    leave the CPU at the next instruction boundary (so a line raised from
    another thread is seen at once).  ``set_armed(line, armed)`` says whether
    the device may still raise ``line`` by itself (a programmed timer, a
    request in flight): while an armed line can reach the CPU, a guest's HLT
    with IF = 1 waits for the interrupt instead of ending the run as halted
    (:meth:`labkit.vmm.interrupts.InterruptController.set_armed`).
    ``console(data)`` appends bytes to the machine's console (what ``RunResult.console``
    shows, beside the UART's; in a machine it is the
    :class:`~labkit.vmm.devices.console.Console` itself, which a device may also hand
    to C code, as the virtio console's queue does); ``device(name)`` is a device built
    before this one (a spec listed earlier), for a device that sits on two buses (a
    register block and a notify port).  ``pause(message)`` ends the run in progress with status
    ``paused`` and that message (a device that cannot go on: a disk whose
    datastore is full), and ``on_resume(callback)`` has the machine call
    ``callback()`` at the start of its next run, before the guest runs (the
    device retries what it could not do).
    """

    memory: GuestMemory
    regs: Callable[[], Regs]
    raise_irq: Callable[[int], bool]
    lower_irq: Callable[[int], None]
    kick: Callable[[], None]
    set_armed: Callable[[int, bool], None] = no_armed_lines
    console: Callable[[bytes | memoryview], None] = no_console
    device: Callable[[str], Any] = no_devices
    pause: Callable[[str], None] = no_pause
    on_resume: Callable[[Callable[[], None]], None] = no_resume


@runtime_checkable
class StatefulDevice(Protocol):
    """A device model with the state interface every labkit device has."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...

    def reset(self) -> None: ...

    def save(self) -> Any: ...

    def restore(self, state: Any) -> None: ...


@dataclass(frozen=True)
class DeviceSpec:
    """A device to build into a machine: ``factory(context)`` returns it, placed at ``[base, base + length)``.

    ``name`` identifies it for ``Machine.device_state(name)`` and in error
    messages; ``bus`` is ``"pio"`` (I/O ports) or ``"mmio"`` (guest-physical
    addresses with no RAM behind them).
    """

    name: str
    bus: str
    base: int
    length: int
    factory: Callable[[DeviceContext], Any]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"a device's name must be a non-empty string, not {self.name!r}")
        if self.bus not in BUSES:
            raise ConfigError(f"device {self.name!r}: bus must be 'pio' or 'mmio', not {self.bus!r}")
        for field_name in ("base", "length"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"device {self.name!r}: {field_name} must be a whole number, not {value!r}")
        if not callable(self.factory):
            raise ConfigError(f"device {self.name!r}: factory must be callable as factory(context), "
                              f"not {type(self.factory).__name__}")
