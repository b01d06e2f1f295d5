"""The C trap replay (labkit/emu/trap_replay.c) against the Python delivery it replaces.

The same randomly generated trap-heavy guests run three ways: with the C replay,
with only the Python fast path, and with every exception delivered by Python's
full delivery (the reference).  Registers and every byte of guest RAM must be
the same at the end; the handlers log each frame they were given.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from labkit.emu import native
from labkit.emu import unicorn_backend
from labkit.emu.delivery import ExceptionDelivery
from labkit.exits import Io
from labkit.native import compiler
from labkit.x86 import layout
from labkit.x86.idt import TRAP_GATE, Gate, encode_gate64

from emu_guests import ENTRY, Recorder, assemble, boot, needs_binutils

pytestmark = [pytest.mark.emu, needs_binutils]

LOG = 0x20000  # handlers append 8 qwords per exception here
IST_STACK = 0x50000
VECTORS = ((0, False), (3, False), (13, True), (14, True), (0x80, False))  # (vector, pushes an error code)
STUBS = ENTRY + 0x4000  # one 0x40-byte stub per vector, then the shared handler and the exit
COMMON = STUBS + 0x40 * len(VECTORS)
EXIT = COMMON + 0x100
UNMAPPED = 0x4000_0000  # above what labkit's page tables map: #PF
NONCANONICAL = 0x8000_0000_0000_0000
HAS_COMPILER = compiler() is not None


def test_the_c_replay_is_built_and_used_where_a_compiler_is():
    if not HAS_COMPILER:
        pytest.skip("no C compiler: the emulation backend delivers exceptions in Python only")
    library = native.load()
    assert library is not None, native.status()
    assert native.layout_of(library) == native.expected_layout()
    assert native.status().startswith("C trap replay")


# --- generated guests --------------------------------------------------------------------------

ARITHMETIC = ["add eax, {a}", "sub eax, {a}", "and eax, {a}", "or eax, {a}", "xor eax, {a}", "inc eax", "dec eax",
              "shl eax, 1", "sar eax, 1", "imul eax, eax", "neg eax", "cmp eax, {a}", "test eax, eax",
              "stc\nadc eax, {a}", "clc\nsbb eax, {a}", "add al, {b}", "sub ax, {a16}", "std", "cld",
              "add rax, rax", "popcnt ebx, eax", "blsi ebx, eax"]


def _trap(rng: random.Random, user: bool) -> str:
    """One exception: R14 holds how far the handler moves RIP on (0 for ``int n``, which is a trap)."""
    choices = ["mov r14, 3\nmov r10, [r11]",       # #GP(0): non-canonical
               "mov r14, 3\nmov r10, [rsi]",       # #PF, read, not present
               "mov r14, 3\nmov [rsi], r10",       # #PF, write
               "mov r14, 2\ndiv ebp",              # #DE, through IST1
               "mov r14, 0\nint 0x80",             # software, DPL 3 trap gate
               "mov r14, 0\nint3"]
    if user:
        choices.append("mov r14, 1\ncli")        # #GP(0): privileged in ring 3
    return rng.choice(choices)


def generated_guest(seed: int, user: bool, traps: int = 300) -> str:
    rng = random.Random(seed)
    lines = [f"mov r11, {NONCANONICAL:#x}", f"mov rsi, {UNMAPPED:#x}", "xor ebp, ebp", f"mov r9, {LOG:#x}",
             f"mov eax, {rng.getrandbits(32):#x}"]
    for _ in range(traps):
        for _ in range(rng.randrange(3)):
            lines.append(rng.choice(ARITHMETIC).format(a=hex(rng.getrandbits(32)), b=hex(rng.getrandbits(8)),
                                                       a16=hex(rng.getrandbits(16))))
        if not user and rng.random() < 0.05:  # move the ring-0 stack to another page
            lines.append(f"sub rsp, {rng.choice((0x1000, 0x800, 0x18))}")
        lines.append(_trap(rng, user))
    lines.append("int 0x81")  # the last handler ends the run
    stubs = []
    for index, (vector, error) in enumerate(VECTORS):
        stubs += [f".org {STUBS - ENTRY + 0x40 * index:#x}"]
        stubs += ([] if error else ["push 0"]) + [f"push {vector}", "jmp common"]
    common = [f".org {COMMON - ENTRY:#x}", "common:"]
    for slot in range(7):  # vector, error code, RIP, CS, RFLAGS, RSP, SS
        common += [f"mov r8, [rsp + {8 * slot}]", f"mov [r9 + {8 * slot}], r8"]
    common += ["mov [r9 + 56], rsp", "add r9, 64", "add [rsp + 16], r14", "add rsp, 16", "iretq",
               f".org {EXIT - ENTRY:#x}", "out 0xf4, al"]
    return "\n".join(lines + stubs + common)


def _gates() -> list[tuple[int, bytes]]:
    def gate(vector: int, offset: int, **kwargs) -> tuple[int, bytes]:
        return layout.IDT_ADDRESS + 16 * vector, encode_gate64(
            Gate(offset=offset, selector=layout.KERNEL_CS64, **kwargs))

    stub = {vector: STUBS + 0x40 * index for index, (vector, _) in enumerate(VECTORS)}
    return [gate(0, stub[0], ist=1), gate(3, stub[3], dpl=3), gate(13, stub[13]), gate(14, stub[14]),
            gate(0x80, stub[0x80], type=TRAP_GATE, dpl=3), gate(0x81, EXIT, dpl=3),
            (layout.TSS_ADDRESS + 0x24, IST_STACK.to_bytes(8, "little"))]


@pytest.fixture(scope="module")
def guests() -> dict:
    return {(seed, user): assemble(generated_guest(seed, user)) for seed in (1, 2, 3) for user in (False, True)}


def run_guest(code: bytes, user: bool, way: str, monkeypatch) -> tuple:
    with monkeypatch.context() as patch:
        if way != "c":
            patch.setattr(unicorn_backend, "load_native", lambda: None)
        if way == "python_full":
            patch.setattr(ExceptionDelivery, "_fast_path", lambda self: (lambda vector: False))
        backend = boot(64, code, user=user, extra=_gates())
        exit_ = backend.run(Recorder(), 30.0)
    replay = backend._engine.replay
    counts = None if replay is None else (replay.replayed, replay.passed_on)
    regs, memory = backend.get_regs(), bytes(backend.memory)
    backend.close()
    assert isinstance(exit_, Io) and exit_.port == layout.DEBUG_EXIT_PORT, exit_
    return regs, memory, counts


@pytest.mark.parametrize("user", [False, True], ids=["ring0", "ring3"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_c_replay_python_fast_path_and_full_delivery_leave_identical_machines(guests, seed, user, monkeypatch):
    code = guests[seed, user]
    reference_regs, reference_memory, _ = run_guest(code, user, "python_full", monkeypatch)
    logged = (reference_regs.r9 - LOG) // 64
    assert logged == 300  # every trap reached its handler (the final int 0x81 logs nothing)
    for way in ("python_fast", "c") if HAS_COMPILER else ("python_fast",):
        regs, memory, counts = run_guest(code, user, way, monkeypatch)
        assert regs == reference_regs, way
        if memory != reference_memory:
            first = next(i for i, (a, b) in enumerate(zip(memory, reference_memory)) if a != b)
            pytest.fail(f"{way}: guest RAM differs from the reference first at {first:#x}")
        if way == "c":
            replayed, passed_on = counts
            assert replayed + passed_on >= 300 and replayed > 200, counts  # the C path did the work


def test_without_a_compiler_the_backend_says_so_and_delivers_in_python(tmp_path):
    """CC pointing at a compiler that fails: status names it, a trapping guest still runs."""
    script = (
        "from labkit.emu import native\n"
        "print(native.status())\n"
        "assert native.load() is None\n"
        "from labkit import Guest, Machine\n"
        "result = Machine(Guest.named('rings64'), backend='emu').run(timeout=20)\n"
        "print(result.status)\n"
    )
    env = {**os.environ, "CC": "false", "LABKIT_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first, status = out.stdout.splitlines()[:2]
    assert first.startswith("Python only: false could not build trap_replay.c"), first
    assert status == "exited with code 0"


def test_a_corrupt_cached_build_is_rebuilt(tmp_path):
    if not HAS_COMPILER:
        pytest.skip("no C compiler")
    env = {**os.environ, "LABKIT_CACHE_DIR": str(tmp_path)}
    script = "from labkit.emu import native; print(native.status())"
    first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    (built,) = tmp_path.glob("trap_replay-*.so")
    built.write_bytes(b"not an ELF file")
    second = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert first.stdout.startswith("C trap replay") and second.stdout.startswith("C trap replay"), second.stderr
    assert built.read_bytes()[:4] == b"\x7fELF"


def test_labkit_native_0_turns_it_off():
    env = {**os.environ, "LABKIT_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", "from labkit.emu import native; print(native.status())"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "Python only: turned off by LABKIT_NATIVE=0"
