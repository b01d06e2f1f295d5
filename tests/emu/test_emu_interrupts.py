"""kick(), external interrupts and HLT on the Unicorn backend (issue 7's Backend protocol additions)."""

from __future__ import annotations

import struct
import threading
import time
from dataclasses import dataclass, field

import pytest

from labkit.emu import EmuBackend
from labkit.exits import Hlt, Interrupted, Io, Timeout
from labkit.x86 import layout
from labkit.x86.idt import INTERRUPT_GATE, TRAP_GATE, Gate, encode_gate64

from emu_guests import ENTRY, Recorder, assemble, boot, needs_binutils

pytestmark = [pytest.mark.emu, needs_binutils]
IF = 0x200
HANDLER = ENTRY + 0x200


def gate(vector: int, handler: int = HANDLER, kind: int = INTERRUPT_GATE, dpl: int = 0) -> tuple[int, bytes]:
    return layout.IDT_ADDRESS + 16 * vector, encode_gate64(Gate(offset=handler, selector=layout.KERNEL_CS64,
                                                                 type=kind, dpl=dpl))


@dataclass
class Interrupts(Recorder):
    """A dispatcher with the interrupt members of the contract (a stand-in for the core's controller)."""

    vectors: list = field(default_factory=list)
    acknowledged: list = field(default_factory=list)
    raise_on_port: dict = field(default_factory=dict)
    """port -> vector: a write to the port raises that vector (as a device raising its line would)."""

    @property
    def interrupt_pending(self) -> bool:
        return bool(self.vectors)

    def pending_vector(self):
        return self.vectors[0] if self.vectors else None

    def acknowledge_interrupt(self, vector: int) -> None:
        self.vectors.remove(vector)
        self.acknowledged.append(vector)

    def pio(self, port, size, is_write, value, rip):
        if is_write and port in self.raise_on_port:
            self.vectors.append(self.raise_on_port[port])
        return super().pio(port, size, is_write, value, rip)


# The handler records what the interrupt saw, then returns: r8 = RCX at the interrupt, r9 = the frame's
# first qword (RIP: no error code), r10 = the frame's RFLAGS, r11 = RFLAGS inside the handler, r12 += 1.
HANDLER_SOURCE = """
    .org 0x200
    mov r8, rcx
    mov r9, [rsp]
    mov r10, [rsp + 16]
    pushfq
    pop r11
    inc r12
    iretq
"""


def labelled(source: str, label: str, bits: int = 64) -> int:
    """Address of ``label:`` in ``source`` (assembled with a marker instruction after it)."""
    marked = source.replace(f"{label}:", f"{label}:\n    ud2\n", 1)
    plain, with_marker = assemble(source, bits=bits), assemble(marked, bits=bits)
    at = next(i for i, (a, b) in enumerate(zip(plain, with_marker)) if a != b)
    return ENTRY + at


@pytest.mark.parametrize("vector", [0x20, 13, 8])
def test_interrupt_waits_out_the_sti_shadow_and_pushes_no_error_code(vector):
    source = """
        mov rax, 1
        sti
        mov rbx, 2
    after_shadow:
        mov rcx, 3
        out 0xf4, al
    """ + HANDLER_SOURCE
    backend = boot(64, assemble(source), extra=[gate(vector)])
    dispatcher = Interrupts(vectors=[vector])
    assert not backend.get_regs().rflags & IF
    exit_ = backend.run(dispatcher, 2.0)
    assert exit_ == Io(layout.DEBUG_EXIT_PORT, 1, True, 1)
    regs = backend.get_regs()
    assert dispatcher.acknowledged == [vector] and regs.r12 == 1
    # Taken after the one instruction in sti's shadow, before `mov rcx, 3`; the frame starts with RIP
    # (even for 8 and 13: an external interrupt pushes no error code), IF was 1 and the gate cleared it.
    assert regs.r8 == 0 and regs.rbx == 2 and regs.rcx == 3
    assert regs.r9 == labelled(source, "after_shadow")
    assert regs.r10 & IF and not regs.r11 & IF
    assert regs.rsp == layout.STACK_TOP


