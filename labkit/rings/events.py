"""The ``rings64`` guest's ring-transition events, read back from the exit trace.

A ring transition (an exception, ``int n``, ``syscall``, ``iretq``) is not a
VM exit.  So the ``rings64`` kernel (``guests/rings64.S``) reports each one
itself: four 4-byte MMIO writes to ``EVENT_BASE`` (above guest RAM, so each
write is an MMIO exit on both backends)::

    +0   RIP of the event (low 32 bits)
    +4   error code (#GP, #PF), or the exit code for "exit"
    +8   CR2 (low 32 bits; #PF only)
    +12  event word: kind << 16 | from_cpl << 8 | vector      (written last)

Kinds: 1 entry through the IDT (an exception or ``int n``), 2 ``syscall``,
3 return to ring 3, 4 kernel start, 5 task exit.  MMIO rather than a port
because under PVM (kvm_pvm) the ``syscall`` entry runs in PVM's own
supervisor mode, where port I/O raises #GP.

The RIP is the one the CPU saved (SDM vol. 3, 6.5): a fault's is the
faulting instruction, a trap's (``int 0x80`` through its gate, ``syscall``,
and the exit, which is an ``int 0x80``) the instruction after it; see
:attr:`RingEvent.is_trap` and :func:`instruction_of`.  A return is reported
just before the kernel's ``iretq`` or ``sysretq``; when the next report is an
entry from ring 0, that return faulted and the task never ran
(:attr:`RingEvent.completed` is False): under PVM the kernel's ``sysretq``
raises #GP, whose frame carries the user CS although the kernel ran it.

:func:`ring_events` decodes the events from any run's :class:`ExitTrace`, so
they survive the emulation backend's worker process; :class:`EventSink` is the
device that accepts the writes (it keeps nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Mapping

from labkit.errors import ConfigError
from labkit.exits import ExitReason
from labkit.vmm.status import exception_name
from labkit.trace import ExitTrace
from labkit.x86 import paging
from labkit.x86.arch import Vector

if TYPE_CHECKING:
    from labkit.guest import Guest
    from labkit.vmm.machine import Machine
    from labkit.vmm.status import RunResult

EVENT_BASE = 0x1000_0000
EVENT_SIZE = 16
KIND_ENTRY, KIND_SYSCALL, KIND_RETURN, KIND_START, KIND_EXIT = 1, 2, 3, 4, 5
KINDS = {KIND_ENTRY: "entry", KIND_SYSCALL: "syscall", KIND_RETURN: "return",
         KIND_START: "start", KIND_EXIT: "exit"}
TRAP_VECTOR = 0x80
"""The kernel's system-call gate (``int 0x80``, DPL 3)."""
TRAP_INSTRUCTIONS = {"syscall": bytes.fromhex("0f05"), "int 0x80": bytes.fromhex("cd80")}
"""The encodings that make a trap event; each ends at the RIP the CPU saved."""
EXPERIMENTS_START = "# >>> experiments"
EXPERIMENTS_END = "# <<< experiments"


class EventSink:
    """The MMIO device at ``EVENT_BASE``: accepts the kernel's event writes, reads as 0.

    The events are decoded from the exit trace (:func:`ring_events`), which
    every run returns, rather than kept here: on the emulation backend this
    device lives in the worker process.
    """

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass

    def reset(self) -> None:
        """Nothing to reset: the sink keeps no state."""

    def save(self) -> dict[str, int]:
        """The sink's state: none (the events live in the exit trace)."""
        return {}

    def restore(self, state: Mapping[str, int]) -> None:
        if state:
            raise ConfigError(f"the ring event sink keeps no state, but was given {dict(state)!r}")


