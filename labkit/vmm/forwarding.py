"""Trap forwarding: every exception of a guest reaches a monitor on the host.

A monitor (trap-and-emulate, binary translation) runs a guest kernel
deprivileged in ring 3 and must see each of its exceptions.  Neither backend
lets the host take an exception before the guest's IDT does (KVM's exception
bitmap is not exposed for #GP; Unicorn has only its interrupt hook), so the
forwarding is done guest-side, the same way on both: the IDT labkit installs
points vectors 0-31 at small ring-0 stubs that save every general-purpose
register and write to ``TRAP_PORT``; the port's device reads the frame, hands
a :class:`Trap` to the monitor, writes back what the monitor changed, and the
stub returns to the guest with ``iretq``.

Memory, long mode only (``FORWARDING_STUBS`` = 0x0; the IVT is unused there)::

    0x000 + 16 * v   stub for vector v:   push 0 (vectors with no error code)
                                          push v
                                          jmp common
    0x200            common:  push rax, rcx, rdx, rbx, rbp, rsi, rdi, r8 .. r15
                              out TRAP_PORT, al
                              pop r15 .. r8, rdi, rsi, rbp, rbx, rdx, rcx, rax
                              add rsp, 16          (vector, error code)
                              iretq

At the ``out``, from RSP upwards: r15, r14, ..., r8, rdi, rsi, rbp, rbx, rdx,
rcx, rax, vector, error code, RIP, CS, RFLAGS, RSP, SS (22 quadwords).  Gates
keep their DPL (vectors 3 and 4 stay reachable from ring 3 with ``int3`` and
``int 4``).  Under PVM the stubs, being ring-0 code, run in KVM's instruction
emulator: about 40 instructions a trap.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable, Protocol

from labkit.backend import Backend
from labkit.errors import ConfigError, GuestMemoryError
from labkit.memory import GuestMemory
from labkit.vmm.status import Status, StatusKind
from labkit.x86 import layout
from labkit.x86.arch import SELECTOR_RPL, Vector
from labkit.x86.idt import ERROR_CODE_VECTORS, decode_gate64, encode_gate64
from labkit.x86.state import Regs

FORWARDED_VECTORS = 32
STUB_SIZE = 16
COMMON = layout.FORWARDING_STUBS + FORWARDED_VECTORS * STUB_SIZE  # 0x200

# Push order of the common routine; the frame lists them in reverse (last pushed first).
PUSHED = ("rax", "rcx", "rdx", "rbx", "rbp", "rsi", "rdi",
          "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_REGISTER_NUMBER = {"rax": 0, "rcx": 1, "rdx": 2, "rbx": 3, "rsp": 4, "rbp": 5, "rsi": 6, "rdi": 7}
FRAME_WORDS = len(PUSHED) + 7
FRAME = struct.Struct(f"<{FRAME_WORDS}Q")


def _push(name: str) -> bytes:
    if name in _REGISTER_NUMBER:
        return bytes([0x50 + _REGISTER_NUMBER[name]])
    return bytes([0x41, 0x50 + int(name[1:]) - 8])


def _pop(name: str) -> bytes:
    if name in _REGISTER_NUMBER:
        return bytes([0x58 + _REGISTER_NUMBER[name]])
    return bytes([0x41, 0x58 + int(name[1:]) - 8])


def stub(vector: int) -> bytes:
    """The 16-byte forwarding stub of ``vector`` (``push 0``? ``push v``; ``jmp common``)."""
    if not 0 <= vector < FORWARDED_VECTORS:
        raise ConfigError(f"forwarded vectors are 0..{FORWARDED_VECTORS - 1}, not {vector}")
    code = b"" if vector in ERROR_CODE_VECTORS else b"\x6a\x00"  # push 0: a uniform frame
    code += bytes([0x6A, vector])  # push imm8
    here = layout.FORWARDING_STUBS + vector * STUB_SIZE + len(code)
    code += b"\xe9" + struct.pack("<i", COMMON - (here + 5))  # jmp common
    return code.ljust(STUB_SIZE, b"\xcc")


def common_routine() -> bytes:
    """Save the GPRs, tell the host, restore them, drop vector and error code, ``iretq``."""
    return (b"".join(_push(name) for name in PUSHED)
            + bytes([0xE6, layout.TRAP_PORT])  # out TRAP_PORT, al
            + b"".join(_pop(name) for name in reversed(PUSHED))
            + b"\x48\x83\xc4\x10"  # add rsp, 16
            + b"\x48\xcf")  # iretq


def install(memory: GuestMemory, idt_base: int) -> None:
    """Write the stubs and point IDT gates 0-31 (64-bit, at ``idt_base``) at them, keeping each gate's DPL.

    ``GuestMemoryError`` if the stubs or the IDT do not lie in guest memory.
    """
    image = b"".join(stub(vector) for vector in range(FORWARDED_VECTORS)) + common_routine()
    start = layout.FORWARDING_STUBS
    memory.write(start, image)
    for vector in range(FORWARDED_VECTORS):
        at = idt_base + 16 * vector
        gate = decode_gate64(memory.read(at, 16))
        memory.write(at, encode_gate64(
            type(gate)(offset=start + vector * STUB_SIZE, selector=gate.selector, type=gate.type,
                       dpl=gate.dpl, present=gate.present, ist=gate.ist)))


@dataclass
class Trap:
    """One exception of the guest, as the monitor sees and changes it.

    ``regs`` holds the guest's registers at the exception (RIP, RSP and RFLAGS
    from the CPU's frame); whatever the monitor leaves in ``regs``, ``cs`` and
    ``ss`` is what the guest resumes with.
    """

    vector: int
    error_code: int
    regs: Regs
    cs: int
    ss: int
    cr2: int = 0

    @property
    def cpl(self) -> int:
        return self.cs & SELECTOR_RPL


class MonitorContext:
    """What a monitor may touch: guest RAM, the machine's devices, the console, and the run's end."""

    def __init__(self, memory: GuestMemory, pio: Callable[[int, int, bool, int], int],
                 stop: Callable[[Status, Regs | None], None]):
        self.memory = memory
        """Guest memory (the machine's :class:`GuestMemory`)."""
        self._pio = pio
        self._stop = stop
        self.trap: Trap | None = None
        """The trap being handled."""

    def pio(self, port: int, size: int, is_write: bool, value: int = 0) -> int:
        """Perform a port access on the guest's behalf (a trapped ``in``/``out``), through the machine's bus."""
        return self._pio(port, size, is_write, value)

    def stop(self, status: Status) -> None:
        """End the run with ``status`` once this trap is handled; the result shows the guest's registers at it."""
        self._stop(status, self.trap.regs if self.trap is not None else None)

    def read(self, address: int, size: int) -> bytes:
        """Guest-physical memory; ``GuestMemoryError`` naming the range outside it."""
        return self.memory.read(address, size)

    def write(self, address: int, data: bytes) -> None:
        """Store ``data`` in guest-physical memory; ``GuestMemoryError`` naming the range outside it."""
        self.memory.write(address, data)


class GuestContext(Protocol):
    """What the virtual CPU's emulation uses of a :class:`MonitorContext` (a monitor may wrap one)."""

    memory: GuestMemory

    @property
    def trap(self) -> Trap | None: ...

    def pio(self, port: int, size: int, is_write: bool, value: int = 0) -> int: ...

    def stop(self, status: Status) -> None: ...

    def read(self, address: int, size: int) -> bytes: ...

    def write(self, address: int, data: bytes) -> None: ...


class Monitor(Protocol):
    """Handles the guest's exceptions; see :class:`Trap`."""

    def on_trap(self, trap: Trap, context: MonitorContext) -> None: ...

    def summary(self) -> object:
        """Counters and state to return with the run's result (must pickle: it crosses the worker boundary)."""
        ...


@dataclass
class TrapPort:
    """The device at ``TRAP_PORT``: decodes the forwarding stubs' frame, calls the monitor, writes back."""

    monitor: Monitor
    backend: Backend
    context: MonitorContext
    traps: dict[int, int] = field(default_factory=dict)

    def write(self, offset: int, size: int, value: int) -> None:
        regs = self.backend.get_regs()
        base = regs.rsp
        try:
            frame = self.context.memory.view(base, FRAME.size)
        except GuestMemoryError:
            self.context.stop(Status(StatusKind.ERROR, message=f"trap frame at {base:#x} lies outside guest RAM"))
            return
        words = FRAME.unpack_from(frame)
        saved = dict(zip(reversed(PUSHED), words))
        vector, error_code, rip, cs, rflags, rsp, ss = words[len(PUSHED):]
        trap = Trap(vector, error_code, Regs(**saved, rip=rip, rflags=rflags, rsp=rsp), cs, ss,
                    self.backend.get_sregs().cr2 if vector == Vector.PF else 0)
        self.traps[vector] = self.traps.get(vector, 0) + 1
        self.context.trap = trap
        self.monitor.on_trap(trap, self.context)
        out = trap.regs
        FRAME.pack_into(frame, 0, *(getattr(out, name) & 0xFFFF_FFFF_FFFF_FFFF for name in reversed(PUSHED)),
                        vector, error_code, out.rip, trap.cs, out.rflags, out.rsp, trap.ss)

    def read(self, offset: int, size: int) -> int:
        return 0