def test_trap_gate_keeps_if_and_interrupt_in_ring3_switches_to_rsp0():
    source = """
    spin:
        inc rcx
        cmp rcx, 100000
        jne spin
        mov eax, 0
        mov r13, rsp
        jmp spin2
    spin2:
        jmp spin2
    """ + HANDLER_SOURCE.replace("iretq", "mov r14, rsp\n    mov r15, [rsp + 8]\n    out 0xf4, al")
    backend = boot(64, assemble(source), user=True, extra=[gate(0x30, kind=TRAP_GATE)])
    dispatcher = Interrupts()

    def later():
        time.sleep(0.05)
        dispatcher.vectors.append(0x30)
        backend.kick()

    thread = threading.Thread(target=later)
    thread.start()
    exit_ = backend.run(dispatcher, 5.0)
    thread.join()
    assert exit_ == Interrupted()
    assert backend.run(dispatcher, 2.0) == Io(layout.DEBUG_EXIT_PORT, 1, True, 0)
    regs = backend.get_regs()
    assert regs.r10 & IF and regs.r11 & IF  # ring 3 ran with IF = 1; a trap gate leaves it alone
    assert regs.r15 == layout.USER_CS64  # interrupted in ring 3
    assert regs.r14 == layout.KERNEL_STACK_TOP - 40  # the frame is on RSP0


def test_interrupt_raised_by_an_out_is_taken_right_after_it():
    source = """
        sti
        nop
        mov al, 0x20
        out 0x21, al
    after_out:
        mov rcx, 3
        out 0xf4, al
    """ + HANDLER_SOURCE
    backend = boot(64, assemble(source), extra=[gate(0x20)])
    dispatcher = Interrupts(raise_on_port={0x21: 0x20})
    assert backend.run(dispatcher, 2.0) == Io(layout.DEBUG_EXIT_PORT, 1, True, 0x20)
    regs = backend.get_regs()
    assert dispatcher.acknowledged == [0x20]
    assert regs.r9 == labelled(source, "after_out") and regs.r8 == 0 and regs.rcx == 3


@pytest.mark.parametrize("unblock", ["push 0x202\n        popfq", "sti"])
def test_a_blocked_interrupt_waits_for_if_and_is_taken_at_the_first_boundary(unblock):
    # IF = 0 for 20,000 loop iterations while the interrupt is pending; it must come exactly when IF opens
    # (after popfq; after the instruction following sti).
    source = f"""
    spin:
        inc rdx
        cmp rdx, 20000
        jne spin
        {unblock}
        mov rbx, 2
    taken_here:
        mov rcx, 3
        out 0xf4, al
    """ + HANDLER_SOURCE
    backend = boot(64, assemble(source), extra=[gate(0x21)])
    dispatcher = Interrupts(vectors=[0x21])
    assert backend.run(dispatcher, 5.0) == Io(layout.DEBUG_EXIT_PORT, 1, True, 0)
    regs = backend.get_regs()
    expected = labelled(source, "taken_here")
    if "popfq" in unblock:  # no shadow after popf: before `mov rbx, 2`
        expected -= len(assemble("mov rbx, 2"))
    assert dispatcher.acknowledged == [0x21] and regs.rdx == 20000 and regs.r9 == expected
    assert backend._engine.window_hook is None  # the IF watch is gone once the interrupt is in


def test_no_interrupt_is_taken_while_if_stays_clear():
    source = """
    spin:
        inc rdx
        cmp rdx, 3000
        jne spin
        out 0xf4, al
    """ + HANDLER_SOURCE
    backend = boot(64, assemble(source), extra=[gate(0x20)])
    dispatcher = Interrupts(vectors=[0x20])
    assert backend.run(dispatcher, 5.0) == Io(layout.DEBUG_EXIT_PORT, 1, True, 0)
    assert backend.get_regs().r12 == 0 and dispatcher.acknowledged == []


def test_protected_mode_interrupt_reaches_the_boot_stub_without_an_error_code():
    # 32-bit: vector 13 from the interrupt controller lands in labkit's #GP stub, which reports it;
    # the frame above the saved EAX is EIP, CS, EFLAGS (a #GP would have an error code first).
    source = """
        sti
        nop
    here:
        mov ecx, 3
        out 0xf4, al
    """
    backend = boot(32, assemble(source, bits=32))
    dispatcher = Interrupts(vectors=[13])
    assert backend.run(dispatcher, 2.0) == Io(layout.FAULT_PORT, 1, True, 13)
    _, eip, cs, eflags = struct.unpack_from("<4I", backend.memory, backend.get_regs().rsp)
    assert (eip, cs) == (labelled(source, "here", bits=32), layout.KERNEL_CS32) and eflags & IF
    assert dispatcher.acknowledged == [13] and backend.get_regs().rcx == 0


