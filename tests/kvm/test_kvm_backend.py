"""KvmBackend on the real /dev/kvm, with tiny hand-encoded guests (tests/kvm/kvm_guests.py)."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

import pytest

from kvm_guests import (
    DIRTY64, EMPTY_IDT_DESCRIPTOR, ENDLESS, ENTRY, HLT, MMIO64, MMIO_ADDRESS, OUT_HLT16,
    OUT_HLT16_OTHER, PORT_ROUND_TRIP16, STRING_IO16, TRIPLE_FAULT64, RecordingDispatcher,
    load_boot_state, load_real_mode,
)
from labkit import exits
from labkit.backend import Backend
from labkit.errors import ConfigError, KvmError
from labkit.kvm import KvmBackend
from labkit.kvm import bindings as kb
from labkit.kvm.system import Kvm, kvm_flavour, probe
from labkit.x86 import layout
from labkit.x86.state import DebugRegs, Regs

pytestmark = pytest.mark.kvm

MEMORY = 2 << 20


@pytest.fixture
def backend():
    with KvmBackend(MEMORY, 64) as vm:
        yield vm


def test_is_a_backend(backend):
    assert isinstance(backend, Backend)
    assert backend.kind == "kvm"
    assert len(backend.memory) == MEMORY and not backend.memory.readonly
    info = backend.describe()
    assert info["backend"] == "kvm" and info["flavour"] == kvm_flavour()


def test_port_out_and_in_round_trip_real_mode(backend):
    load_real_mode(backend, PORT_ROUND_TRIP16)
    dispatcher = RecordingDispatcher({0x11: 0x1FF, 0x3F8: lambda: answers.pop(0)})
    answers = [0x12345, 0x1_DEADBEEF]
    result = backend.run(dispatcher, timeout=2.0)
    assert result == exits.Hlt()
    accesses = [entry[1:5] for entry in dispatcher.log]
    assert accesses == [
        (0x10, 1, True, 0x48),
        (0x3F8, 2, True, 0xBEEF),
        (0x11, 1, False, 0),
        (0x3F8, 2, False, 0),
        (0x3F8, 4, False, 0),
    ]
    regs = backend.get_regs()
    assert regs.rbx & 0xFF == 0xFF            # 0x1FF masked to one byte
    assert regs.rcx & 0xFFFF == 0x2345        # 0x12345 masked to two bytes
    assert regs.rsi & 0xFFFF_FFFF == 0xDEADBEEF
    assert regs.rip == ENTRY + len(PORT_ROUND_TRIP16)
    # RIP at an `out` exit is past the instruction: `out 0x10, al` is at ENTRY + 2.
    assert dispatcher.log[0][5] == ENTRY + 4


def test_string_io_calls_the_dispatcher_per_element(backend):
    load_real_mode(backend, STRING_IO16)
    backend.memory[0x9000:0x9005] = b"hello"
    letters = iter(b"ABC")
    dispatcher = RecordingDispatcher({0x3F8: lambda: next(letters) | 0x100})
    assert backend.run(dispatcher, timeout=2.0) == exits.Hlt()
    writes = [entry[4] for entry in dispatcher.log if entry[3]]
    reads = [entry for entry in dispatcher.log if not entry[3]]
    assert bytes(writes) == b"hello"
    assert len(reads) == 3
    assert bytes(backend.memory[0x9100:0x9103]) == b"ABC"


def test_a_stop_at_a_string_ins_completes_it_first(backend):
    load_real_mode(backend, STRING_IO16)
    letters = iter(b"ABC")

    class StopAtReads(RecordingDispatcher):
        def pio(self, port, size, is_write, value, rip):
            answer = super().pio(port, size, is_write, value, rip)
            self.stop = not is_write
            return answer

    dispatcher = StopAtReads({0x3F8: lambda: next(letters)})
    assert backend.run(dispatcher, timeout=2.0) == exits.Io(0x3F8, 1, False, ord("C"))
    regs = backend.get_regs()
    # KVM finished the elements it had asked for: RDI and RCX moved on, the bytes are in memory
    # (RIP may still point at `rep insb`, which then has nothing left to do).
    assert (regs.rdi & 0xFFFF, regs.rcx & 0xFFFF) == (0x9103, 0)
    assert bytes(backend.memory[0x9100:0x9103]) == b"ABC"
    assert backend.run(dispatcher, timeout=2.0) == exits.Hlt()
    assert len(dispatcher.log) == 8  # five writes, three reads, none read again


def test_stop_returns_the_io_exit_and_the_guest_resumes(backend):
    load_real_mode(backend, OUT_HLT16)
    dispatcher = RecordingDispatcher(stop_on={0x10})
    backend.set_regs(Regs(rip=ENTRY, rax=0x5A))
    assert backend.run(dispatcher, timeout=2.0) == exits.Io(port=0x10, size=1, is_write=True, data=0x5A)
    dispatcher.stop_on.clear()
    assert backend.run(dispatcher, timeout=2.0) == exits.Hlt()
    assert len(dispatcher.log) == 1


def test_set_regs_after_an_exit_wins_over_sync_regs(backend):
    """KVM_SET_REGS between two KVM_RUNs must not be undone by the kvm_run sync-regs copy."""
    load_real_mode(backend, OUT_HLT16)
    backend.memory[ENTRY + 0x100:ENTRY + 0x103] = OUT_HLT16_OTHER
    dispatcher = RecordingDispatcher(stop_on={0x10})
    backend.run(dispatcher, timeout=2.0)
    assert backend.get_regs().rip == dispatcher.log[-1][5] == ENTRY + 2
    regs = backend.get_regs()
    regs.rip, regs.rax = ENTRY + 0x100, 0x77
    backend.set_regs(regs)
    assert backend.run(dispatcher, timeout=2.0) == exits.Hlt()
    assert dispatcher.log[-1] == ("pio", 0x20, 1, True, 0x77, ENTRY + 0x102)
    assert backend.get_regs().rip == ENTRY + 0x103


def test_mmio_beyond_ram_reads_the_dispatchers_value(backend):
    load_boot_state(backend, 64, MMIO64)
    dispatcher = RecordingDispatcher({MMIO_ADDRESS: 0x1122_3344_5566_7788})
    assert backend.run(dispatcher, timeout=2.0) == exits.Hlt()
    assert [entry[1:5] for entry in dispatcher.log] == [
        (MMIO_ADDRESS, 8, False, 0),
        (MMIO_ADDRESS + 0x10, 4, True, 0x11223344),
    ]
    assert backend.get_regs().rbx == 0x1122_3344_5566_7788


def test_a_stop_at_an_mmio_read_completes_it_first(backend):
    load_boot_state(backend, 64, MMIO64)
    dispatcher = RecordingDispatcher({MMIO_ADDRESS: 0x1122_3344_5566_7788}, stop_on={MMIO_ADDRESS})
    assert backend.run(dispatcher, timeout=2.0) == exits.Mmio(MMIO_ADDRESS, 8, False, 0x1122_3344_5566_7788)
    regs = backend.get_regs()
    assert (regs.rax, regs.rip) == (0x1122_3344_5566_7788, ENTRY + 8)  # past `mov rax, [0x10000000]`
    assert backend.run(dispatcher, timeout=2.0) == exits.Hlt()
    assert backend.get_regs().rbx == 0x1122_3344_5566_7788 and len(dispatcher.log) == 2


def test_hlt_exit(backend):
    load_boot_state(backend, 64, HLT)
    assert backend.run(RecordingDispatcher(), timeout=2.0) == exits.Hlt()
    assert backend.get_regs().rip == ENTRY + 1


def test_triple_fault_is_a_shutdown(backend):
    load_boot_state(backend, 64, TRIPLE_FAULT64)
    backend.memory[0x9000:0x900A] = EMPTY_IDT_DESCRIPTOR
    assert backend.run(RecordingDispatcher(), timeout=2.0) == exits.Shutdown()


@pytest.mark.parametrize("user", [False, True], ids=["cpl0-emulated", "cpl3-native"])
def test_endless_loop_times_out_within_budget(backend, user):
    load_boot_state(backend, 64, ENDLESS, user=user)
    start = time.monotonic()
    result = backend.run(RecordingDispatcher(), timeout=0.2)
    elapsed = time.monotonic() - start
    assert result == exits.Timeout(budget_s=0.2)
    assert 0.2 <= elapsed < 0.5  # the budget, plus room for a loaded machine's scheduling
    # The VM is still usable: run the loop again, then point it at a hlt.
    assert backend.run(RecordingDispatcher(), timeout=0.05) == exits.Timeout(budget_s=0.05)
    if not user:
        backend.memory[0x9000] = 0xF4
        regs = backend.get_regs()
        regs.rip = 0x9000
        backend.set_regs(regs)
        assert backend.run(RecordingDispatcher(), timeout=2.0) == exits.Hlt()


def test_without_the_kernel_timer_the_watchdog_thread_stops_the_run(backend, monkeypatch):
    """The kernel timer (ThreadTimer) kicks a run at its deadline; where the kernel refuses one, the
    watchdog thread must: the run still ends in its budget, and no kick is left pending."""
    import labkit.kvm.backend as kvm_backend

    class RefusedTimer:
        ok = False

        def __init__(self, *args):
            pass

        def close(self):
            pass

    monkeypatch.setattr(kvm_backend, "ThreadTimer", RefusedTimer)
    load_boot_state(backend, 64, ENDLESS)
    start = time.monotonic()
    assert backend.run(RecordingDispatcher(), timeout=0.2) == exits.Timeout(budget_s=0.2)
    assert 0.2 <= time.monotonic() - start < 0.6
    assert signal.SIGUSR1 not in signal.sigpending()


def test_timeout_from_another_thread_and_no_thread_leak(backend):
    load_boot_state(backend, 64, ENDLESS)
    backend.run(RecordingDispatcher(), timeout=0.01)  # starts the shared watchdog
    threads_before = threading.active_count()
    results = []

    def worker():
        start = time.monotonic()
        results.append((backend.run(RecordingDispatcher(), timeout=0.1), time.monotonic() - start))

    for _ in range(3):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join(5)
    assert [result for result, _ in results] == [exits.Timeout(budget_s=0.1)] * 3
    assert all(elapsed < 0.4 for _, elapsed in results)
    assert threading.active_count() == threads_before
    assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, ())


def test_sigint_during_run_raises_keyboard_interrupt_and_vm_survives(backend):
    load_boot_state(backend, 64, ENDLESS)
    main = threading.get_ident()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.1, signal.pthread_kill, (main, signal.SIGINT))
    try:
        start = time.monotonic()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            backend.run(RecordingDispatcher(), timeout=5.0)
        assert time.monotonic() - start < 1.0
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert backend.run(RecordingDispatcher(), timeout=0.05) == exits.Timeout(budget_s=0.05)


def test_dirty_log_shows_written_pages_then_is_cleared(backend):
    load_boot_state(backend, 64, DIRTY64)
    backend.dirty_log_start()
    assert backend.run(RecordingDispatcher(), timeout=2.0) == exits.Hlt()
    assert backend.dirty_log_fetch() == [0x20, 0x31]  # CPL0: KVM's emulator under PVM, exact on EPT too
    assert backend.dirty_log_fetch() == []  # reading the log cleared it
    backend.memory[0x50000] = 1
    assert backend.dirty_log_fetch() == []  # the host's own writes are not logged


def test_stats_have_exit_counters_that_grow(backend):
    load_real_mode(backend, PORT_ROUND_TRIP16)
    before = backend.stats()
    assert {"exits", "io_exits", "halt_exits", "insn_emulation"} <= set(before)
    backend.run(RecordingDispatcher(), timeout=2.0)
    after = backend.stats()
    assert after["exits"] >= before["exits"] + 6  # five port accesses and the hlt
    assert after["halt_exits"] == before["halt_exits"] + 1
    if kvm_flavour() == "kvm_pvm":  # PVM emulates all CPL0 code: one count per instruction
        assert after["insn_emulation"] >= before["insn_emulation"] + 12


def test_regs_sregs_msrs_fpu_round_trip(backend):
    load_boot_state(backend, 64, HLT)
    regs = backend.get_regs()
    regs.r15, regs.rdi = 0x0123_4567_89AB_CDEF, 42
    backend.set_regs(regs)
    assert backend.get_regs() == regs
    sregs = backend.get_sregs()
    assert sregs.cs.l == 1 and sregs.efer & 0x500 == 0x500  # long mode active
    sregs.cr2 = 0xDEAD000
    backend.set_sregs(sregs)
    assert backend.get_sregs().cr2 == 0xDEAD000
    backend.set_msrs({0xC0000102: 0x1234_5000})  # IA32_KERNEL_GS_BASE
    assert backend.get_msrs([0xC0000102]) == {0xC0000102: 0x1234_5000}
    with pytest.raises(KvmError, match="MSR 0xdeadbeef"):
        backend.get_msrs([0xDEADBEEF])
    fpu = dataclasses.replace(backend.get_fpu(), fcw=0x27F, mxcsr=0x1FA0, st=(1 << 79 | 0x3FFF << 64,) + (0,) * 7,
                              xmm=tuple(range(1 << 100, (1 << 100) + 16)))
    backend.set_fpu(fpu)
    assert backend.get_fpu() == fpu
    debug = DebugRegs(dr0=0x1000, dr3=0x7000, dr7=0x401)
    backend.set_debug_regs(debug)
    assert backend.get_debug_regs() == debug


def test_without_sync_regs_rip_comes_from_kvm_get_regs(backend):
    backend.sync_regs = False  # what a kernel without KVM_CAP_SYNC_REGS gets
    load_real_mode(backend, OUT_HLT16)
    dispatcher = RecordingDispatcher()
    assert backend.run(dispatcher, timeout=2.0) == exits.Hlt()
    assert dispatcher.log == [("pio", 0x10, 1, True, 0, ENTRY + 2)]


def test_sync_regs_are_used_where_the_kernel_offers_them(backend):
    with Kvm() as kvm:
        offered = bool(kvm.check_extension(kb.KVM_CAP_SYNC_REGS) & kb.KVM_SYNC_X86_REGS)
    assert backend.sync_regs == offered


def kvm_get_regs(backend) -> Regs:
    """KVM_GET_REGS itself, past the backend's sync-regs copy."""
    raw = backend._vcpu.get_regs()
    return Regs(*(getattr(raw, name) for name, _ in kb.kvm_regs._fields_))


