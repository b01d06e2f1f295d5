"""timer64 and preempt64 on both backends through a local stand-in for the core's interrupt wiring.

Until the core delegates the Dispatcher's interrupt members to an
``InterruptController`` and the backends inject (issue 7, the core, kvm and emu
parts), this harness does the smallest version of both here: a ``MachineCore``
with the PIC at 0x20 and the PIT at 0x40 as ordinary port devices, and a run
loop that, at a HLT with IF = 1 while the controller is armed, waits for the
interrupt and delivers it itself (a ring-0, 64-bit interrupt-gate delivery:
the frame pushed on the current stack, RIP from the gate, IF cleared), then
acknowledges it and records ``ExitReason.INTERRUPT``.  That is enough for
timer64, which only ever takes interrupts at its ``hlt``; preempt64 needs the
backends' injection into a running ring-3 loop, so here it is checked only up
to its task spinning in ring 3 with the tick pending.

Once the core attaches the PIC and PIT itself, this module's devices collide
with its at port 0x20: the end-to-end tests are ``test_timer.py``, and this
file is to be deleted then.
"""

from __future__ import annotations

import struct
import time

from labkit import Guest, exits
from labkit.exits import ExitReason
from labkit.vmm.core import MachineCore
from labkit.vmm.devices.timer import PIT_HZ, Pit8254
from labkit.vmm.interrupts import InterruptController
from labkit.vmm.status import Status
from labkit.x86 import layout

RFLAGS_IF = 0x200
RFLAGS_TF = 0x100
TIMER_VECTOR = 0x20
TARGET_OFFSET, COUNT_OFFSET = 16, 20


class HarnessCore(MachineCore):
    """A MachineCore with a PIC and a PIT on its port bus."""

    def __init__(self, guest: Guest, backend_name: str):
        self.interrupts = InterruptController()
        self.pit = Pit8254(self.interrupts)
        super().__init__(guest, backend_name, layout.DEFAULT_MEMORY,
                         devices=[("pio", 0x20, 2, self.interrupts), ("pio", 0x40, 4, self.pit)])

    def close(self) -> None:
        self.pit.close()
        super().close()


def deliver_in_ring0(core: HarnessCore, vector: int) -> int:
    """What a CPU does for an external interrupt taken at CPL 0 in long mode through an interrupt gate
    (SDM vol. 3, 6.14.2): align RSP to 16, push SS, RSP, RFLAGS, CS, RIP, clear IF and TF, jump to the gate.
    Returns the interrupted RIP."""
    backend, memory = core.backend, core.backend.memory
    regs, sregs = backend.get_regs(), backend.get_sregs()
    assert sregs.cs.selector & 3 == 0, "the harness delivers only at CPL 0"
    low, selector, _ist, attributes, middle, high = struct.unpack_from("<HHBBHI", memory, sregs.idt.base + 16 * vector)
    assert attributes == 0x8E and selector == sregs.cs.selector, "a present DPL-0 64-bit interrupt gate in the same CS"
    rsp = regs.rsp & ~0xF
    frame = (regs.rip, sregs.cs.selector, regs.rflags, regs.rsp, sregs.ss.selector)
    rsp -= 8 * len(frame)
    struct.pack_into("<5Q", memory, rsp, *frame)
    interrupted = regs.rip
    regs.rsp, regs.rip = rsp, low | middle << 16 | high << 32
    regs.rflags &= ~(RFLAGS_IF | RFLAGS_TF)
    backend.set_regs(regs)
    return interrupted