def test_real_mode_interrupt_goes_through_the_ivt():
    source = """
        sti
        nop
    here:
        mov cx, 3
        out 0xf4, al
    .org 0x200
        mov si, sp
        mov di, cx
        inc bp
        iret
    """
    code = assemble(source, bits=16)
    ivt = (0x8 * 4, struct.pack("<HH", HANDLER, 0))
    backend = boot(16, code, extra=[ivt])
    dispatcher = Interrupts(vectors=[8])
    assert backend.run(dispatcher, 2.0) == Io(layout.DEBUG_EXIT_PORT, 1, True, 0)
    regs = backend.get_regs()
    assert dispatcher.acknowledged == [8] and regs.rbp & 0xFFFF == 1 and regs.rdi & 0xFFFF == 0
    frame = backend.get_sregs().ss.base + (regs.rsi & 0xFFFF)  # IP, CS, FLAGS: three words, no error code
    ip, cs, flags = struct.unpack_from("<3H", backend.memory, frame)
    assert (ip, cs) == (labelled(source, "here"), 0) and flags & IF


def test_kick_before_run_returns_interrupted_at_once():
    backend = boot(64, assemble("inc rbx\nhlt"))
    backend.kick()
    assert backend.run(Recorder(), 2.0) == Interrupted()
    assert backend.get_regs().rip == ENTRY and backend.get_regs().rbx == 0
    assert backend.run(Recorder(), 2.0) == Hlt()
    assert backend.get_regs().rbx == 1


def test_kick_from_another_thread_stops_a_tight_loop_and_resumes_exactly():
    source = """
    spin:
        inc rbx
        add rsi, rbx
        cmp rbx, 30000000
        jne spin
        out 0xf4, al
    """
    code = assemble(source)
    reference = boot(64, code)
    assert reference.run(Recorder(), 30.0) == Io(layout.DEBUG_EXIT_PORT, 1, True, 0)
    backend = boot(64, code)
    stops, latencies = 0, []
    while True:
        timer = threading.Timer(0.02, lambda: latencies.append(time.monotonic()) or backend.kick())
        timer.start()
        exit_ = backend.run(Recorder(), 30.0)
        timer.cancel()
        if exit_ != Interrupted():
            break
        latencies[-1] = time.monotonic() - latencies[-1]
        stops += 1
        assert 0 < backend.get_regs().rbx <= 30000000  # (a kick can land just before the final out)
    assert exit_ == Io(layout.DEBUG_EXIT_PORT, 1, True, 0) and stops >= 2
    assert backend.get_regs() == reference.get_regs()
    # Not lost: each kick ended its run long before the guest's own end (a wall-clock bound only
    # loose enough for a shared machine; the stop gate stays shut until the run loop sees the kick,
    # so a kick that lands before uc_emu_start is taken at its first block).
    assert max(latencies) < 0.5


def test_hlt_then_run_continues_after_it():
    backend = boot(64, assemble("hlt\nmov rbx, 7\nhlt\nout 0xf4, al"))
    assert backend.run(Recorder(), 2.0) == Hlt()
    assert backend.get_regs().rip == ENTRY + 1
    assert backend.run(Recorder(), 2.0) == Hlt()
    assert backend.get_regs().rip == ENTRY + 9 and backend.get_regs().rbx == 7
    assert backend.run(Recorder(), 2.0) == Io(layout.DEBUG_EXIT_PORT, 1, True, 0)


def test_a_kick_and_a_hlt_in_the_same_run_give_hlt_and_the_kick_waits():
    # The dispatcher kicks during the OUT; the block then ends in hlt.  The run reports the hlt
    # (RIP after it) and the kick, not lost, ends the next run at once, as KVM's immediate_exit does.
    backend = boot(64, assemble("out 0x80, al\nhlt\nout 0xf4, al"))

    class Kicking(Recorder):
        def pio(self, port, size, is_write, value, rip):
            if port == 0x80:
                backend.kick()
            return super().pio(port, size, is_write, value, rip)

    assert backend.run(Kicking(), 2.0) == Hlt()
    assert backend.get_regs().rip == ENTRY + 3
    assert backend.run(Kicking(), 2.0) == Interrupted()
    assert backend.run(Kicking(), 2.0) == Io(layout.DEBUG_EXIT_PORT, 1, True, 0)


def test_timeout_then_run_continues():
    source = """
    spin:
        inc rbx
        cmp rbx, 40000000
        jne spin
        out 0xf4, al
    """
    backend = boot(64, assemble(source))
    exits = [backend.run(Recorder(), 0.05)]
    while exits[-1] == Timeout(budget_s=0.05):
        exits.append(backend.run(Recorder(), 0.05))
    assert len(exits) >= 2 and exits[-1] == Io(layout.DEBUG_EXIT_PORT, 1, True, 0)
    assert backend.get_regs().rbx == 40000000


def test_kick_after_close_is_harmless():
    backend = EmuBackend(2 << 20, 64)
    backend.close()
    backend.kick()