@dataclass(frozen=True)
class RingEvent:
    """One ring transition the kernel reported."""

    seq: int
    kind: str
    """``entry``, ``syscall``, ``return``, ``start`` or ``exit`` (see the module docstring)."""
    vector: int
    from_cpl: int
    rip: int
    error_code: int
    cr2: int
    exit_seq: int
    """Index in the exit trace of the event word's MMIO exit."""
    host_ns: int
    """Host time from the start of the run to that exit."""
    completed: bool = True
    """For a return: the task ran in ring 3 after it (False when the next report is an entry from ring 0)."""

    @property
    def cpl_after(self) -> int:
        """The ring the CPU is in after the event: 3 after a completed return, else 0."""
        return 3 if self.kind == "return" and self.completed else 0

    @property
    def is_trap(self) -> bool:
        """The saved RIP is the instruction *after* the one that caused the event (a trap, SDM vol. 3, 6.5).

        True for ``int 0x80`` through its gate, ``syscall`` and the exit (an
        ``int 0x80``); False for faults (#GP, #PF, #UD: the faulting
        instruction) and for the kernel's own start and returns.
        """
        return self.kind in ("syscall", "exit") or (self.kind == "entry" and self.vector == TRAP_VECTOR)

    @property
    def label(self) -> str:
        if self.kind == "start":
            return "kernel start"
        if self.kind == "return":
            return "return to ring 3" if self.completed else "return to ring 3 failed (next entry from ring 0)"
        if self.kind == "exit":
            return f"exit({self.error_code}) from ring {self.from_cpl}"
        if self.kind == "syscall":
            return f"syscall from ring {self.from_cpl}"
        if self.vector == 0x80:
            return f"int 0x80 from ring {self.from_cpl}"
        short = exception_name(self.vector).split(" ")[0]
        if self.vector == Vector.PF:
            return f"{short} (error {self.error_code:#x}, cr2 {self.cr2:#x}) from ring {self.from_cpl}"
        if self.vector == Vector.GP:
            return f"{short} (error {self.error_code:#x}) from ring {self.from_cpl}"
        return f"{short} from ring {self.from_cpl}"

    @property
    def short_label(self) -> str:
        """A few characters for a figure: ``#GP``, ``#PF 0x5``, ``int 0x80``, ``syscall``."""
        if self.kind == "syscall":
            return "syscall"
        if self.kind != "entry":
            return self.kind
        if self.vector == 0x80:
            return "int 0x80"
        short = exception_name(self.vector).split(" ")[0]
        return f"{short} {self.error_code:#x}" if self.vector == Vector.PF else short


def ring_events(run: ExitTrace | RunResult) -> list[RingEvent]:
    """The events in a run's :class:`labkit.ExitTrace` (or :class:`labkit.RunResult`), in order."""
    trace = run if isinstance(run, ExitTrace) else run.trace
    mmio = int(ExitReason.MMIO)
    fields: dict[int, int] = {}
    events: list[RingEvent] = []
    elapsed = 0
    for index, record in enumerate(trace.records):
        reason, _rip, address, _size, is_write, data, host_ns = record
        elapsed += host_ns
        if reason != mmio or not is_write or not EVENT_BASE <= address < EVENT_BASE + EVENT_SIZE:
            continue
        offset = address - EVENT_BASE
        fields[offset] = data
        if offset != 12:
            continue
        word = data
        events.append(RingEvent(
            seq=len(events), kind=KINDS.get(word >> 16 & 0xFF, f"kind {word >> 16 & 0xFF}"),
            vector=word & 0xFF, from_cpl=word >> 8 & 3, rip=fields.get(0, 0), error_code=fields.get(4, 0),
            cr2=fields.get(8, 0), exit_seq=index, host_ns=elapsed,
        ))
        fields.clear()
    for index, (event, following) in enumerate(zip(events, events[1:])):
        if event.kind == "return" and following.kind == "entry" and following.from_cpl == 0:
            events[index] = replace(event, completed=False)
    return events