def run_delivering_at_hlt(core: HarnessCore, timeout: float) -> Status:
    """The core's run loop as it will be with interrupts, reduced to HLT: wait, deliver, acknowledge, record."""
    deadline = time.monotonic() + timeout
    while core.status is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return Status("timeout")
        exit = core.backend.run(core, remaining)
        if isinstance(exit, (exits.Io, exits.Mmio)):
            continue  # a device set the status (debug exit)
        if isinstance(exit, exits.Timeout):
            return Status("timeout")
        if not isinstance(exit, exits.Hlt):
            return Status("other", message=repr(exit))
        regs = core.backend.get_regs()
        if not (regs.rflags & RFLAGS_IF and core.interrupts.armed):
            return Status("halted")
        if not core.interrupts.wait(deadline - time.monotonic()):
            return Status("timeout")
        vector = core.interrupts.pending_vector()
        rip = deliver_in_ring0(core, vector)
        core.interrupts.acknowledge_interrupt(vector)
        core._record(int(ExitReason.INTERRUPT), rip, None, None, None, vector)
    return core.status


def patched(name: str, target: int | None = None, count: int | None = None) -> Guest:
    guest = Guest.named(name)
    code = bytearray(guest.code)
    if target is not None:
        struct.pack_into("<I", code, TARGET_OFFSET, target)
    if count is not None:
        struct.pack_into("<H", code, COUNT_OFFSET, count)
    return Guest.from_bytes(bytes(code), guest.mode, name)


def run_timer64(backend_name: str, target: int = 10, count: int = 1193):
    core = HarnessCore(patched("timer64", target, count), backend_name)
    try:
        started = time.monotonic()
        status = run_delivering_at_hlt(core, timeout=10)
        elapsed = time.monotonic() - started
        return core, status, elapsed
    finally:
        core.close()


def test_timer64_takes_exactly_its_ticks_and_the_periods_account_for_them(backend_name):
    core, status, elapsed = run_timer64(backend_name)
    assert (status.kind, status.code) == ("exited", 0), str(status)
    assert core.console.text() == "ticks: 10\n"
    records = [record for record in core.trace if record.reason == "INTERRUPT"]
    assert len(records) == 10 and {record.data for record in records} == {TIMER_VECTOR}
    assert core.interrupts.delivered[0] == 10
    pic = core.interrupts.save().master
    assert (pic.icw2, pic.imr, pic.isr) == (TIMER_VECTOR, 0xFF, 0), "vector base 0x20, all masked at the end, EOIs sent"
    pit = core.pit.save()
    assert not pit.counting, "the guest's last control word stopped the counter"
    assert pit.periods == 10 + pit.coalesced + (pic.irr & 1), "every period is delivered, coalesced or still pending"
    assert elapsed >= 10 * 1193 / PIT_HZ, "ten ticks cannot come before ten periods of host time"
    assert not core.interrupts.armed


def test_timer64_same_count_on_both_backends_for_another_target_and_period():
    from backends import HAS_KVM

    backends = ["emu", "kvm"] if HAS_KVM else ["emu"]
    outcomes = {}
    for backend in backends:
        core, status, elapsed = run_timer64(backend, target=25, count=2386)  # 2 ms
        outcomes[backend] = (status.kind, core.console.text(), core.trace.count("INTERRUPT"))
        assert elapsed >= 25 * 2386 / PIT_HZ
    assert set(outcomes.values()) == {("exited", "ticks: 25\n", 25)}


def test_preempt64_reaches_its_ring3_loop_with_the_tick_pending(backend_name):
    """Without injection (the backends' part) the ring-3 loop spins on; the kernel's set-up is checked."""
    core = HarnessCore(Guest.named("preempt64"), backend_name)
    try:
        status = run_delivering_at_hlt(core, timeout=1.0)
        regs, sregs = core.backend.get_regs(), core.backend.get_sregs()
        task = core.guest.load_address + core.guest.code.index(b"\xeb\xfe")  # jmp $
        assert status.kind == "timeout"
        assert (regs.rip, sregs.cs.selector, regs.rflags & RFLAGS_IF) == (task, layout.USER_CS64, RFLAGS_IF)
        assert core.interrupts.interrupt_pending and core.interrupts.pending_vector() == TIMER_VECTOR
        assert core.pit.save().counting and core.interrupts.armed
    finally:
        core.close()
