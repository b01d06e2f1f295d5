"""KVM's exit controls: what KVM handles in the kernel, and what reaches labkit in userspace.

A :class:`KvmExitControls` is given to a machine on KVM
(``Machine(guest, backend="kvm", kvm_controls=KvmExitControls(...))``); the
emulator has no such controls and refuses it with a :class:`ConfigError`.
Each control is one KVM interface (Documentation/virt/kvm/api.rst):

==========================  ===================================================  ===========================
control                     KVM interface                                        what changes
==========================  ===================================================  ===========================
``disable_exits=("hlt",)``  ``KVM_CAP_X86_DISABLE_EXITS`` (VM, before vCPUs)     VT-x/AMD-V stop intercepting
                                                                                 ``hlt``: the CPU halts in
                                                                                 guest mode until an interrupt
``msrs=(UserMsr(i),)``      ``KVM_CAP_X86_USER_SPACE_MSR`` (reason ``FILTER``)   ``rdmsr``/``wrmsr`` of MSR
                            + ``KVM_X86_SET_MSR_FILTER`` (one denying range      ``i`` exit to userspace as
                            per MSR)                                             ``KVM_EXIT_X86_RDMSR``/``WRMSR``;
                                                                                 labkit's handler answers
``coalesced=(zone,)``       ``KVM_REGISTER_COALESCED_MMIO`` (``pio`` for ports)  writes to the zone go into a
                                                                                 ring page, no exit each;
                                                                                 reads still exit
``ioeventfds=(IoEventFd,)`` ``KVM_IOEVENTFD``                                     a matching write signals an
                                                                                 eventfd in the kernel; no
                                                                                 exit to userspace
==========================  ===================================================  ===========================

labkit still delivers every write the kernel kept: at each return of
``KVM_RUN`` (before the exit that ended it is handled, so order with that exit
is kept) it drains the coalesced ring, oldest first, and reads each eventfd,
and hands those writes to the devices on the bus as if they had exited.  What
KVM does not record is the order *between* a coalesced write and an eventfd
notification that both happened before the same exit: labkit delivers the ring
first.

Which counts change, and on which KVM flavour, is in ``tests/kvm/test_kvm_controls.py``
and notebook 05.  Under PVM (``kvm_pvm``) labkit's ring-0 guest code is run by
KVM's instruction emulator, never by the CPU in a guest mode, so there is no
hardware ``hlt`` intercept to switch off: ``disable_exits=("hlt",)`` is accepted
and changes nothing (with no in-kernel local APIC the emulated ``hlt`` still
goes to userspace).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from labkit.errors import ConfigError, KvmError
from labkit.kvm import bindings as kb

DISABLE_EXITS = {
    "mwait": kb.KVM_X86_DISABLE_EXITS_MWAIT,
    "hlt": kb.KVM_X86_DISABLE_EXITS_HLT,
    "pause": kb.KVM_X86_DISABLE_EXITS_PAUSE,
    "cstate": kb.KVM_X86_DISABLE_EXITS_CSTATE,
}
"""Names for ``KvmExitControls.disable_exits`` and their ``KVM_X86_DISABLE_EXITS_*`` bits."""

PORT_LIMIT = 0x10000
PIO_SIZES = (1, 2, 4)
MMIO_SIZES = (1, 2, 4, 8)
INDEX_LIMIT = 1 << 32  # an MSR index is 32 bits (ECX)


def _check_int(what: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
        raise ConfigError(f"{what} must be an int in [{low:#x}, {high:#x}), not {value!r}")
    return value


class MsrHandler(Protocol):
    """Answers the guest's ``rdmsr``/``wrmsr`` of one MSR that KVM sent to userspace.

    ``read`` returns the 64-bit value, or ``None`` to raise #GP in the guest;
    ``write`` returns ``False`` to raise #GP.  Like every device: ``reset``,
    ``save`` (plain data) and ``restore``.
    """

    def read(self) -> int | None: ...

    def write(self, value: int) -> bool: ...

    def reset(self) -> None: ...

    def save(self) -> dict[str, Any]: ...

    def restore(self, state: dict[str, Any]) -> None: ...


class MsrRegister:
    """labkit's default MSR handler: a 64-bit register that reads back what was written, counting both."""

    def __init__(self, initial: int = 0):
        self.initial = initial & 0xFFFF_FFFF_FFFF_FFFF
        self.reset()

    def reset(self) -> None:
        self.value = self.initial
        self.reads = 0
        self.writes = 0

    def read(self) -> int | None:
        self.reads += 1
        return self.value

    def write(self, value: int) -> bool:
        self.writes += 1
        self.value = value & 0xFFFF_FFFF_FFFF_FFFF
        return True

    def save(self) -> dict[str, Any]:
        return {"value": self.value, "reads": self.reads, "writes": self.writes}

    def restore(self, state: dict[str, Any]) -> None:
        self.value, self.reads, self.writes = int(state["value"]), int(state["reads"]), int(state["writes"])


