"""KvmBackend's kick(), interrupt injection and HLT on the real /dev/kvm (tests/kvm/kvm_guests.py).

The interrupt tests use a hand-made dispatcher with one edge-triggered line
(``InterruptDispatcher``) and a handler for vector 0x20 that counts in R15 and
keeps the interrupted RIP in R14.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from kvm_guests import (
    CLI_STI_HLT64, CLI_STI_HLT64_AFTER_HLT, CLI_STI_SPIN64, ENDLESS, ENTRY, HLT_OUT_HLT64,
    IN_LOOP64, IN_LOOP64_AFTER_IN, IN_LOOP64_ITERATIONS, INTERRUPT_VECTOR, STI_NOP_CLI_LOOP64,
    STI_NOP_CLI_LOOP64_WINDOW, STI_OUT_LOOP64, STI_SPIN64,
    InterruptDispatcher, RecordingDispatcher, install_handler, load_boot_state,
)
from labkit import exits
from labkit.kvm import KvmBackend

pytestmark = pytest.mark.kvm

MEMORY = 2 << 20


@pytest.fixture
def backend():
    with KvmBackend(MEMORY, 64) as vm:
        yield vm


class SequenceDispatcher:
    """Answers every `in` with the next value of a fixed pseudo-random sequence; can stop at chosen reads."""

    def __init__(self, stop_at=()):
        self.stop = False
        generator = random.Random(1234)
        self.values = [generator.getrandbits(32) for _ in range(IN_LOOP64_ITERATIONS + 1)]
        self.reads = 0
        self.stop_at = set(stop_at)

    def pio(self, port, size, is_write, value, rip):
        assert (port, size, is_write, rip) == (0x20, 4, False, ENTRY + 5)
        answer = self.values[self.reads]
        self.stop = self.reads in self.stop_at
        self.reads += 1
        return answer

    def mmio(self, address, size, is_write, value, rip):
        raise AssertionError(f"unexpected MMIO at {address:#x}")


def _move_to_a_new_vm(old: KvmBackend) -> KvmBackend:
    """What a snapshot and restore does: RAM, registers and segment state into a fresh VM."""
    new = KvmBackend(MEMORY, 64)
    new.memory[:] = old.memory
    new.set_sregs(old.get_sregs())
    new.set_regs(old.get_regs())
    old.close()
    return new


def test_kicks_stops_and_timeouts_at_random_points_leave_the_same_final_registers():
    """An `in` loop stopped ~100 times (kicks from another thread, dispatcher stops at reads,
    tiny timeouts), sometimes moved to a new VM in between, ends exactly as an uninterrupted run."""
    with KvmBackend(MEMORY, 64) as reference:
        load_boot_state(reference, 64, IN_LOOP64)
        dispatcher = SequenceDispatcher()
        assert reference.run(dispatcher, timeout=30.0) == exits.Hlt()
        assert dispatcher.reads == IN_LOOP64_ITERATIONS
        expected = reference.get_regs()

    chooser = random.Random(99)
    stop_at = set(chooser.sample(range(IN_LOOP64_ITERATIONS), 30))
    dispatcher = SequenceDispatcher(stop_at)
    current = [KvmBackend(MEMORY, 64)]
    load_boot_state(current[0], 64, IN_LOOP64)
    armed, done = threading.Event(), threading.Event()

    def kicker():  # one kick 0.1-1 ms after each run that asks for one
        delays = random.Random(5)
        while not done.is_set():
            if armed.wait(0.05):
                time.sleep(delays.uniform(0.0001, 0.001))
                armed.clear()
                current[0].kick()

    thread = threading.Thread(target=kicker, daemon=True)
    thread.start()
    seen = {exits.Io: 0, exits.Interrupted: 0, exits.Timeout: 0}
    try:
        for _ in range(10_000):
            if chooser.random() < 0.5:
                armed.set()
                result = current[0].run(dispatcher, timeout=10.0)
            else:
                result = current[0].run(dispatcher, timeout=0.0005)
            if result == exits.Hlt():
                break
            assert type(result) in seen, result
            seen[type(result)] += 1
            regs = current[0].get_regs()
            if isinstance(result, exits.Io):
                # Stopped at an `in`: it has completed, RAX holds the value, RIP is past it.
                assert result == exits.Io(0x20, 4, False, dispatcher.values[dispatcher.reads - 1])
                assert regs.rip == IN_LOOP64_AFTER_IN
                assert regs.rax & 0xFFFF_FFFF == dispatcher.values[dispatcher.reads - 1]
            if chooser.random() < 0.3:
                current[0] = _move_to_a_new_vm(current[0])
        else:
            pytest.fail("the guest never reached its hlt")
        final = current[0].get_regs()
    finally:
        done.set()
        thread.join(5)
        current[0].close()
    assert dispatcher.reads == IN_LOOP64_ITERATIONS
    assert final == expected
    assert seen[exits.Io] == len(stop_at)
    assert seen[exits.Interrupted] >= 3 and seen[exits.Timeout] >= 3, seen


def test_kick_with_no_run_in_progress_makes_the_next_run_return_at_once(backend):
    load_boot_state(backend, 64, HLT_OUT_HLT64)
    backend.kick()
    backend.kick()  # kicks do not queue up: one Interrupted
    dispatcher = RecordingDispatcher()
    assert backend.run(dispatcher, timeout=2.0) == exits.Interrupted()
    assert backend.get_regs().rip == ENTRY and dispatcher.log == []  # no guest code ran
    assert backend.run(dispatcher, timeout=2.0) == exits.Hlt()
    assert backend.get_regs().rip == ENTRY + 1


@pytest.mark.parametrize("user", [False, True], ids=["cpl0-emulated", "cpl3-native"])
def test_kick_interrupts_a_tight_loop_from_another_thread(backend, user):
    load_boot_state(backend, 64, ENDLESS, user=user)
    timer = threading.Timer(0.05, backend.kick)
    start = time.monotonic()
    timer.start()
    try:
        assert backend.run(RecordingDispatcher(), timeout=10.0) == exits.Interrupted()
    finally:
        timer.cancel()
    assert time.monotonic() - start < 2.0
    assert backend.get_regs().rip == ENTRY
    # The kick is spent: the next run goes on until its own budget.
    assert backend.run(RecordingDispatcher(), timeout=0.05) == exits.Timeout(budget_s=0.05)


def test_a_kick_from_inside_the_dispatcher_ends_the_run_after_that_exit(backend):
    load_boot_state(backend, 64, STI_OUT_LOOP64)

    class KickingDispatcher(RecordingDispatcher):
        def pio(self, port, size, is_write, value, rip):
            if len(self.log) == 4:
                backend.kick()
            return super().pio(port, size, is_write, value, rip)

    dispatcher = KickingDispatcher()
    assert backend.run(dispatcher, timeout=2.0) == exits.Interrupted()
    assert len(dispatcher.log) == 5
    assert backend.run(dispatcher, timeout=2.0) == exits.Hlt()
    assert len(dispatcher.log) == 20


def test_interrupt_with_if_set_arrives_at_the_next_entry(backend):
    load_boot_state(backend, 64, STI_OUT_LOOP64)
    install_handler(backend)
    class RaiseAtFifth(InterruptDispatcher):
        def pio(self, port, size, is_write, value, rip):
            answer = super().pio(port, size, is_write, value, rip)
            if len(self.log) == 5:
                self.interrupt_pending = True
            return answer

    dispatcher = RaiseAtFifth()
    assert backend.run(dispatcher, timeout=2.0) == exits.Hlt()
    regs = backend.get_regs()
    assert dispatcher.acknowledged == [INTERRUPT_VECTOR]
    assert regs.r15 == 1
    # The fifth `out` (at ENTRY + 6) had completed: the handler interrupted the `dec ecx` after it.
    assert regs.r14 == ENTRY + 8
    assert len(dispatcher.log) == 20 and regs.rip == ENTRY + len(STI_OUT_LOOP64)


def test_interrupt_with_if_clear_waits_for_sti_and_its_shadow(backend):
    load_boot_state(backend, 64, CLI_STI_HLT64)
    install_handler(backend)
    handled_at_port = {}

    class Watching(InterruptDispatcher):
        def pio(self, port, size, is_write, value, rip):
            handled_at_port[port] = len(self.acknowledged)
            return super().pio(port, size, is_write, value, rip)

    dispatcher = Watching(raise_on={0x10})
    # The line rises at `out 0x10` with IF = 0: nothing is injected through the loop and `out 0x11`;
    # `sti; hlt` halts first (the sti shadow covers the hlt), and the interrupt then wakes it.
    assert backend.run(dispatcher, timeout=2.0) == exits.Hlt()
    assert handled_at_port == {0x10: 0, 0x11: 0}
    assert backend.get_regs().rip == CLI_STI_HLT64_AFTER_HLT
    assert dispatcher.interrupt_pending
    assert backend.run(dispatcher, timeout=2.0) == exits.Hlt()
    regs = backend.get_regs()
    assert dispatcher.acknowledged == [INTERRUPT_VECTOR]
    assert (regs.r15, regs.r14) == (1, CLI_STI_HLT64_AFTER_HLT)
    assert handled_at_port[0x12] == 1
    assert regs.rip == ENTRY + len(CLI_STI_HLT64)


def test_the_interrupt_window_exit_delivers_into_a_loop_without_exits(backend):
    load_boot_state(backend, 64, CLI_STI_SPIN64)
    install_handler(backend)
    dispatcher = InterruptDispatcher(raise_on={0x10})
    assert backend.run(dispatcher, timeout=0.5) == exits.Timeout(budget_s=0.5)
    regs = backend.get_regs()
    assert dispatcher.acknowledged == [INTERRUPT_VECTOR]
    assert (regs.r15, regs.r14) == (1, ENTRY + 4)  # the `jmp $` after the sti
    assert backend._run.request_interrupt_window == 0  # not left asking once nothing is pending


def test_a_one_instruction_window_is_found(backend):
    """`sti; nop; cli` in a loop: the only boundary with IF = 1 and no sti shadow is before the `cli`."""
    load_boot_state(backend, 64, STI_NOP_CLI_LOOP64)
    install_handler(backend)
    dispatcher = InterruptDispatcher(raise_on={0x10})
    assert backend.run(dispatcher, timeout=0.5) == exits.Timeout(budget_s=0.5)
    regs = backend.get_regs()
    assert dispatcher.acknowledged == [INTERRUPT_VECTOR]
    assert (regs.r15, regs.r14) == (1, STI_NOP_CLI_LOOP64_WINDOW)


@pytest.mark.parametrize("user", [False, True], ids=["cpl0-emulated", "cpl3-native"])
def test_a_kick_gets_an_interrupt_into_a_tight_loop(backend, user):
    code = ENDLESS if user else STI_SPIN64  # the ring-3 entry already has IF = 1
    load_boot_state(backend, 64, code, user=user)
    install_handler(backend)
    dispatcher = InterruptDispatcher()
    loop = ENTRY if user else ENTRY + 1

    def raise_line():
        dispatcher.interrupt_pending = True
        backend.kick()

    timer = threading.Timer(0.05, raise_line)
    timer.start()
    try:
        assert backend.run(dispatcher, timeout=10.0) == exits.Interrupted()
    finally:
        timer.cancel()
    assert dispatcher.acknowledged == []  # the kick ended the run before the next entry
    assert backend.run(dispatcher, timeout=0.05) == exits.Timeout(budget_s=0.05)
    regs = backend.get_regs()
    assert dispatcher.acknowledged == [INTERRUPT_VECTOR]
    assert (regs.r15, regs.r14, regs.rip) == (1, loop, loop)
    if user:
        assert backend.get_sregs().cs.dpl == 3  # back in ring 3 after the handler's iretq


def test_a_dispatcher_with_no_vector_after_all_gets_nothing_injected(backend):
    load_boot_state(backend, 64, STI_OUT_LOOP64)
    install_handler(backend)

    class Spurious(InterruptDispatcher):
        def pending_vector(self):
            self.pending_asked += 1
            self.interrupt_pending = False  # the line fell again before it was taken
            return None

    dispatcher = Spurious(raise_on={0x10})
    assert backend.run(dispatcher, timeout=2.0) == exits.Hlt()
    assert dispatcher.pending_asked >= 1 and dispatcher.acknowledged == []
    assert backend.get_regs().r15 == 0


def test_hlt_leaves_rip_after_it_and_the_next_run_continues(backend):
    load_boot_state(backend, 64, HLT_OUT_HLT64)
    dispatcher = RecordingDispatcher()
    assert backend.run(dispatcher, timeout=2.0) == exits.Hlt()
    assert backend.get_regs().rip == ENTRY + 1 and dispatcher.log == []
    assert backend.run(dispatcher, timeout=2.0) == exits.Hlt()
    assert backend.get_regs().rip == ENTRY + 4
    assert [entry[1] for entry in dispatcher.log] == [0x10]


def test_a_halted_vcpu_with_an_interrupt_pending_resumes_in_the_handler(backend):
    """With a userspace irqchip every hlt exits to userspace; the next KVM_RUN injects and goes on."""
    code = bytes.fromhex("fb") + HLT_OUT_HLT64  # sti; hlt; out 0x10, al; hlt
    load_boot_state(backend, 64, code)
    install_handler(backend)
    dispatcher = InterruptDispatcher()
    assert backend.run(dispatcher, timeout=2.0) == exits.Hlt()
    assert backend.get_regs().rip == ENTRY + 2
    dispatcher.interrupt_pending = True
    assert backend.run(dispatcher, timeout=2.0) == exits.Hlt()
    regs = backend.get_regs()
    assert dispatcher.acknowledged == [INTERRUPT_VECTOR]
    assert (regs.r15, regs.r14) == (1, ENTRY + 2)  # the handler returned to after the first hlt
    assert [entry[1] for entry in dispatcher.log] == [0x10] and regs.rip == ENTRY + 5


def test_set_regs_clearing_if_holds_back_an_interrupt(backend):
    """kvm_run.if_flag is from the last exit; after KVM_SET_REGS clears IF nothing may be injected."""
    load_boot_state(backend, 64, bytes.fromhex("fb") + HLT_OUT_HLT64)
    install_handler(backend)
    dispatcher = InterruptDispatcher()
    assert backend.run(dispatcher, timeout=2.0) == exits.Hlt()  # the exit leaves if_flag = 1
    regs = backend.get_regs()
    regs.rflags &= ~0x200
    backend.set_regs(regs)
    dispatcher.interrupt_pending = True
    assert backend.run(dispatcher, timeout=2.0) == exits.Hlt()
    assert dispatcher.acknowledged == [] and backend.get_regs().r15 == 0


def test_a_read_cut_short_by_an_exception_is_asked_again_by_the_next_run():
    """Ctrl-C (or a device's exception) inside the dispatcher at an `in`: the next run must not let
    KVM complete the `in` with a stale kvm_run value."""
    with KvmBackend(MEMORY, 64) as reference:
        load_boot_state(reference, 64, IN_LOOP64)
        assert reference.run(SequenceDispatcher(), timeout=30.0) == exits.Hlt()
        expected = reference.get_regs()

    class Failing(SequenceDispatcher):
        def pio(self, port, size, is_write, value, rip):
            if self.reads in self.fail_at:
                self.fail_at.discard(self.reads)
                raise KeyboardInterrupt
            return super().pio(port, size, is_write, value, rip)

    with KvmBackend(MEMORY, 64) as backend:
        load_boot_state(backend, 64, IN_LOOP64)
        dispatcher = Failing()
        dispatcher.fail_at = {0, 17, 1234}
        for _ in range(3):
            with pytest.raises(KeyboardInterrupt):
                backend.run(dispatcher, timeout=30.0)
            assert backend.get_regs().rip == ENTRY + 5  # still at the `in`
        assert backend.run(dispatcher, timeout=30.0) == exits.Hlt()
        assert dispatcher.reads == IN_LOOP64_ITERATIONS
        assert backend.get_regs() == expected
