"""The Unicorn backend against tiny guests: port I/O, MMIO, hlt, exception delivery, rings, timeouts."""

from __future__ import annotations

import os
import struct
import time

import pytest

from labkit.backend import Backend
from labkit.emu import EmuBackend
from labkit.errors import ConfigError
from labkit.exits import EmulatorFailure, Hlt, Io, Mmio, Shutdown, Timeout
from labkit.x86 import layout
from labkit.x86.idt import INTERRUPT_GATE, Gate, encode_gate64

from emu_guests import ENTRY, Recorder, assemble, boot, needs_binutils

pytestmark = [pytest.mark.emu, needs_binutils]
STACK64 = layout.STACK_TOP


def gate64(vector: int, handler: int, dpl: int = 0) -> tuple[int, bytes]:
    """(address, bytes) that point IDT vector ``vector`` at ``handler`` in labkit's 64-bit IDT."""
    gate = Gate(offset=handler, selector=layout.KERNEL_CS64, type=INTERRUPT_GATE, dpl=dpl)
    return layout.IDT_ADDRESS + 16 * vector, encode_gate64(gate)


def qwords(backend: EmuBackend, address: int, count: int) -> tuple[int, ...]:
    return struct.unpack_from(f"<{count}Q", backend.memory, address)


def fault_exit(backend: EmuBackend, recorder: Recorder) -> int:
    """Run until the boot fault stub reports a vector on FAULT_PORT; return the vector."""
    exit_ = backend.run(recorder, 2.0)
    assert exit_ == Io(layout.FAULT_PORT, 1, True, exit_.data), exit_
    return exit_.data


def test_protocol_and_describe():
    with EmuBackend(2 << 20, 64) as backend:
        assert isinstance(backend, Backend)
        assert backend.kind == "emu"
        info = backend.describe()
        assert info["backend"] == "emu" and info["engine"] == "unicorn 2.1.4"
        assert info["disassembler"].startswith("capstone 5")
        backend.memory[0x9000:0x9004] = b"\x01\x02\x03\x04"
        assert bytes(backend.memory[0x9000:0x9004]) == b"\x01\x02\x03\x04"


@pytest.mark.parametrize("memory_size, mode", [(2 << 20, 8), (12345, 64), (1 << 31, 64)])
def test_bad_arguments_are_config_errors(memory_size, mode):
    with pytest.raises(ConfigError):
        EmuBackend(memory_size, mode)


@pytest.mark.parametrize("memory_size", [12345, 4096, 1 << 31, "2M"])
def test_a_bad_memory_size_gets_the_one_check_s_message(memory_size):
    with pytest.raises(ConfigError) as raised:
        EmuBackend(memory_size, 64)
    with pytest.raises(ConfigError) as expected:
        layout.check_memory_size(memory_size)
    assert str(raised.value) == str(expected.value)


SOURCES = {
    16: """
        mov dx, 0x3f8
        mov al, 'H'
        out dx, al
        mov ax, 0xbeef
        out 0x10, ax
        in al, dx
        mov bl, al
        in ax, 0x11
        mov cx, ax
        in eax, dx
        mov esi, eax
        out 0xf4, al
        inc edi
        hlt
    """,
    32: """
        mov dx, 0x3f8
        mov al, 'H'
        out dx, al
        mov eax, 0xdeadbeef
        out 0x10, eax
        in al, dx
        mov bl, al
        in ax, 0x11
        mov cx, ax
        in eax, dx
        mov esi, eax
        out 0xf4, al
        inc edi
        hlt
    """,
}
SOURCES[64] = SOURCES[32]