@dataclass(frozen=True)
class UserMsr:
    """An MSR whose ``rdmsr`` (``read``) and/or ``wrmsr`` (``write``) KVM sends to labkit.

    ``handler`` builds the object that answers (default: :class:`MsrRegister`
    starting at ``initial``); it is built where the machine's core runs, and its
    state is ``Machine.device_state(f"msr {index:#x}")``.  KVM ignores the filter
    for a few MSRs it always handles itself (the x2APIC range 0x800-0x8ff).
    """

    index: int
    read: bool = True
    write: bool = True
    initial: int = 0
    handler: Callable[[], MsrHandler] | None = None

    def __post_init__(self) -> None:
        _check_int("UserMsr index", self.index, 0, INDEX_LIMIT)
        _check_int(f"UserMsr {self.index:#x} initial value", self.initial, 0, 1 << 64)
        if not (self.read or self.write):
            raise ConfigError(f"UserMsr {self.index:#x} sends neither reads nor writes to userspace")
        if self.handler is not None and not callable(self.handler):
            raise ConfigError(f"UserMsr {self.index:#x}: handler must build an MsrHandler, not {self.handler!r}")

    @property
    def name(self) -> str:
        """The handler's device name: ``msr 0xc0000103``."""
        return f"msr {self.index:#x}"

    def build(self) -> MsrHandler:
        return MsrRegister(self.initial) if self.handler is None else self.handler()


@dataclass(frozen=True)
class CoalescedZone:
    """Guest writes to ``[address, +length)`` (ports when ``pio``) batched by KVM in the coalesced ring."""

    address: int
    length: int
    pio: bool = False

    def __post_init__(self) -> None:
        limit = PORT_LIMIT if self.pio else 1 << 64
        _check_int("coalesced zone address", self.address, 0, limit)
        _check_int("coalesced zone length", self.length, 1, limit - self.address + 1)

    def __str__(self) -> str:
        space = "ports" if self.pio else "MMIO"
        return f"coalesced {space} [{self.address:#x}, +{self.length:#x})"


@dataclass(frozen=True)
class IoEventFd:
    """A guest write of ``length`` bytes of value ``datamatch`` to ``address`` (a port when ``pio``)
    that KVM turns into an eventfd signal in the kernel instead of an exit.

    ``datamatch`` is required: KVM does not record the value written, so labkit
    delivers each notification to the device as a write of ``datamatch`` (for a
    virtqueue's notify port, the queue index).  Writes of other values exit as usual.
    """

    address: int
    length: int
    datamatch: int
    pio: bool = True

    def __post_init__(self) -> None:
        sizes = PIO_SIZES if self.pio else MMIO_SIZES
        _check_int("ioeventfd address", self.address, 0, PORT_LIMIT if self.pio else 1 << 64)
        if self.length not in sizes or isinstance(self.length, bool):
            raise ConfigError(f"ioeventfd length must be one of {sizes} for {'ports' if self.pio else 'MMIO'}, "
                              f"not {self.length!r}")
        _check_int("ioeventfd datamatch", self.datamatch, 0, 1 << (8 * self.length))

    def __str__(self) -> str:
        where = f"port {self.address:#x}" if self.pio else f"MMIO {self.address:#x}"
        return f"ioeventfd {where}/{self.length} == {self.datamatch:#x}"


