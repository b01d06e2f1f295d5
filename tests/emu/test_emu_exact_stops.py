"""Every stop from outside the guest (kick, pause, deadline) lands at an instruction boundary.

Unicorn 2.1.4 checks for a stop request after every guest load and store and
restarts the instruction there, even after its store landed; labkit's backend
asks for these stops only at translated-block boundaries (see
``labkit.emu.unicorn_backend``), so a read-modify-write instruction on memory is
never run twice and never left half done.  Each guest below counts in memory
with such instructions; stopped hundreds of times it must end with memory and
registers equal to an uninterrupted run.
"""

from __future__ import annotations

import threading

import pytest

from labkit.emu import unicorn_backend
from labkit.exits import Interrupted, Io, Mmio, Timeout
from labkit.x86 import layout

from emu_guests import ENTRY, Recorder, assemble, boot, needs_binutils

pytestmark = [pytest.mark.emu, needs_binutils]
DATA = ENTRY + 0x1000
ROUNDS = 1_500_000

# m, m2 at DATA and DATA+8; x (xchg) at +16; p (push/pop copy) at +24; s (sum) at +32; buf at +64.
COUNTING = f"""
    xor ecx, ecx
loop:
    inc qword ptr [{DATA:#x}]
    add qword ptr [{DATA + 8:#x}], 3
    inc rcx
    cmp rcx, {ROUNDS}
    jne loop
    out 0xf4, al
"""

MIXED = f"""
    xor ecx, ecx
    xor eax, eax
loop:
    inc qword ptr [{DATA:#x}]
    add qword ptr [{DATA + 8:#x}], 3
    xchg [{DATA + 16:#x}], rax
    add rax, 5
    push qword ptr [{DATA:#x}]
    pop qword ptr [{DATA + 24:#x}]
    mov r9, rcx
    mov byte ptr [{DATA + 64:#x}], r9b
    mov rsi, {DATA + 64:#x}
    mov rdi, {DATA + 65:#x}
    mov ecx, 64
    rep movsb
    movzx edx, byte ptr [{DATA + 64 + 64:#x}]
    add [{DATA + 32:#x}], rdx
    mov rcx, r9
    inc rcx
    cmp rcx, {ROUNDS // 20}
    jne loop
    out 0xf4, al
"""


def done(exit_) -> bool:
    return isinstance(exit_, Io) and (exit_.port, exit_.is_write) == (layout.DEBUG_EXIT_PORT, True)


def snapshot(backend):
    return backend.get_regs(), bytes(backend.memory)


def reference(source: str):
    backend = boot(64, assemble(source))
    assert done(backend.run(Recorder(), 60.0))
    return snapshot(backend)


def words(memory: bytes, offset: int, count: int) -> list[int]:
    return [int.from_bytes(memory[DATA + offset + 8 * i:DATA + offset + 8 * (i + 1)], "little") for i in range(count)]


def kicked_run(source: str, *, every_s: float):
    """The guest run to its end while another thread kicks it every ``every_s``; (final state, kicks that stopped it)."""
    backend = boot(64, assemble(source))
    stopped, finished = 0, threading.Event()

    def kicker():
        while not finished.wait(every_s):
            backend.kick()

    thread = threading.Thread(target=kicker)
    thread.start()
    try:
        while True:
            exit_ = backend.run(Recorder(), 60.0)
            if exit_ != Interrupted():
                break
            stopped += 1
    finally:
        finished.set()
        thread.join()
    assert done(exit_)
    return snapshot(backend), stopped


@pytest.mark.parametrize("source", [COUNTING, MIXED], ids=["inc-add", "xchg-push-pop-rep-movsb"])
def test_kicks_never_run_an_instruction_twice(source):
    expected = reference(source)
    (regs, memory), stopped = kicked_run(source, every_s=0.0003)
    assert stopped >= 100  # hundreds of stops, anywhere in the loop
    if source is COUNTING:
        m, m2 = words(memory, 0, 2)
        assert (m, m2) == (regs.rcx, 3 * regs.rcx) == (ROUNDS, 3 * ROUNDS)
    assert (regs, memory) == expected


def test_the_python_stop_gate_is_as_exact(monkeypatch):
    # Without labkit's C library the gate's block hook is a Python callback: slower, the same stops.
    expected = reference(COUNTING)
    monkeypatch.setattr(unicorn_backend, "load_native", lambda: None)
    (regs, memory), stopped = kicked_run(COUNTING, every_s=0.001)
    assert stopped >= 50
    assert (regs, memory) == expected