def instruction_of(event: RingEvent, code: bytes, load_address: int) -> tuple[int, str] | None:
    """The address and text of the instruction that caused ``event``, from the guest's ``code``.

    A fault's RIP is that instruction; a trap's (:attr:`RingEvent.is_trap`) is
    the one after it, so the instruction is the ``int 0x80`` or ``syscall``
    whose encoding ends at the RIP, checked byte for byte.  A return gives
    where the task resumes, the kernel start its first instruction.  None when
    the address is outside ``code`` or the bytes before a trap's RIP are not
    an ``int 0x80`` or ``syscall``.
    """
    from labkit.x86.disasm import disassemble

    address = event.rip
    if event.is_trap:
        end = event.rip - load_address
        lengths = [len(encoding) for encoding in TRAP_INSTRUCTIONS.values()
                   if end >= len(encoding) and code[end - len(encoding):end] == encoding]
        if not lengths:
            return None
        address = event.rip - lengths[0]
    offset = address - load_address
    if not 0 <= offset < len(code):
        return None
    decoded = disassemble(code[offset:offset + 15], address, 64, count=1)
    return (address, decoded[0][2]) if decoded else None


def decode_page_fault_error(error_code: int) -> str:
    """The #PF error code in words (Intel SDM vol. 3, 4.7): ``P=1 protection violation, W/R=1 write, U/S=1 user``."""
    if isinstance(error_code, bool) or not isinstance(error_code, int) or error_code < 0:
        raise ConfigError(f"a #PF error code is a non-negative integer, not {error_code!r}")
    parts = [
        "P=1 protection violation" if error_code & paging.PF_PRESENT else "P=0 page not present",
        "W/R=1 write" if error_code & paging.PF_WRITE else "W/R=0 read",
        "U/S=1 from user mode (ring 3)" if error_code & paging.PF_USER else "U/S=0 from supervisor mode",
    ]
    if error_code & paging.PF_RESERVED:
        parts.append("RSVD=1 reserved bit set")
    if error_code & paging.PF_FETCH:
        parts.append("I/D=1 instruction fetch")
    return ", ".join(parts)


@lru_cache(maxsize=1)
def _source() -> str:
    from labkit.guest import guests_dir, load_manifest

    entry = next(entry for entry in load_manifest() if entry["name"] == "rings64")
    return (guests_dir() / entry["source"]).read_text()


def rings_guest(experiments: str | None = None) -> Guest:
    """The ``rings64`` guest; with ``experiments``, rebuilt with that ring-3 code in place of the shipped one.

    ``experiments`` is GNU as source run by the task in ring 3 before it exits.
    Before an instruction that should fault, set r15 to where the kernel
    should resume (``lea r15, [rip + 1f]`` ... ``1:``).  Names it may use:
    ``SECRET`` (a supervisor page), ``READ_ONLY`` (a read-only page),
    ``message``/``message_end``.  Needs GNU binutils; raises AssemblyError
    with the assembler's message.
    """
    from labkit.assembler import splice
    from labkit.guest import Guest

    if experiments is None:
        return Guest.named("rings64")
    if not isinstance(experiments, str):
        raise ConfigError(f"experiments must be assembly source text, not {type(experiments).__name__}")
    source = _source()
    start, end = source.index(EXPERIMENTS_START), source.index(EXPERIMENTS_END)
    start = source.index("\n", start) + 1
    spliced, insertion = splice(source, start, end, experiments, "your task")
    return Guest.from_asm(spliced, mode=64, name="rings64 (your task)", insertion=insertion)


def rings_machine(guest: Guest | None = None, backend: str = "auto") -> Machine:
    """A :class:`labkit.Machine` for ``guest`` (default: ``rings64``) with the event sink at ``EVENT_BASE``."""
    from labkit.vmm.devices import DeviceSpec
    from labkit.vmm.machine import Machine

    sink = DeviceSpec("ring-events", "mmio", EVENT_BASE, EVENT_SIZE, lambda context: EventSink())
    return Machine(guest if guest is not None else rings_guest(), backend=backend, devices=[sink])


def run_rings(backend: str = "auto", experiments: str | None = None, timeout: float = 5.0) -> RunResult:
    """Run ``rings64`` (or its variant with ``experiments``) on ``backend``; returns the RunResult."""
    with rings_machine(rings_guest(experiments), backend) as machine:
        return machine.run(timeout=timeout)