@dataclass(frozen=True)
class KvmExitControls:
    """KVM's exit controls for one machine; the default changes nothing.  See the module docstring."""

    disable_exits: tuple[str, ...] = ()
    """Instructions that stop exiting: any of ``"hlt"``, ``"pause"``, ``"mwait"``, ``"cstate"``."""
    msrs: tuple[UserMsr, ...] = ()
    coalesced: tuple[CoalescedZone, ...] = ()
    ioeventfds: tuple[IoEventFd, ...] = ()

    def __post_init__(self) -> None:
        for name in ("disable_exits", "msrs", "coalesced", "ioeventfds"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise ConfigError(f"KvmExitControls.{name} must be a tuple, not {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name in self.disable_exits:
            if name not in DISABLE_EXITS:
                raise ConfigError(f"cannot disable {name!r} exits: choose from {', '.join(DISABLE_EXITS)}")
        for kind, items in ((UserMsr, self.msrs), (CoalescedZone, self.coalesced), (IoEventFd, self.ioeventfds)):
            for item in items:
                if not isinstance(item, kind):
                    raise ConfigError(f"expected a {kind.__name__}, not {item!r}")
        indices = [msr.index for msr in self.msrs]
        if len(set(indices)) != len(indices):
            raise ConfigError(f"an MSR is listed twice in KvmExitControls.msrs: {indices}")
        if len(indices) > kb.KVM_MSR_FILTER_MAX_RANGES:
            raise ConfigError(f"at most {kb.KVM_MSR_FILTER_MAX_RANGES} MSRs go to userspace "
                              f"(one KVM_X86_SET_MSR_FILTER range each), not {len(indices)}")

    @property
    def disable_exits_flags(self) -> int:
        flags = 0
        for name in self.disable_exits:
            flags |= DISABLE_EXITS[name]
        return flags

    def describe(self) -> tuple[str, ...]:
        """One line per control in force, e.g. ``("hlt exits disabled", "ioeventfd port 0xf6/1 == 0x0")``."""
        lines = [f"{name} exits disabled" for name in self.disable_exits]
        lines += [f"rdmsr/wrmsr {msr.index:#x} to userspace" for msr in self.msrs]
        lines += [str(zone) for zone in self.coalesced] + [str(event) for event in self.ioeventfds]
        return tuple(lines)

    def __bool__(self) -> bool:
        return bool(self.disable_exits or self.msrs or self.coalesced or self.ioeventfds)


CONTROL_CAPABILITIES: Mapping[str, tuple[tuple[str, int], ...]] = {
    "disable_exits": (("KVM_CAP_X86_DISABLE_EXITS", kb.KVM_CAP_X86_DISABLE_EXITS),),
    "msrs": (("KVM_CAP_X86_USER_SPACE_MSR", kb.KVM_CAP_X86_USER_SPACE_MSR),
             ("KVM_CAP_X86_MSR_FILTER", kb.KVM_CAP_X86_MSR_FILTER)),
    "coalesced_mmio": (("KVM_CAP_COALESCED_MMIO", kb.KVM_CAP_COALESCED_MMIO),),
    "coalesced_pio": (("KVM_CAP_COALESCED_PIO", kb.KVM_CAP_COALESCED_PIO),),
    "ioeventfds": (("KVM_CAP_IOEVENTFD", kb.KVM_CAP_IOEVENTFD),),
}
"""Each control and the capabilities ``KVM_CHECK_EXTENSION`` must report for it."""


def missing_capabilities(check_extension: Callable[[int], int], controls: KvmExitControls) -> list[str]:
    """Why ``controls`` cannot be applied here, one line per missing capability (empty: all offered)."""
    wanted: list[str] = []
    if controls.disable_exits:
        wanted.append("disable_exits")
    if controls.msrs:
        wanted.append("msrs")
    if any(not zone.pio for zone in controls.coalesced):
        wanted.append("coalesced_mmio")
    if any(zone.pio for zone in controls.coalesced):
        wanted.append("coalesced_pio")
    if controls.ioeventfds:
        wanted.append("ioeventfds")
    problems = []
    for control in wanted:
        for cap_name, cap in CONTROL_CAPABILITIES[control]:
            offered = check_extension(cap)
            if not offered:
                problems.append(f"{control} needs {cap_name}, which this KVM does not offer")
            elif control == "disable_exits" and offered & controls.disable_exits_flags != controls.disable_exits_flags:
                names = [name for name, bit in DISABLE_EXITS.items() if bit & offered]
                problems.append(f"KVM_CAP_X86_DISABLE_EXITS offers {', '.join(names) or 'nothing'} here, "
                                f"not {', '.join(controls.disable_exits)}")
    return problems


def control_support() -> dict[str, str | None]:
    """For each control (``disable_exits`` meaning HLT, ``msrs``, ``coalesced_mmio``, ``coalesced_pio``,
    ``ioeventfds``): ``None`` when this host's KVM offers it, else why not.  Never raises."""
    from labkit.kvm.system import Kvm

    samples = {
        "disable_exits": KvmExitControls(disable_exits=("hlt",)),
        "msrs": KvmExitControls(msrs=(UserMsr(0xC0000103),)),
        "coalesced_mmio": KvmExitControls(coalesced=(CoalescedZone(0x1000_0000, 0x1000),)),
        "coalesced_pio": KvmExitControls(coalesced=(CoalescedZone(0x10, 1, pio=True),)),
        "ioeventfds": KvmExitControls(ioeventfds=(IoEventFd(0x10, 1, 0),)),
    }
    try:
        with Kvm() as kvm:
            return {name: "; ".join(missing_capabilities(kvm.check_extension, sample)) or None
                    for name, sample in samples.items()}
    except (KvmError, OSError, ConfigError) as error:
        return {name: f"KVM is not usable here: {error}" for name in samples}
    except Exception as error:  # noqa: BLE001 - BackendUnavailable and the like: report, never raise
        return {name: f"KVM is not usable here: {error}" for name in samples}


def msr_filter_ranges(msrs: tuple[UserMsr, ...]) -> list[tuple[int, int, int, bytes]]:
    """``KVM_X86_SET_MSR_FILTER`` ranges sending exactly ``msrs`` to userspace: one range of one MSR per
    MSR with its bit clear (denied), flags ``READ``/``WRITE`` as chosen; every other MSR is allowed."""
    ranges = []
    for msr in msrs:
        flags = (kb.KVM_MSR_FILTER_READ if msr.read else 0) | (kb.KVM_MSR_FILTER_WRITE if msr.write else 0)
        ranges.append((flags, msr.index, 1, b"\x00"))
    return ranges