@pytest.mark.parametrize("source", [COUNTING, MIXED], ids=["inc-add", "xchg-push-pop-rep-movsb"])
def test_tiny_timeouts_then_continue_equal_an_uninterrupted_run(source):
    expected = reference(source)
    backend = boot(64, assemble(source))
    timeouts = 0
    while True:
        exit_ = backend.run(Recorder(), 0.0005)
        if not isinstance(exit_, Timeout):
            break
        timeouts += 1
        regs = backend.get_regs()
        m, m2 = words(bytes(backend.memory), 0, 2)
        if source is COUNTING:  # at every stop, not only at the end
            assert (m, m2) == (regs.rcx, 3 * regs.rcx)
    assert done(exit_) and timeouts >= 100
    assert snapshot(backend) == expected


class RipRecorder(Recorder):
    """Records (kind, address or port, is_write, rip) of every access."""

    def pio(self, port, size, is_write, value, rip):
        self.trace.append(("pio", port, is_write, rip))
        self.stop = port == layout.DEBUG_EXIT_PORT
        return value if is_write else 0

    def mmio(self, address, size, is_write, value, rip):
        self.trace.append(("mmio", address, is_write, rip))
        return value if is_write else 0


@pytest.mark.parametrize("way", ["c", "python"])
@pytest.mark.parametrize("mode", [64, 32])
def test_the_dispatcher_gets_the_rip_kvm_reports(mode, way, monkeypatch):
    # KVM: after a completed OUT, at an IN (completed on the next KVM_RUN), at an MMIO access's
    # instruction (not the start of the emulator's translated block, which is ENTRY here).
    mmio = 0x30_0000  # above the 2 MiB of RAM
    base = "rbx" if mode == 64 else "ebx"
    source = f"""
        mov ebx, {mmio}           # 5 bytes
        nop                       # ENTRY + 5
        mov eax, [{base}]            # ENTRY + 6, 2 bytes
        add dword ptr [{base}+4], 1  # ENTRY + 8, 4 bytes (a read and a write)
        mov dx, 0x80              # ENTRY + 12, 4 bytes
        out dx, al                # ENTRY + 16, 1 byte
        out 0x81, al              # ENTRY + 17, 2 bytes
        out dx, ax                # ENTRY + 19, 2 bytes (operand-size prefix)
        in al, dx                 # ENTRY + 21, 1 byte
        out 0xf4, al              # ENTRY + 22, 2 bytes
    """
    code = assemble(source, bits=mode)
    assert len(code) == 24
    if way == "python":  # without labkit's C library: the same RIPs from the Python fallbacks
        monkeypatch.setattr(unicorn_backend, "load_native", lambda: None)
    backend = boot(mode, code)
    recorder = RipRecorder()
    assert done(backend.run(recorder, 10.0))
    assert recorder.trace == [
        ("mmio", mmio, False, ENTRY + 6),
        ("mmio", mmio + 4, False, ENTRY + 8), ("mmio", mmio + 4, True, ENTRY + 8),
        ("pio", 0x80, True, ENTRY + 17),
        ("pio", 0x81, True, ENTRY + 19),
        ("pio", 0x80, True, ENTRY + 21),
        ("pio", 0x80, False, ENTRY + 21),
        ("pio", layout.DEBUG_EXIT_PORT, True, ENTRY + 24),
    ]


@pytest.mark.parametrize("stop_at", [0, 1], ids=["stop-at-read", "stop-at-write"])
def test_an_mmio_stop_inside_a_read_modify_write_runs_no_access_twice(stop_at):
    # `add [mmio], 1` reads then writes.  A stop at either access leaves RIP at the instruction (as
    # KVM before it completes an MMIO exit); the next run finishes it, and the device sees one read
    # and one write in all.
    mmio = 0x30_0000

    class Device(Recorder):
        def mmio(self, address, size, is_write, value, rip):
            self.trace.append(("mmio", address, is_write, value, rip))
            self.stop = len(self.trace) == stop_at + 1
            return value if is_write else 41

    backend = boot(64, assemble(f"mov ebx, {mmio}\nadd dword ptr [rbx], 1\nout 0xf4, al"))
    device = Device()
    first = backend.run(device, 10.0)
    assert first == Mmio(mmio, 4, bool(stop_at), 42 if stop_at else 41)
    assert backend.get_regs().rip == ENTRY + 5
    device.stop = False
    assert done(backend.run(device, 10.0))
    assert [access for access in device.trace if access[0] == "mmio"] == [
        ("mmio", mmio, False, 0, ENTRY + 5), ("mmio", mmio, True, 42, ENTRY + 5)]