@pytest.mark.parametrize("mode", [16, 32, 64])
def test_port_io_round_trip_in_every_mode(mode):
    backend = boot(mode, assemble(SOURCES[mode], bits=mode))
    recorder = Recorder(replies={0x3F8: 0x12345678, 0x11: 0xCAFE})
    exit_ = backend.run(recorder, 2.0)
    assert isinstance(exit_, Io) and exit_.port == layout.DEBUG_EXIT_PORT and exit_.is_write
    writes = [(port, size, value) for kind, port, size, is_write, value, _ in recorder.trace if is_write]
    wide = 0xBEEF if mode == 16 else 0xDEADBEEF
    assert writes[:2] == [(0x3F8, 1, ord("H")), (0x10, 2 if mode == 16 else 4, wide)]
    regs = backend.get_regs()
    assert regs.rbx & 0xFF == 0x78 and regs.rcx & 0xFFFF == 0xCAFE and regs.rsi & 0xFFFFFFFF == 0x12345678
    # The stop is exact: the guest has not run past the OUT (inc edi), and resumes right after it.
    assert regs.rdi == 0
    assert backend.run(recorder, 2.0) == Hlt()
    assert backend.get_regs().rdi == 1


def test_stop_on_in_keeps_the_value_and_stops_exactly():
    code = assemble("""
        mov ebx, 0x11111111
        in eax, 0xf1
        inc ebx
        hlt
    """)
    backend = boot(64, code)
    recorder = Recorder(replies={0xF1: 0xA5A5A5A5})
    assert backend.run(recorder, 2.0) == Io(0xF1, 4, False, 0xA5A5A5A5)
    regs = backend.get_regs()
    assert regs.rax == 0xA5A5A5A5 and regs.rbx == 0x11111111
    assert backend.run(recorder, 2.0) == Hlt()
    assert backend.get_regs().rbx == 0x11111112


def test_mmio_above_ram_reads_dispatcher_values_and_reports_writes():
    code = assemble("""
        mov eax, [0x10000000]
        mov rbx, rax
        mov dword ptr [0x10000010], 0x11223344
        mov ecx, [0x3ff00000]
        hlt
    """)
    backend = boot(64, code)
    recorder = Recorder(replies={0x1000_0000: 0x0123_4567_89AB_CDEF})
    assert backend.run(recorder, 2.0) == Hlt()
    assert backend.get_regs().rbx == 0x89AB_CDEF
    assert ("mmio", 0x1000_0000, 4, False, 0) in recorder.trace
    assert ("mmio", 0x1000_0010, 4, True, 0x11223344) in recorder.trace
    assert ("mmio", 0x3FF0_0000, 4, False, 0) in recorder.trace


def test_mmio_stop_returns_an_mmio_exit():
    class StopOnMmio(Recorder):
        def mmio(self, address, size, is_write, value, rip):
            super().mmio(address, size, is_write, value, rip)
            self.stop = True
            return 0

    backend = boot(64, assemble("mov dword ptr [0x10000000], 7\nhlt"))
    assert backend.run(StopOnMmio(), 2.0) == Mmio(0x1000_0000, 4, True, 7)


def test_hlt_leaves_rip_after_the_hlt():
    backend = boot(64, assemble("nop\nhlt\nnop"))
    assert backend.run(Recorder(), 2.0) == Hlt()
    assert backend.get_regs().rip == ENTRY + 2


def test_gp_pf_ud_are_delivered_through_the_guests_idt_with_frame_and_cr2():
    code = assemble("""
        mov rax, 0x8000000000000000
        mov rbx, [rax]          # non-canonical: #GP(0)
    """)
    backend = boot(64, code)
    recorder = Recorder()
    assert fault_exit(backend, recorder) == 13
    rsp = backend.get_regs().rsp
    _, error, rip, cs, rflags, old_rsp, ss = qwords(backend, rsp, 7)
    assert (error, rip, cs, old_rsp, ss) == (0, ENTRY + 10, layout.KERNEL_CS64, STACK64, layout.KERNEL_DS)
    assert rflags & 0x2

    backend = boot(64, assemble("mov rbx, [0x40000000]"))  # above the 1 GiB the boot tables map: #PF
    assert fault_exit(backend, recorder) == 14
    _, error, rip = qwords(backend, backend.get_regs().rsp, 3)
    assert error == 0 and rip == ENTRY  # not present, read, supervisor
    assert backend.get_sregs().cr2 == 0x4000_0000

    backend = boot(64, assemble("nop\nud2"))
    assert fault_exit(backend, recorder) == 6
    _, rip, cs = qwords(backend, backend.get_regs().rsp, 3)  # no error code for #UD
    assert rip == ENTRY + 1 and cs == layout.KERNEL_CS64


