"""Paravirtualization: a kernel that knows it is virtualized calls the hypervisor instead.

Xen's answer to x86 not being classically virtualizable (Popek and Goldberg;
Robin and Irvine: ``pushf``, ``popf``, ``sgdt``, ``smsw`` ... are sensitive but
do not trap in ring 3) was to change the guest kernel's source: it runs
deprivileged and replaces every privileged or sensitive instruction with a
*hypercall*, a deliberate, cheap entry into the hypervisor with the operation
and its arguments, like a system call one level down.  ``guests/pvkernel64.S``
is ``minikernel64``'s routines rewritten that way; :class:`Paravirtual` is its
hypervisor, a labkit monitor (:mod:`labkit.vmm.forwarding`), and
:func:`run_paravirtual` runs it.

The hypercall ABI
-----------------

The instruction is ``int 4`` from ring 3 (why not ``syscall``, ``vmcall``,
``int 0x82`` or a port: DECISIONS.md, "Hypercall instruction").  Number in RAX,
arguments in RDI, RSI, RDX, R10, R8 (Xen's x86-64 registers), the result in
RAX; every other register is kept.  A result in -4095..-1 is a negative errno
(Linux's numbers, as Xen's).  Numbers follow Xen's where Xen has the call; Xen
keeps the interrupt mask and CR2 in shared memory instead (``vcpu_info``), this
ABI has calls for them, in Xen's architecture-specific range 48-55::

    nr  name                   arguments                    result         replaces
    0   set_trap_table         idt, limit                   0              lidt
    2   set_gdt                gdt, limit                   0              lgdt
    5   fpu_taskswitch         set (0 or 1)                 0              mov cr0 (TS), clts
    13  multicall              entries, count               0              (a batch: see below)
    17  version                -                            0x10000 (1.0)  (probe)
    18  console_io             cmd (0 = write), count, buf  count          out to the UART
    23  iret                   - ([rsp]: RAX, RIP, CS,      does not       iretq
                               RFLAGS, RSP, SS)             return
    26  mmuext_op              op (5 new_baseptr: arg =     0              mov cr3
                               PML4; 6 tlb_flush_local)
    29  sched_op               cmd (0 yield, 1 block,       0; block and   hlt
                               2 shutdown: arg = reason)    shutdown end
                                                            the run
    48  irq_disable            -                            previous IF    cli
    49  irq_enable             -                            previous IF    sti
    50  irq_restore            flag (0 or 1)                0              popf
    51  irq_query              -                            IF (0 or 1)    pushf
    52  get_descriptor_table   which (0 GDT, 1 IDT), buf    0; buf = limit sgdt, sidt
                                                            (2 bytes), base (8)
    53  read_cr                n (0, 2, 3, 4)               CRn            mov from crN, smsw

Errors: ``-ENOSYS`` (38) an unknown number; ``-EFAULT`` (14) an address or
range outside guest RAM (the console buffer, a descriptor table, the multicall
entries, the iret frame, get_descriptor_table's buffer); ``-EINVAL`` (22) an
argument out of range (an unknown command or op, a flag other than 0/1, a
length over :data:`MAX_CONSOLE_WRITE`, a limit that is no whole number of
descriptors, a descriptor table the hypervisor refuses: a non-null first GDT
entry, a system descriptor (TSS, LDT, gate) in the GDT, an IDT gate that is no
interrupt/trap gate or whose handler lies outside RAM; an iret to a CS that is
not the kernel's; a multicall entry that is itself a multicall or an iret);
``-E2BIG`` (7) a multicall of more than :data:`MAX_MULTICALL` entries.  Every
call, good or bad, is counted (:attr:`ParavirtualReport.hypercalls`,
``.errors``); a bad one changes nothing and the kernel continues.

Multicall (Xen's ``multicall_entry``): ``entries`` points at ``count``
entries of 64 bytes, ``op, result, args[6]`` (quadwords).  The hypervisor runs
them in order on one entry and writes each one's result into its ``result``
field; the call itself returns 0 (or -EFAULT, -E2BIG without running any).

What the hypervisor does besides: it *bounces* the kernel's own exceptions
(its ``ud2``, its page faults) into the trap table the kernel registered, with
the frame a CPU at virtual CPL 0 pushes (:func:`labkit.monitor.vcpu.reflect`)
and the faulting address in the virtual CR2; the handler returns with the
``iret`` hypercall.  A #PF's error code has its U/S bit cleared (the fault
came from the kernel, even though the CPU ran it in ring 3).  A privileged or
sensitive instruction that traps anyway is counted in ``traps`` and ends the
run with status ``error``: a paravirtual kernel must not execute one.

Simplifications, as in the trap-and-emulate monitor: the descriptor tables
and CR3 are virtual state (the real CPU keeps labkit's GDT, IDT and page
tables, so set_gdt cannot be a way into ring 0: it is checked as Xen checks
one all the same); there are no event channels, so a kernel that blocks ends
the run (status ``halted``, as ``hlt`` with nothing to wake it).
"""