def test_registers_read_after_a_run_are_what_kvm_get_regs_says(backend):
    """get_regs() reads KVM's sync-regs copy after a run: the same values as the ioctl, at every way a
    run ends (a halt, a stop at an `out`, a stop at an `in` completed first), and what set_regs set."""
    load_real_mode(backend, PORT_ROUND_TRIP16)
    ends = [backend.run(RecordingDispatcher({0x11: 0x5A, 0x3F8: 0x1234}, stop_on={0x10}), timeout=2.0),
            backend.run(RecordingDispatcher({0x11: 0x5A, 0x3F8: 0x1234}, stop_on={0x11}), timeout=2.0),
            backend.run(RecordingDispatcher({0x11: 0x5A, 0x3F8: 0x1234}), timeout=2.0)]
    assert [type(end) for end in ends] == [exits.Io, exits.Io, exits.Hlt]
    assert backend._regs_synced == backend.sync_regs  # the copy is what was read
    assert backend.get_regs() == kvm_get_regs(backend)
    changed = dataclasses.replace(backend.get_regs(), rbx=0xFEED, rip=ENTRY)
    backend.set_regs(changed)
    assert backend.get_regs() == changed == kvm_get_regs(backend)
    steps = []
    for stop_on in ({0x10}, {0x11}):
        backend.run(RecordingDispatcher({0x11: 0x77}, stop_on=stop_on), timeout=2.0)
        steps.append((backend.get_regs(), kvm_get_regs(backend)))
    assert all(synced == asked for synced, asked in steps)
    assert steps[1][0].rax & 0xFF == 0x77  # the `in` completed before the run returned