def test_fault_delivery_in_real_mode_and_protected_mode():
    recorder = Recorder()
    backend = boot(16, assemble("nop\nud2", bits=16))
    assert fault_exit(backend, recorder) == 6
    sp = backend.get_regs().rsp & 0xFFFF
    ss_base = backend.get_sregs().ss.base
    _, ip, cs, _flags = struct.unpack_from("<4H", backend.memory, ss_base + sp)
    assert (ip, cs) == (ENTRY + 1, 0)

    backend = boot(32, assemble("mov ax, 0x1238\nmov ds, ax", bits=32))  # beyond the GDT limit
    assert fault_exit(backend, recorder) == 13
    _, error, eip, cs = struct.unpack_from("<4I", backend.memory, backend.get_regs().rsp)
    assert (error, eip, cs) == (0x1238, ENTRY + 4, layout.KERNEL_CS32)


def test_ten_thousand_gps_all_arrive_as_vector_13():
    handler = ENTRY + 0x100
    code = assemble("""
        mov ecx, 10000
        mov rax, 0x8000000000000000
    1:  mov rbx, [rax]          # 3 bytes, #GP(0)
        dec ecx
        jnz 1b
        out 0xf4, al
    .org 0x100
        add rsp, 8              # drop the error code
        add qword ptr [rsp], 3  # skip the faulting instruction
        inc r12
        iretq
    """)
    backend = boot(64, code, extra=[gate64(13, handler)])
    recorder = Recorder()
    assert backend.run(recorder, 20.0) == Io(layout.DEBUG_EXIT_PORT, 1, True, 0)
    assert backend.get_regs().r12 == 10_000
    assert all(entry[1] != layout.FAULT_PORT for entry in recorder.trace)  # no #DF ever


def test_ring3_privileged_instructions_trap_and_pushf_popf_do_not():
    recorder = Recorder()
    for instruction in ("cli", "hlt", "in al, 0x60"):
        backend = boot(64, assemble(f"pushfq\npopfq\n{instruction}"), user=True)
        assert fault_exit(backend, recorder) == 13, instruction
        _, error, rip, cs = qwords(backend, backend.get_regs().rsp, 4)
        assert (error, rip, cs) == (0, ENTRY + 2, layout.USER_CS64), instruction
        assert backend.get_sregs().cpl == 0  # the handler runs in ring 0 on RSP0's stack
        assert backend.get_regs().rsp < layout.KERNEL_STACK_TOP


def test_int_0x80_from_ring3_uses_a_dpl3_gate_and_a_dpl0_gate_gives_gp():
    handler = ENTRY + 0x100
    code = assemble("""
        mov ebx, 42
        int 0x80
        int 0x81
    .org 0x100
        mov r13, [rsp + 8]      # CS of the caller
        mov r14, [rsp]          # RIP after the int
        iretq
    """)
    backend = boot(64, code, user=True, extra=[gate64(0x80, handler, dpl=3), gate64(0x81, handler, dpl=0)])
    recorder = Recorder()
    assert fault_exit(backend, recorder) == 13
    regs = backend.get_regs()
    assert regs.r13 == layout.USER_CS64 and regs.r14 == ENTRY + 7
    _, error, rip = qwords(backend, regs.rsp, 3)
    assert error == 0x81 * 8 + 2 and rip == ENTRY + 7


def test_syscall_and_sysret_follow_star_lstar_sfmask():
    handler = ENTRY + 0x100
    code = assemble("""
        xor r15d, r15d          # 3 bytes
        syscall
        mov r15, 1
        ud2                     # back in ring 3: the #UD frame shows the user CS
    .org 0x100
        mov r8, rcx
        mov r9, r11
        mov r10, cs
        sysretq
    """)
    backend = boot(64, code, user=True)
    backend.set_msrs({0xC0000082: handler})
    assert fault_exit(backend, Recorder()) == 6
    regs = backend.get_regs()
    assert regs.r15 == 1
    assert regs.r8 == ENTRY + 5  # RCX = RIP after syscall
    assert regs.r10 == layout.KERNEL_CS64
    assert regs.r9 & 0x200  # R11 = RFLAGS at the syscall (IF set in ring 3)
    assert qwords(backend, regs.rsp, 3)[2] == layout.USER_CS64