from __future__ import annotations

import errno
import struct
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from labkit.errors import ConfigError, LabkitError
from labkit.monitor.vcpu import (PF_USER, PRIVILEGED, Decoded, VirtualCpu, VirtualTripleFault, decode, has_error_code,
                                 reflect)
from labkit.monitor.vcpu.emulation import RFLAGS_GUEST_SETTABLE
from labkit.vmm.forwarding import GuestContext, Trap
from labkit.vmm.status import RunResult, Status, StatusKind, exception_name
from labkit.x86 import layout
from labkit.x86.arch import CR0_TS, INTERRUPT_GATE, RFLAGS_IF, TRAP_GATE, Vector
from labkit.x86.disasm import MAX_INSTRUCTION

if TYPE_CHECKING:
    from labkit.guest import Guest

HYPERCALL_VECTOR = 4
"""``int 4`` from ring 3 is the hypercall (vector 4 keeps its DPL-3 gate under a monitor)."""
HYPERCALL_INSTRUCTION = b"\xcd\x04"
PV_ABI_VERSION = 0x10000
"""What ``version`` returns: 1.0, as ``(major << 16) | minor``."""
MAX_MULTICALL = 32
"""Most entries one multicall may carry; more is -E2BIG."""
MULTICALL_ENTRY = struct.Struct("<QqQQQQQQ")
"""Xen's ``multicall_entry``: op, result, args[6]."""
MAX_CONSOLE_WRITE = 4096
"""Longest buffer one console_io write may pass; longer is -EINVAL."""
MAX_EVENTS = 4096

CONSOLEIO_WRITE = 0
MMUEXT_NEW_BASEPTR = 5
MMUEXT_TLB_FLUSH_LOCAL = 6
SCHEDOP_YIELD, SCHEDOP_BLOCK, SCHEDOP_SHUTDOWN = 0, 1, 2
SHUTDOWN_POWEROFF, SHUTDOWN_REBOOT, SHUTDOWN_SUSPEND, SHUTDOWN_CRASH = 0, 1, 2, 3
DESCRIPTOR_TABLES = ("gdt", "idt")
READABLE_CRS = (0, 2, 3, 4)
IRET_FRAME = struct.Struct("<6Q")
"""What the iret hypercall pops: RAX, RIP, CS, RFLAGS, RSP, SS."""


class Hypercall(IntEnum):
    """The hypercall numbers (see the module docstring); names are what the counters show."""

    SET_TRAP_TABLE = 0
    SET_GDT = 2
    FPU_TASKSWITCH = 5
    MULTICALL = 13
    VERSION = 17
    CONSOLE_IO = 18
    IRET = 23
    MMUEXT_OP = 26
    SCHED_OP = 29
    IRQ_DISABLE = 48
    IRQ_ENABLE = 49
    IRQ_RESTORE = 50
    IRQ_QUERY = 51
    GET_DESCRIPTOR_TABLE = 52
    READ_CR = 53

    @property
    def label(self) -> str:
        return self.name.lower()


REPLACES = {
    Hypercall.SET_TRAP_TABLE: "lidt", Hypercall.SET_GDT: "lgdt", Hypercall.FPU_TASKSWITCH: "mov cr0 / clts",
    Hypercall.MULTICALL: "(a batch)", Hypercall.VERSION: "(probe)", Hypercall.CONSOLE_IO: "in/out to the UART",
    Hypercall.IRET: "iretq", Hypercall.MMUEXT_OP: "mov cr3", Hypercall.SCHED_OP: "hlt",
    Hypercall.IRQ_DISABLE: "cli", Hypercall.IRQ_ENABLE: "sti", Hypercall.IRQ_RESTORE: "popf",
    Hypercall.IRQ_QUERY: "pushf", Hypercall.GET_DESCRIPTOR_TABLE: "sgdt, sidt", Hypercall.READ_CR: "mov from crN, smsw",
}
"""The instruction(s) of a native kernel that each hypercall stands for."""
ARGUMENTS = {
    Hypercall.SET_TRAP_TABLE: 2, Hypercall.SET_GDT: 2, Hypercall.FPU_TASKSWITCH: 1, Hypercall.MULTICALL: 2,
    Hypercall.VERSION: 0, Hypercall.CONSOLE_IO: 3, Hypercall.IRET: 0, Hypercall.MMUEXT_OP: 2, Hypercall.SCHED_OP: 2,
    Hypercall.IRQ_DISABLE: 0, Hypercall.IRQ_ENABLE: 0, Hypercall.IRQ_RESTORE: 1, Hypercall.IRQ_QUERY: 0,
    Hypercall.GET_DESCRIPTOR_TABLE: 2, Hypercall.READ_CR: 1,
}
"""How many argument registers each hypercall reads (RDI, RSI, RDX, R10, R8 in that order)."""
NOT_BATCHABLE = frozenset({Hypercall.MULTICALL, Hypercall.IRET})
"""Entries a multicall refuses with -EINVAL: a nested batch, and iret (it does not return)."""