def test_registers_a_handler_set_during_the_run_are_read_back_not_the_stale_copy(backend):
    """A device handler that sets registers at the exit the run stops on (after the last KVM_RUN, so
    KVM's sync-regs copy predates it): get_regs() must return what it set."""
    load_real_mode(backend, PORT_ROUND_TRIP16)

    class SetsRegisters(RecordingDispatcher):
        def pio(self, port, size, is_write, value, rip):
            answer = super().pio(port, size, is_write, value, rip)
            if self.stop:
                backend.set_regs(dataclasses.replace(kvm_get_regs(backend), rbx=0xBEEF))
            return answer

    assert isinstance(backend.run(SetsRegisters({0x11: 0x5A}, stop_on={0x10}), timeout=2.0), exits.Io)
    assert backend.get_regs().rbx == 0xBEEF == kvm_get_regs(backend).rbx


def test_bad_arguments_are_config_errors():
    for size in (MEMORY + 100, 4096, 64 << 30, "2M"):  # the one check (x86/layout.py), its own message
        with pytest.raises(ConfigError) as raised:
            KvmBackend(size, 64)
        with pytest.raises(ConfigError) as expected:
            layout.check_memory_size(size)
        assert str(raised.value) == str(expected.value)
    with pytest.raises(ConfigError, match="mode"):
        KvmBackend(MEMORY, 48)
    with KvmBackend(MEMORY, 16) as vm:
        with pytest.raises(ConfigError, match="timeout"):
            vm.run(RecordingDispatcher(), timeout=0)
    with pytest.raises(ConfigError, match="closed"):
        vm.run(RecordingDispatcher(), timeout=1.0)
    vm.close()  # closing twice is fine


def test_a_failing_ioctl_names_itself():
    with Kvm() as kvm, kvm.create_vm() as vm:
        with pytest.raises(KvmError) as caught:
            vm.set_user_memory_region(1 << 20, 0, 0x1000, 0x1000)  # no such slot number
    assert str(caught.value) == "KVM_SET_USER_MEMORY_REGION failed: errno 22 (EINVAL)"


def test_probe_reports_a_usable_kvm_and_its_flavour():
    start = time.monotonic()
    status = probe()
    assert time.monotonic() - start < 1.0, "probe() must stay cheap: labkit doctor and backend='auto' call it"
    assert status.usable and status.problem is None
    assert status.api_version == 12
    assert status.permissions.startswith("c")
    assert status.flavour == kvm_flavour()
    if os.path.isdir("/sys/module/kvm_pvm"):
        assert status.flavour == "kvm_pvm"


def test_probe_never_raises_and_says_how_to_fix(tmp_path):
    missing = probe(str(tmp_path / "kvm"))
    assert not missing.usable and "backend='emu'" in missing.problem
    not_kvm = probe("/dev/null")
    assert not not_kvm.usable and "KVM_GET_API_VERSION" in not_kvm.problem