def test_triple_fault_is_a_shutdown():
    code = bytes.fromhex("0f011c2500900000" "0f0b")  # lidt [0x9000] (limit 0) ; ud2
    backend = boot(64, code)
    assert backend.run(Recorder(), 2.0) == Shutdown()
    assert backend.run(Recorder(), 2.0) == Shutdown()


@pytest.mark.parametrize("source", ["jmp .", "1: out 0x80, al\n in al, 0x80\n jmp 1b"])
def test_endless_guests_time_out_within_the_budget(source):
    backend = boot(64, assemble(source))
    started = time.monotonic()
    assert backend.run(Recorder(stop_ports=()), 0.3) == Timeout(budget_s=0.3)
    assert time.monotonic() - started < 0.3 + 0.2


def test_an_exception_in_the_dispatcher_is_re_raised_and_the_backend_stays_usable():
    class Broken(Recorder):
        def pio(self, port, size, is_write, value, rip):
            if port == 0x99:
                raise KeyError("no device at 0x99")
            return super().pio(port, size, is_write, value, rip)

    backend = boot(64, assemble("out 0x99, al\nmov ebx, 5\nout 0xf4, al\nhlt"))
    with pytest.raises(KeyError):
        backend.run(Broken(), 2.0)
    assert backend.get_regs().rip == ENTRY + 2 and backend.get_regs().rbx == 0
    assert backend.run(Broken(), 2.0) == Io(layout.DEBUG_EXIT_PORT, 1, True, 0)
    assert backend.get_regs().rbx == 5


def test_fetch_outside_ram_stops_with_a_clear_failure():
    backend = boot(64, assemble("mov rax, 0x10000000\njmp rax"))
    exit_ = backend.run(Recorder(), 2.0)
    assert isinstance(exit_, EmulatorFailure)
    assert "fetched code from guest-physical memory with no RAM" in exit_.message


def test_sregs_round_trip_and_cpl3_start():
    backend = boot(64, assemble("hlt"), user=True)
    sregs = backend.get_sregs()
    assert sregs.cs.selector == layout.KERNEL_CS64 and sregs.cs.l == 1 and sregs.efer & 0x500 == 0x500
    backend.set_sregs(sregs)
    again = backend.get_sregs()
    assert again == sregs


def test_backend_survives_fork():
    backend = boot(64, assemble("mov al, 9\nout 0xf4, al\nhlt"))
    pid = os.fork()
    if pid == 0:  # child: run the guest, report through the exit status
        try:
            exit_ = backend.run(Recorder(), 2.0)
            os._exit(exit_.data if isinstance(exit_, Io) else 99)
        except BaseException:
            os._exit(98)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 9
    assert backend.run(Recorder(), 2.0) == Io(layout.DEBUG_EXIT_PORT, 1, True, 9)


def test_close_is_idempotent_and_final():
    backend = EmuBackend(2 << 20, 64)
    backend.close()
    backend.close()
    with pytest.raises(Exception):
        backend.get_regs()


RF = 0x10000