class _Refused(Exception):
    """A hypercall's argument is bad: the guest gets ``-errno``."""

    def __init__(self, number: int, why: str):
        super().__init__(why)
        self.errno = number


def _u64(value: int) -> int:
    return value & 0xFFFF_FFFF_FFFF_FFFF


def error_result(number: int) -> int:
    """``-number`` as the 64-bit value the guest reads in RAX."""
    return _u64(-number)


def is_error(result: int) -> bool:
    """Whether a hypercall's 64-bit result is a negative errno (-4095..-1)."""
    return _u64(result) >= _u64(-4095)


@dataclass(frozen=True)
class HypercallEvent:
    """One hypercall: its number and name, the arguments it takes, its result (``-errno`` on error), whether
    it was batched, and the host time it took (a multicall's includes its entries')."""

    number: int
    name: str
    args: tuple[int, ...]
    result: int | None
    """None for a successful iret (it does not return a value)."""
    batched: bool
    monitor_ns: int
    error: str = ""


@dataclass
class ParavirtualSummary:
    """What :meth:`Paravirtual.summary` returns with the run (``RunResult.monitor``); it pickles."""

    hypercalls: Counter[str]
    """Hypervisor entries by hypercall name (``multicall`` once per batch; ``unknown`` for bad numbers)."""
    batched: Counter[str]
    """Operations carried out inside multicalls, by name."""
    errors: Counter[str]
    """Refused calls as ``"name: EINVAL"`` (batched ones included)."""
    bounced: dict[int, int]
    """The kernel's own exceptions delivered to its trap table, by vector."""
    traps: int
    """Privileged or sensitive instructions that trapped (a paravirtual kernel has none)."""
    vcpu: VirtualCpu
    events: list[HypercallEvent]
    events_dropped: int
    monitor_ns: int
    stopped: str = ""

    @property
    def entries(self) -> int:
        """Entries into the hypervisor: hypercalls plus bounced exceptions and privileged traps."""
        return sum(self.hypercalls.values()) + sum(self.bounced.values()) + self.traps

    @property
    def operations(self) -> int:
        """Operations carried out: each hypercall, with a multicall counted as its entries."""
        return sum(self.hypercalls.values()) - self.hypercalls["multicall"] + sum(self.batched.values())