@pytest.mark.parametrize("way", ["c", "python"])
def test_rf_is_pushed_for_faults_only(way, monkeypatch):
    # SDM vol. 3, 18.3.1.1: the RFLAGS image pushed for a fault has RF = 1; traps (int3), software
    # `int n` do not set it; the handler runs with RF = 0.  Each #UD is seen twice: the second goes
    # through the replay of the first's plan (C, or Python's fast path).  The trap and `int n` come
    # first: the `iretq` from a fault's handler loads the pushed RF = 1 (which the CPU clears once the
    # next instruction completes, and QEMU only at the next block end that is not a direct jump).
    from labkit.emu import unicorn_backend
    if way == "python":
        monkeypatch.setattr(unicorn_backend, "load_native", lambda: None)
    code = assemble("""
        int3
        int 0x30
        ud2
        ud2
        mov rax, 0x8000000000000000
        mov rbx, [rax]
    .org 0x200
        mov r8, r9
        mov r9, [rsp + 16]      # #UD: no error code
        add qword ptr [rsp], 2
        iretq
    .org 0x300
        mov r10, [rsp + 16]     # #BP, a trap
        iretq
    .org 0x380
        mov r11, [rsp + 16]     # int 0x30
        iretq
    .org 0x400
        mov r12, [rsp + 24]     # #GP(0): after the error code
        pushfq
        pop r13
        out 0xf4, al
    """)
    backend = boot(64, code, extra=[gate64(6, ENTRY + 0x200), gate64(3, ENTRY + 0x300),
                                    gate64(0x30, ENTRY + 0x380), gate64(13, ENTRY + 0x400)])
    exit_ = backend.run(Recorder(), 5.0)
    assert isinstance(exit_, Io) and exit_.port == layout.DEBUG_EXIT_PORT
    regs = backend.get_regs()
    pushed = {"#UD": regs.r8, "#UD again": regs.r9, "int3": regs.r10, "int 0x30": regs.r11, "#GP": regs.r12,
              "handler": regs.r13}
    assert {name: bool(value & RF) for name, value in pushed.items()} == {
        "#UD": True, "#UD again": True, "int3": False, "int 0x30": False, "#GP": True, "handler": False}


def test_batched_register_reads_equal_the_bindings_one_by_one():
    """get_fpu, get_debug_regs and get_msrs read through one uc_reg_read_batch each: every value equals what
    Unicorn's binding reads register by register, after random values were set."""
    import random

    from unicorn import x86_const as X

    from labkit.snapshot.state import SAVED_MSRS
    from labkit.x86.state import DebugRegs, FpuState

    rng = random.Random(7)
    backend = EmuBackend(memory_size=1 << 20, mode=64)
    try:
        backend.set_fpu(FpuState(fcw=0x37F, fsw=rng.getrandbits(16) & 0x3FFF, ftw=rng.getrandbits(8),
                                 fop=rng.getrandbits(11), fip=rng.getrandbits(48), fdp=rng.getrandbits(48),
                                 mxcsr=0x1F80 | rng.getrandbits(6),
                                 st=tuple(rng.getrandbits(79) for _ in range(8)),
                                 xmm=tuple(rng.getrandbits(128) for _ in range(16))))
        backend.set_debug_regs(DebugRegs(*(rng.getrandbits(32) << 2 for _ in range(4)), 0xFFFF0FF0, 0x400 | 0xFF))
        backend.set_msrs({0xC0000081: rng.getrandbits(48) << 16, 0xC0000082: 0x8000 + rng.getrandbits(12)})
        uc = backend._live().uc
        fpu = backend.get_fpu()
        top = (fpu.fsw >> 11) & 7
        for i in range(8):
            significand, exponent = uc.reg_read(X.UC_X86_REG_FP0 + (top + i) % 8)
            assert fpu.st[i] == significand | exponent << 64 != 0
        assert fpu.xmm == tuple(uc.reg_read(X.UC_X86_REG_XMM0 + i) for i in range(16))
        assert (fpu.fcw, fpu.fsw, fpu.fop, fpu.fip, fpu.fdp, fpu.mxcsr) == tuple(uc.reg_read(register) for register in (
            X.UC_X86_REG_FPCW, X.UC_X86_REG_FPSW, X.UC_X86_REG_FOP, X.UC_X86_REG_FIP, X.UC_X86_REG_FDP,
            X.UC_X86_REG_MXCSR))
        assert backend.get_debug_regs() == DebugRegs(*(uc.reg_read(register) for register in (
            X.UC_X86_REG_DR0, X.UC_X86_REG_DR1, X.UC_X86_REG_DR2, X.UC_X86_REG_DR3, X.UC_X86_REG_DR6,
            X.UC_X86_REG_DR7)))
        msrs = backend.get_msrs(SAVED_MSRS)
        with backend._live().intercepts.suspended():  # as get_msrs reads them (an intercept would longjmp)
            assert msrs == {index: uc.msr_read(index) for index in SAVED_MSRS} and msrs[0xC0000082] >= 0x8000
    finally:
        backend.close()