class Paravirtual:
    """The hypervisor of a paravirtual kernel: answers its hypercalls, bounces its exceptions.

    A :class:`labkit.monitor.Monitor`: give it to ``Machine(guest, monitor=...)``
    with the kernel started in ring 3 (``user=True``), or use :func:`run_paravirtual`.
    """

    def __init__(self, *, max_events: int = MAX_EVENTS):
        self.vcpu = VirtualCpu()
        self.hypercalls: Counter[str] = Counter()
        self.batched: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.bounced: dict[int, int] = {}
        self.traps = 0
        self.events: list[HypercallEvent] = []
        self.events_dropped = 0
        self.max_events = max_events
        self.monitor_ns = 0
        self.stopped = ""
        self._handlers: dict[int, Callable[[tuple[int, ...], Trap, GuestContext], int | None]] = {
            Hypercall.SET_TRAP_TABLE: self._set_trap_table, Hypercall.SET_GDT: self._set_gdt,
            Hypercall.FPU_TASKSWITCH: self._fpu_taskswitch, Hypercall.MULTICALL: self._multicall,
            Hypercall.VERSION: lambda args, trap, context: PV_ABI_VERSION,
            Hypercall.CONSOLE_IO: self._console_io, Hypercall.IRET: self._iret,
            Hypercall.MMUEXT_OP: self._mmuext_op, Hypercall.SCHED_OP: self._sched_op,
            Hypercall.IRQ_DISABLE: self._irq_disable, Hypercall.IRQ_ENABLE: self._irq_enable,
            Hypercall.IRQ_RESTORE: self._irq_restore, Hypercall.IRQ_QUERY: self._irq_query,
            Hypercall.GET_DESCRIPTOR_TABLE: self._get_descriptor_table, Hypercall.READ_CR: self._read_cr,
        }

    # -- the Monitor protocol ----------------------------------------------------------------

    def on_trap(self, trap: Trap, context: GuestContext) -> None:
        started = time.perf_counter_ns()
        try:
            if trap.vector == HYPERCALL_VECTOR and trap.cpl == 3 and self._is_hypercall(trap, context):
                self._hypercall(trap, context, started)
            else:
                self._exception(trap, context)
        except VirtualTripleFault as fault:
            self._stop(context, Status(StatusKind.SHUTDOWN, message=f"virtual triple fault: {fault}"))
        except LabkitError as error:  # the kernel's stack outside guest RAM while bouncing
            self._stop(context, Status(StatusKind.ERROR, message=f"at RIP {trap.regs.rip:#x}: {error}"))
        self.monitor_ns += time.perf_counter_ns() - started

    def summary(self) -> ParavirtualSummary:
        return ParavirtualSummary(Counter(self.hypercalls), Counter(self.batched), Counter(self.errors),
                                  dict(self.bounced), self.traps, self.vcpu.snapshot(), list(self.events),
                                  self.events_dropped, self.monitor_ns, self.stopped)

    # -- hypercalls ----------------------------------------------------------------------------

    @staticmethod
    def _is_hypercall(trap: Trap, context: GuestContext) -> bool:
        """``int 4`` just before RIP (vector 4 has no other source in 64-bit mode: INTO is invalid there)."""
        return context.memory.read_at_most(trap.regs.rip - 2, 2) == HYPERCALL_INSTRUCTION

    def _hypercall(self, trap: Trap, context: GuestContext, started: int) -> None:
        regs = trap.regs
        number = regs.rax
        args = (regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8)
        result = self.call(number, args, trap, context, batched=False, started=started)
        if result is not None:
            regs.rax = _u64(result)

    def call(self, number: int, args: tuple[int, ...], trap: Trap, context: GuestContext, *, batched: bool,
             started: int | None = None) -> int | None:
        """Carry out hypercall ``number`` with ``args``; its result (``-errno`` if refused), None after an iret."""
        started = time.perf_counter_ns() if started is None else started
        known = number in Hypercall._value2member_map_
        name = Hypercall(number).label if known else "unknown"
        (self.batched if batched else self.hypercalls)[name] += 1
        slot = len(self.events)  # a multicall's own event goes before those of its entries
        if slot < self.max_events:
            self.events.append(HypercallEvent(number, name, args, None, batched, 0))
        else:
            self.events_dropped += 1
        error = ""
        handler = self._handlers.get(number)
        try:
            if handler is None:
                raise _Refused(errno.ENOSYS, f"no hypercall {number}")
            if batched and number in NOT_BATCHABLE:
                raise _Refused(errno.EINVAL, f"{name} cannot be part of a multicall")
            result = handler(args, trap, context)
        except _Refused as refused:
            result = -refused.errno
            error = f"{errno.errorcode[refused.errno]}: {refused}"
            self.errors[f"{name}: {errno.errorcode[refused.errno]}"] += 1
        if slot < self.max_events:
            taken = ARGUMENTS[Hypercall(number)] if known else len(args)
            self.events[slot] = HypercallEvent(number, name, args[:taken], result, batched,
                                               time.perf_counter_ns() - started, error)
        return result

    def _multicall(self, args: tuple[int, ...], trap: Trap, context: GuestContext) -> int:
        entries, count = args[0], args[1]
        if count > MAX_MULTICALL:
            raise _Refused(errno.E2BIG, f"{count} entries; at most {MAX_MULTICALL}")
        size = MULTICALL_ENTRY.size
        if not context.memory.contains(entries, size * count):
            raise _Refused(errno.EFAULT, f"entries at {entries:#x} ({count} x {size} bytes) outside guest RAM")
        for index in range(count):
            at = entries + index * size
            op, _, *operands = MULTICALL_ENTRY.unpack(context.read(at, size))
            result = self.call(op, tuple(operands), trap, context, batched=True)
            context.write(at + 8, struct.pack("<q", result if result is not None else 0))
            if self.stopped:
                break
        return 0

    def _console_io(self, args: tuple[int, ...], trap: Trap, context: GuestContext) -> int:
        command, count, buffer = args[0], args[1], args[2]
        if command != CONSOLEIO_WRITE:
            raise _Refused(errno.EINVAL, f"console_io command {command}; only {CONSOLEIO_WRITE} (write) exists")
        if count > MAX_CONSOLE_WRITE:
            raise _Refused(errno.EINVAL, f"console_io of {count} bytes; at most {MAX_CONSOLE_WRITE}")
        if not context.memory.contains(buffer, count):
            raise _Refused(errno.EFAULT, f"console buffer {buffer:#x}+{count} outside guest RAM")
        for byte in context.read(buffer, count):
            context.pio(layout.COM1_PORT, 1, True, byte)
        return count

    def _set_gdt(self, args: tuple[int, ...], trap: Trap, context: GuestContext) -> int:
        base, limit = args[0], args[1]
        table = self._table(context, base, limit, 8, "GDT")
        descriptors = struct.unpack(f"<{len(table) // 8}Q", table)
        if descriptors[0] != 0:
            raise _Refused(errno.EINVAL, "the GDT's first descriptor must be null")
        for index, descriptor in enumerate(descriptors[1:], 1):
            if descriptor and not descriptor >> 44 & 1:  # S = 0: TSS, LDT or a gate; the hypervisor owns those
                raise _Refused(errno.EINVAL, f"GDT entry {index} ({index * 8:#x}) is a system descriptor")
        self.vcpu.gdtr = (base, limit)
        return 0

    def _set_trap_table(self, args: tuple[int, ...], trap: Trap, context: GuestContext) -> int:
        base, limit = args[0], args[1]
        table = self._table(context, base, limit, 16, "trap table")
        for vector in range(len(table) // 16):
            low, high = struct.unpack_from("<QQ", table, 16 * vector)
            if not low >> 47 & 1:
                continue
            gate_type = low >> 40 & 0xF
            handler = (low & 0xFFFF) | (low >> 48 & 0xFFFF) << 16 | (high & 0xFFFF_FFFF) << 32
            if gate_type not in (INTERRUPT_GATE, TRAP_GATE):
                raise _Refused(errno.EINVAL, f"trap table entry {vector:#x} is no interrupt or trap gate")
            if not context.memory.contains(handler, 1):
                raise _Refused(errno.EINVAL, f"trap table entry {vector:#x}: handler {handler:#x} outside guest RAM")
        self.vcpu.idtr = (base, limit)
        return 0

    @staticmethod
    def _table(context: GuestContext, base: int, limit: int, entry: int, what: str) -> bytes:
        if limit >= 1 << 16 or (limit + 1) % entry:
            raise _Refused(errno.EINVAL, f"{what} limit {limit:#x} is not a whole number of {entry}-byte entries "
                                         f"below 64 KiB")
        if not context.memory.contains(base, limit + 1):
            raise _Refused(errno.EFAULT, f"{what} at {base:#x} (limit {limit:#x}) outside guest RAM")
        return context.read(base, limit + 1)

    def _fpu_taskswitch(self, args: tuple[int, ...], trap: Trap, context: GuestContext) -> int:
        flag = self._flag(args[0], "fpu_taskswitch")
        self.vcpu.cr0 = self.vcpu.cr0 | CR0_TS if flag else self.vcpu.cr0 & ~CR0_TS
        return 0

    def _iret(self, args: tuple[int, ...], trap: Trap, context: GuestContext) -> None:
        regs = trap.regs
        if not context.memory.contains(regs.rsp, IRET_FRAME.size):
            raise _Refused(errno.EFAULT, f"iret frame at {regs.rsp:#x} outside guest RAM")
        rax, rip, cs, rflags, rsp, _ss = IRET_FRAME.unpack(context.read(regs.rsp, IRET_FRAME.size))
        if cs != self.vcpu.cs:
            raise _Refused(errno.EINVAL, f"iret to CS {cs:#x}: only the kernel's {self.vcpu.cs:#x} (no virtual user mode)")
        regs.rax, regs.rip, regs.rsp = rax, rip, rsp
        regs.rflags = regs.rflags & ~RFLAGS_GUEST_SETTABLE | rflags & RFLAGS_GUEST_SETTABLE
        self.vcpu.interrupts_enabled = bool(rflags & RFLAGS_IF)
        return None

    def _mmuext_op(self, args: tuple[int, ...], trap: Trap, context: GuestContext) -> int:
        op, argument = args[0], args[1]
        if op == MMUEXT_TLB_FLUSH_LOCAL:
            return 0
        if op != MMUEXT_NEW_BASEPTR:
            raise _Refused(errno.EINVAL, f"mmuext_op {op}; {MMUEXT_NEW_BASEPTR} (new_baseptr) and "
                                         f"{MMUEXT_TLB_FLUSH_LOCAL} (tlb_flush_local) exist")
        if argument % layout.PAGE_SIZE:
            raise _Refused(errno.EINVAL, f"new_baseptr {argument:#x} is not page-aligned")
        if not context.memory.contains(argument, layout.PAGE_SIZE):
            raise _Refused(errno.EFAULT, f"new_baseptr {argument:#x} outside guest RAM")
        self.vcpu.cr3 = argument
        return 0

    def _sched_op(self, args: tuple[int, ...], trap: Trap, context: GuestContext) -> int:
        command, reason = args[0], args[1]
        if command == SCHEDOP_YIELD:
            return 0
        if command == SCHEDOP_BLOCK:
            why = "events masked" if not self.vcpu.interrupts_enabled else "no event source"
            self.vcpu.halted = True
            self._stop(context, Status(StatusKind.HALTED, message=f"sched_op(block) with {why}: nothing can wake "
                                                                  f"the kernel"))
            return 0
        if command == SCHEDOP_SHUTDOWN:
            if reason == SHUTDOWN_POWEROFF:
                self._stop(context, Status(StatusKind.EXITED, code=0, message="sched_op(shutdown, poweroff)"))
            elif reason == SHUTDOWN_CRASH:
                self._stop(context, Status(StatusKind.ERROR, message="the kernel shut down after a crash "
                                                                     "(sched_op(shutdown, crash))"))
            else:
                raise _Refused(errno.EINVAL, f"shutdown reason {reason}; 0 (poweroff) and 3 (crash) exist")
            return 0
        raise _Refused(errno.EINVAL, f"sched_op command {command}; 0 (yield), 1 (block), 2 (shutdown) exist")

    def _irq_disable(self, args: tuple[int, ...], trap: Trap, context: GuestContext) -> int:
        previous, self.vcpu.interrupts_enabled = int(self.vcpu.interrupts_enabled), False
        return previous

    def _irq_enable(self, args: tuple[int, ...], trap: Trap, context: GuestContext) -> int:
        previous, self.vcpu.interrupts_enabled = int(self.vcpu.interrupts_enabled), True
        return previous

    def _irq_restore(self, args: tuple[int, ...], trap: Trap, context: GuestContext) -> int:
        self.vcpu.interrupts_enabled = bool(self._flag(args[0], "irq_restore"))
        return 0

    def _irq_query(self, args: tuple[int, ...], trap: Trap, context: GuestContext) -> int:
        return int(self.vcpu.interrupts_enabled)

    def _get_descriptor_table(self, args: tuple[int, ...], trap: Trap, context: GuestContext) -> int:
        which, buffer = args[0], args[1]
        if which >= len(DESCRIPTOR_TABLES):
            raise _Refused(errno.EINVAL, f"descriptor table {which}; 0 (GDT) and 1 (IDT) exist")
        if not context.memory.contains(buffer, 10):
            raise _Refused(errno.EFAULT, f"buffer {buffer:#x}+10 outside guest RAM")
        base, limit = self.vcpu.gdtr if which == 0 else self.vcpu.idtr
        context.write(buffer, struct.pack("<HQ", limit, base))
        return 0

    def _read_cr(self, args: tuple[int, ...], trap: Trap, context: GuestContext) -> int:
        number = args[0]
        if number not in READABLE_CRS:
            raise _Refused(errno.EINVAL, f"CR{number} cannot be read; CR0, CR2, CR3 and CR4 can")
        return int(getattr(self.vcpu, f"cr{number}"))

    @staticmethod
    def _flag(value: int, name: str) -> int:
        if value not in (0, 1):
            raise _Refused(errno.EINVAL, f"{name} takes 0 or 1, not {value:#x}")
        return value

    # -- the kernel's own exceptions -------------------------------------------------------------

    def _exception(self, trap: Trap, context: GuestContext) -> None:
        vector, rip = trap.vector, trap.regs.rip
        if vector in (Vector.UD, Vector.GP):
            decoded = decode(context.memory.read_at_most(rip, MAX_INSTRUCTION), rip)
            if decoded is not None and _is_privileged(decoded):
                self.traps += 1
                self._stop(context, Status(StatusKind.ERROR, message=(
                    f"privileged instruction at RIP {rip:#x}: {decoded.text}; a paravirtual kernel makes a "
                    f"hypercall instead")))
                return
        error_code = trap.error_code if has_error_code(vector) else None
        if vector == Vector.PF and error_code is not None:
            error_code &= ~PF_USER  # the kernel's own access, though the CPU ran it in ring 3
        reflect(self.vcpu, trap, context, vector, error_code)
        self.bounced[vector] = self.bounced.get(vector, 0) + 1

    def _stop(self, context: GuestContext, status: Status) -> None:
        self.stopped = status.message or str(status)
        context.stop(status)


def _is_privileged(decoded: Decoded) -> bool:
    if decoded.mnemonic == "mov":
        return any(op.kind == "reg" and op.reg[:2] in ("cr", "dr") for op in decoded.operands)
    return decoded.mnemonic in PRIVILEGED


# -- the shipped kernel and running it ------------------------------------------------------------

PV_ROUTINES = ("cli_pushf", "popf", "sgdt", "sidt", "smsw", "fault", "page_fault", "control_registers")
"""minikernel64's routines that pvkernel64 has (its default set): ``int``, ``timer`` and ``student`` it has not."""


def pvkernel(routines: Iterable[str] | None = None) -> Guest:
    """The shipped ``pvkernel64`` running ``routines`` (default :data:`PV_ROUTINES`), started in ring 3."""
    from labkit.guest import Guest
    from labkit.monitor.trap_emulate import ROUTINE_MAGIC, ROUTINE_MASK_OFFSET, routine_mask

    chosen = PV_ROUTINES if routines is None else tuple(routines)
    missing = [name for name in chosen if name not in PV_ROUTINES]
    if missing:
        raise ConfigError(f"pvkernel64 has no routine {', '.join(map(repr, missing))}; it has: {', '.join(PV_ROUTINES)}")
    base = Guest.named("pvkernel64")
    code = bytearray(base.code)
    if code[8:16] != ROUTINE_MAGIC:
        raise ConfigError("pvkernel64.bin does not carry its routine mask at offset 16; rebuild the guests")
    struct.pack_into("<Q", code, ROUTINE_MASK_OFFSET, routine_mask(chosen))
    return replace(base, code=bytes(code), user=True)


@dataclass(frozen=True)
class ParavirtualReport:
    """A paravirtual run: the ``RunResult`` and what the hypervisor counted."""

    result: RunResult
    summary: ParavirtualSummary

    @property
    def console(self) -> str:
        return self.result.console

    @property
    def hypercalls(self) -> Counter[str]:
        """Hypervisor entries by hypercall name (a multicall is one entry)."""
        return self.summary.hypercalls

    @property
    def batched(self) -> Counter[str]:
        return self.summary.batched

    @property
    def errors(self) -> Counter[str]:
        return self.summary.errors

    @property
    def traps(self) -> int:
        """Privileged-instruction traps the monitor saw (0 for a paravirtual kernel)."""
        return self.summary.traps

    @property
    def bounced(self) -> dict[int, int]:
        return self.summary.bounced

    @property
    def entries(self) -> int:
        return self.summary.entries


def run_paravirtual(routines: Sequence[str] | None = None, backend: str = "auto", timeout: float = 10.0, *,
                    guest: Guest | str | None = None, **machine_options: Any) -> ParavirtualReport:
    """Run ``pvkernel64`` (with ``routines``) in ring 3 under :class:`Paravirtual`; a :class:`ParavirtualReport`.

    ``guest`` runs another paravirtual kernel instead (``routines`` must then be None).
    """
    from labkit.guest import Guest
    from labkit.vmm.machine import Machine

    if guest is not None and routines is not None:
        raise ConfigError("give routines (for pvkernel64) or a guest, not both")
    if guest is None:
        kernel = pvkernel(routines)
    else:
        kernel = replace(Guest.named(guest) if isinstance(guest, str) else guest, user=True)
    if kernel.mode != 64:
        raise ConfigError(f"the paravirtual monitor runs 64-bit kernels; {kernel.name!r} starts in {kernel.mode}-bit mode")
    hypervisor = Paravirtual()
    _load_decoder()
    with Machine(kernel, backend=backend, monitor=hypervisor, **machine_options) as machine:
        result = machine.run(timeout)
    summary = result.monitor
    if not isinstance(summary, ParavirtualSummary):
        raise LabkitError("the paravirtual run returned no hypervisor summary")
    return ParavirtualReport(result, summary)


def _load_decoder() -> None:
    """Import Capstone now (the hypervisor decodes a trapping instruction with it), so that the first
    bounced exception's host time is not the import's (about 0.1 s)."""
    decode(b"\x90", 0)


def exception_label(vector: int) -> str:
    """A bounced exception's short name for tables (``#UD``)."""
    return exception_name(vector).split(" ")[0]


# -- the three kernels side by side ---------------------------------------------------------------

KERNELS = ("native", "trap-and-emulate", "paravirtual")
"""minikernel64 in ring 0, minikernel64 deprivileged under :class:`~labkit.monitor.trap_emulate.TrapAndEmulate`,
pvkernel64 under :class:`Paravirtual`."""
CATEGORIES = ("console output", "interrupt flag", "descriptor tables, CRs", "the kernel's own exceptions", "halt",
              "batch (multicall)", "other")
"""What a hypervisor entry was for, the same for every kernel (:func:`category`)."""
_CATEGORY_OF = {
    "console output": {"in", "out", "console_io"},
    "interrupt flag": {"cli", "sti", "pushfq", "popfq", "irq_disable", "irq_enable", "irq_restore", "irq_query"},
    "descriptor tables, CRs": {"lgdt", "lidt", "sgdt", "sidt", "sldt", "str", "smsw", "lmsw", "clts", "mov",
                               "invlpg", "set_gdt", "set_trap_table", "get_descriptor_table", "read_cr",
                               "fpu_taskswitch", "mmuext_op"},
    "the kernel's own exceptions": {"iretq", "iret", "exception"},
    "halt": {"hlt", "HLT", "sched_op"},
    "batch (multicall)": {"multicall"},
}


def category(kind: str) -> str:
    """The :data:`CATEGORIES` entry of an entry kind (``"trap: out"``, ``"hypercall: console_io"``, ...)."""
    name = kind.split(": ", 1)[-1].split(" ")[0]
    if kind.startswith(("bounce:", "trap: reflected")):
        name = "exception"
    for group, names in _CATEGORY_OF.items():
        if name in names:
            return group
    return "other"


@dataclass(frozen=True)
class KernelRun:
    """One kernel's run and its entries into the hypervisor (labkit's VMM or the monitor), by kind."""

    kernel: str
    result: RunResult
    entries: dict[str, int]
    """``{"port exit: out 0x3f8": 514, ...}``, ``{"trap: cli": 1, ...}`` or ``{"hypercall: console_io": 12, ...}``."""

    @property
    def total(self) -> int:
        return sum(self.entries.values())

    def by_category(self) -> dict[str, int]:
        counts = {name: 0 for name in CATEGORIES}
        for kind, count in self.entries.items():
            counts[category(kind)] += count
        return counts


def native_entries(result: RunResult) -> dict[str, int]:
    """A native run's VM exits by kind (port exits by direction and port)."""
    from labkit.trace import ExitReason, LABKIT_EVENTS

    entries: Counter[str] = Counter()
    skipped = {ExitReason(reason).name for reason in LABKIT_EVENTS}
    for record in result.trace:
        if record.reason in skipped:
            continue
        if record.reason == "IO" and record.address is not None:
            entries[f"port exit: {record.direction} {record.address:#x}"] += 1
        else:
            entries[f"exit: {record.reason}"] += 1
    return dict(entries.most_common())


def trap_entries(result: RunResult) -> dict[str, int]:
    """A trap-and-emulate run's traps by what the monitor did: ``trap: out`` (emulated), ``trap: reflected #UD``."""
    from labkit.monitor.trap_emulate import TrapEmulateReport

    report = result.monitor
    if not isinstance(report, TrapEmulateReport):
        raise ConfigError("trap_entries needs a run under TrapAndEmulate")
    entries = Counter({f"trap: {name}": count for name, count in report.emulated.items()})
    for vector, count in report.reflected.items():
        entries[f"trap: reflected {exception_label(vector)}"] += count - report.delivered.get(vector, 0)
    return dict(entries.most_common())


def hypercall_entries(summary: ParavirtualSummary) -> dict[str, int]:
    """A paravirtual run's entries: hypercalls by name, bounced exceptions, privileged traps."""
    entries = Counter({f"hypercall: {name}": count for name, count in summary.hypercalls.items()})
    for vector, count in summary.bounced.items():
        entries[f"bounce: {exception_label(vector)}"] += count
    if summary.traps:
        entries["privileged trap"] += summary.traps
    return dict(entries.most_common())


@dataclass(frozen=True)
class KernelComparison:
    """The same routines run by the three kernels (:data:`KERNELS`) on one backend."""

    routines: tuple[str, ...]
    backend: str
    runs: dict[str, KernelRun]

    def table(self) -> Any:
        """Entries by category, one column per kernel, with the run's status and host time (a ``Table``)."""
        from labkit.table import Table

        kernels = list(self.runs)
        rows = []
        for name in CATEGORIES:
            counts = [self.runs[kernel].by_category()[name] for kernel in kernels]
            if any(counts):
                rows.append([name, *map(str, counts)])
        rows.append(["all entries", *(str(self.runs[kernel].total) for kernel in kernels)])
        rows.append(["host time of the run", *(f"{self.runs[kernel].result.elapsed_s * 1e3:.1f} ms" for kernel in kernels)])
        rows.append(["status", *(str(self.runs[kernel].result.status.kind.value) for kernel in kernels)])
        first = next(iter(self.runs.values())).result
        where = first.origin.backend if first.origin is not None else first.backend
        flavour = f" ({first.origin.flavour})" if first.origin is not None and first.origin.flavour else ""
        return Table(f"Hypervisor entries by kind: {', '.join(self.routines) or 'no routines'}, "
                     f"on {'KVM' if where == 'kvm' else 'the emulator'}{flavour}", ["entries for", *kernels], rows,
                     note="native: VM exits to labkit; trap-and-emulate: traps to the monitor; paravirtual: "
                          "hypercalls (a multicall is one entry) and exceptions bounced to the kernel's handlers.")

    def details(self, kernel: str) -> Any:
        """One kernel's entries kind by kind (a ``Table``)."""
        from labkit.table import Table

        if kernel not in self.runs:
            raise ConfigError(f"no kernel {kernel!r} in this comparison; it has {', '.join(self.runs)}")
        run = self.runs[kernel]
        rows = [[kind, str(count), category(kind)] for kind, count in run.entries.items()]
        return Table(f"{kernel}: {run.total} entries", ["entry", "count", "for"], rows)

    def consoles(self) -> Any:
        """The three consoles line by line; ``≠`` marks a line that differs from the native one (a ``Table``)."""
        from labkit.monitor.binary_translation import consoles_side_by_side

        return consoles_side_by_side({kernel: run.result.console for kernel, run in self.runs.items()})


def compare_kernels(routines: Sequence[str] | None = None, backend: str = "auto",
                    timeout: float = 10.0) -> KernelComparison:
    """Run ``routines`` (default :data:`PV_ROUTINES`) natively, under trap-and-emulate and paravirtualized."""
    from labkit.monitor.trap_emulate import minikernel, run_deprivileged
    from labkit.vmm.machine import Machine

    chosen = PV_ROUTINES if routines is None else tuple(routines)
    _load_decoder()  # trap-and-emulate decodes every trap: no run pays for the import
    paravirtual = run_paravirtual(chosen, backend=backend, timeout=timeout)  # checks the routines first
    kernel = minikernel(chosen)
    with Machine(kernel, backend=backend) as machine:
        native = machine.run(timeout)
    deprivileged = run_deprivileged(kernel, backend, timeout)
    runs = {
        "native": KernelRun("native", native, native_entries(native)),
        "trap-and-emulate": KernelRun("trap-and-emulate", deprivileged, trap_entries(deprivileged)),
        "paravirtual": KernelRun("paravirtual", paravirtual.result, hypercall_entries(paravirtual.summary)),
    }
    return KernelComparison(chosen, native.backend, runs)
