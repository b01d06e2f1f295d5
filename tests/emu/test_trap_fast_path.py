"""The emulation backend's trap fast paths: lazy-flag RFLAGS and re-checked delivery plans.

After the first delivery of a vector the backend replays a recorded plan; these
guests change what the plan was made from (a gate, RSP0, IDTR, a descriptor)
between two faults and check that the next fault follows the new values.  Each
test runs with the C replay (where a compiler is) and with the Python fast path.
"""

from __future__ import annotations

import random
import struct

import pytest

from labkit.emu import cpu_state as S
from labkit.emu import native, unicorn_backend
from labkit.emu.delivery import ARITHMETIC, _FLAG_TABLE
from labkit.exits import Io, Shutdown
from labkit.native import compiler
from labkit.x86 import layout
from labkit.x86.idt import INTERRUPT_GATE, Gate, encode_gate64

from emu_guests import ENTRY, Recorder, assemble, boot, needs_binutils

pytestmark = [pytest.mark.emu, needs_binutils]
HANDLER_A = ENTRY + 0x400
HANDLER_B = ENTRY + 0x500
FLAG_HANDLER = ENTRY + 0x1000
RECORD = 0x20000  # handlers store what they saw here, one qword per fault
NONCANONICAL = "0x8000000000000000"


@pytest.fixture(autouse=True, params=["c", "python"])
def replay_path(request, monkeypatch):
    """Run the test with the C trap replay, then with the Python fast path alone."""
    if request.param == "c" and compiler() is None:
        pytest.skip("no C compiler: the C trap replay is not built here")
    if request.param == "python":
        monkeypatch.setattr(unicorn_backend, "load_native", lambda: None)
    return request.param


def gate64(handler: int, selector: int = layout.KERNEL_CS64) -> bytes:
    return encode_gate64(Gate(offset=handler, selector=selector, type=INTERRUPT_GATE))


def gate_qwords(handler: int) -> tuple[int, int]:
    return struct.unpack("<2Q", gate64(handler))


def records(backend, count: int) -> tuple[int, ...]:
    return struct.unpack_from(f"<{count}Q", backend.memory, RECORD)


def run_to_exit(backend) -> object:
    """Run; an ``out 0xf4, al`` exit comes back as the port number alone (AL is whatever the guest left)."""
    exit_ = backend.run(Recorder(), 5.0)
    if isinstance(exit_, Io) and exit_.port == layout.DEBUG_EXIT_PORT and exit_.is_write:
        return layout.DEBUG_EXIT_PORT
    return exit_


def test_every_modelled_cc_op_matches_unicorns_eflags():
    """Random lazy-flag states, written in place, give the flags uc_reg_read computes."""
    backend = boot(64, assemble("hlt"))
    engine = backend._engine
    cpu, delivery = engine.cpu, engine.delivery
    rng = random.Random(1883)
    modelled = [op for op, function in enumerate(_FLAG_TABLE) if function is not None]
    assert modelled == list(range(1, 51))  # CC_OP_EFLAGS .. CC_OP_POPCNT of QEMU 5.0
    assert all(delivery._flags[op] is not None for op in modelled)  # all passed the start-up check
    edges = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF,
             (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
    for op in modelled:
        for _ in range(200):
            dst, src1, src2 = (rng.choice(edges) if rng.random() < 0.3 else rng.getrandbits(64) for _ in range(3))
            # The values QEMU leaves for each CC_OP (cc_helper_template.h, translate.c):
            if op == 1 or 46 <= op <= 48:  # EFLAGS, ADCX/ADOX/ADCOX: CC_SRC holds flags only
                src1 &= ARITHMETIC
            if 46 <= op <= 48:  # ... and the carried C/O in CC_DST/CC_SRC2 as 0 or 1
                dst, src2 = dst & 1, src2 & 1
            if 26 <= op <= 33:  # INC/DEC keep the old carry flag, 0 or 1, in CC_SRC
                src1 &= 1
            if op in (10, 11, 12, 13, 18, 19, 20, 21):  # ADC/SBB keep the carry in, 0 or 1, in CC_SRC2
                src2 &= 1
            df = rng.choice((1, -1))
            cpu.q[(S.EFLAGS + 8) // 8], cpu.q[S.CC_SRC // 8], cpu.q[(S.CC_SRC + 8) // 8] = dst, src1, src2
            cpu.u32[S.CC_OP // 4] = op
            cpu.i32[S.DF // 4] = df
            assert delivery.rflags() == engine.read_eflags(), (op, hex(dst), hex(src1), hex(src2))


FLAG_CASES = [
    ("mov eax, 0x7f", "mov ebx, 1", "add al, bl"),
    ("mov eax, 0xffffffff", "mov ebx, 1", "add eax, ebx"),
    ("mov rax, 0x7fffffffffffffff", "mov rbx, 1", "add rax, rbx"),
    ("mov eax, 0x10", "mov ebx, 0x0f", "stc\nadc eax, ebx"),
    ("mov eax, 0", "mov ebx, 1", "sub eax, ebx"),
    ("mov rax, 0x8000000000000000", "mov rbx, 1", "cmp rax, rbx"),
    ("mov eax, 5", "mov ebx, 5", "stc\nsbb ax, bx"),
    ("mov eax, 0x80", "mov ebx, 0xff", "and al, bl"),
    ("mov eax, 0", "mov ebx, 0", "test rax, rax"),
    ("mov eax, 0x7fff", "mov ebx, 0", "stc\ninc ax"),
    ("mov eax, 0x80", "mov ebx, 0", "dec al"),
    ("mov eax, 1", "mov ebx, 0", "dec ecx\nmov ecx, 0\ndec ecx"),
    ("mov eax, 0xc0000000", "mov ebx, 0", "shl eax, 1"),
    ("mov rax, -3", "mov ebx, 0", "sar rax, 1"),
    ("mov eax, 0x10000", "mov ebx, 0x10000", "imul eax, ebx"),
    ("mov eax, 0", "mov ebx, 0x18", "blsi eax, ebx"),
    ("mov eax, 5", "mov ebx, 0", "xor eax, eax"),
    ("mov eax, 0", "mov ebx, 0", "popcnt eax, ebx"),
    ("mov eax, 3", "mov ebx, 0", "std\nneg eax"),
    ("mov eax, 1", "mov ebx, 0", "cld\npush 0x8d5\npopfq"),
]


def test_pushed_rflags_match_pushfq_after_each_kind_of_flag_update():
    """The frame's RFLAGS (computed from the lazy flags on the fast path) equals what pushfq sees."""
    lines = [f"mov r11, {NONCANONICAL}", "xor r12d, r12d"]
    for i, (set_a, set_b, operation) in enumerate(FLAG_CASES):
        lines += [set_a, set_b, operation, "pushfq", "pop r9", f"mov [{RECORD + 0x800 + 8 * i}], r9"]
        lines += [set_a, set_b, operation, "mov r10, [r11]"]  # 3 bytes, #GP(0)
    lines += ["out 0xf4, al", f".org {FLAG_HANDLER - ENTRY:#x}",
              f"mov r8, [rsp + 24]", f"mov [{RECORD} + r12 * 8], r8", "inc r12",
              "add rsp, 8", "add qword ptr [rsp], 3", "iretq"]
    backend = boot(64, assemble("\n".join(lines)), extra=[(layout.IDT_ADDRESS + 16 * 13, gate64(FLAG_HANDLER))])
    assert run_to_exit(backend) == layout.DEBUG_EXIT_PORT
    count = len(FLAG_CASES)
    assert backend.get_regs().r12 == count
    pushed = records(backend, count)
    expected = struct.unpack_from(f"<{count}Q", backend.memory, RECORD + 0x800)
    mask = ARITHMETIC | 0x400 | 0x200
    assert [hex(v & mask) for v in pushed] == [hex(v & mask) for v in expected]
    assert backend._engine.delivery._plans  # the later faults went through a plan


def test_a_gate_rewritten_between_two_gps_sends_the_next_one_to_the_new_handler():
    low, high = gate_qwords(HANDLER_B)
    code = assemble(f"""
        mov r11, {NONCANONICAL}
        xor r12d, r12d
        xor r13d, r13d
        mov r10, [r11]          # A (slow path, records a plan)
        mov r10, [r11]          # A (plan), A rewrites gate 13 to B
        mov r10, [r11]          # B: the plan's gate no longer matches
        mov r10, [r11]          # B (B's plan)
        out 0xf4, al
    .org {HANDLER_A - ENTRY:#x}
        inc r12
        cmp r12, 2
        jne 1f
        mov rdx, {low:#x}
        mov [{layout.IDT_ADDRESS + 16 * 13}], rdx
        mov rdx, {high:#x}
        mov [{layout.IDT_ADDRESS + 16 * 13 + 8}], rdx
    1:  add rsp, 8
        add qword ptr [rsp], 3
        iretq
    .org {HANDLER_B - ENTRY:#x}
        inc r13
        add rsp, 8
        add qword ptr [rsp], 3
        iretq
    """)
    backend = boot(64, code, extra=[(layout.IDT_ADDRESS + 16 * 13, gate64(HANDLER_A))])
    assert run_to_exit(backend) == layout.DEBUG_EXIT_PORT
    regs = backend.get_regs()
    assert (regs.r12, regs.r13) == (2, 2)


def test_lidt_between_two_gps_uses_the_new_table():
    new_idt = 0x30000
    code = assemble(f"""
        mov r11, {NONCANONICAL}
        mov r10, [r11]
        mov r10, [r11]          # A loads the new IDT on this one
        mov r10, [r11]          # B
        out 0xf4, al
    .org {HANDLER_A - ENTRY:#x}
        inc r12
        cmp r12, 2
        jne 1f
        lidt [rip + 2f]
    1:  add rsp, 8
        add qword ptr [rsp], 3
        iretq
    2:  .word 16 * 256 - 1
        .quad {new_idt}
    .org {HANDLER_B - ENTRY:#x}
        inc r13
        add rsp, 8
        add qword ptr [rsp], 3
        iretq
    """)
    backend = boot(64, code, extra=[(layout.IDT_ADDRESS + 16 * 13, gate64(HANDLER_A)),
                                    (new_idt + 16 * 13, gate64(HANDLER_B))])
    assert run_to_exit(backend) == layout.DEBUG_EXIT_PORT
    regs = backend.get_regs()
    assert (regs.r12, regs.r13) == (2, 1)


def test_rsp0_changed_in_the_tss_between_two_ring3_faults_gives_the_new_stack():
    new_stack = 0x60000
    code = assemble(f"""
        cli                     # ring 3: #GP
        cli
        cli
        cli
    .org {HANDLER_A - ENTRY:#x}
        mov [{RECORD} + r12 * 8], rsp
        inc r12
        cmp r12, 2
        jne 1f
        mov rdx, {new_stack:#x}
        mov [{layout.TSS_ADDRESS + 4}], rdx
    1:  cmp r12, 4
        jne 2f
        out 0xf4, al            # ring 0: allowed
    2:  add rsp, 8
        add qword ptr [rsp], 1
        iretq
    """)
    backend = boot(64, code, user=True, extra=[(layout.IDT_ADDRESS + 16 * 13, gate64(HANDLER_A))])
    assert run_to_exit(backend) == layout.DEBUG_EXIT_PORT
    top = layout.KERNEL_STACK_TOP
    assert records(backend, 4) == (top - 48, top - 48, new_stack - 48, new_stack - 48)
    frame = struct.unpack_from("<6Q", backend.memory, new_stack - 48)
    assert frame[0] == 0 and frame[1] == ENTRY + 3 and frame[2] == layout.USER_CS64
    assert frame[5] == layout.USER_DS


def test_ring0_and_ring3_faults_on_one_vector_each_get_their_own_frame():
    """Plans are kept per CPL: alternating rings on vector 13 never replays the wrong one."""
    code = assemble(f"""
        mov r11, {NONCANONICAL}
    1:  mov r10, [r11]          # ring 3: #GP, 3 bytes
        jmp 1b
    .org {HANDLER_A - ENTRY:#x}
        mov rax, [rsp + 16]     # CS of the faulting code
        mov [{RECORD} + r12 * 8], rax
        inc r12
        cmp r12, 6
        je 3f
        test rax, 3
        jz 2f
        mov r10, [r11]          # ring 0: #GP from the handler itself (nested, same vector)
    2:  add rsp, 8
        add qword ptr [rsp], 3
        iretq
    3:  out 0xf4, al
    """)
    backend = boot(64, code, user=True, extra=[(layout.IDT_ADDRESS + 16 * 13, gate64(HANDLER_A))])
    assert run_to_exit(backend) == layout.DEBUG_EXIT_PORT
    cs = layout.KERNEL_CS64
    assert records(backend, 6) == (layout.USER_CS64, cs, layout.USER_CS64, cs, layout.USER_CS64, cs)


def test_a_code_descriptor_made_not_present_between_two_gps_escalates_to_a_triple_fault():
    """#GP -> #NP on the gate's CS -> #DF through the same CS -> shutdown, even with a plan recorded."""
    code = assemble(f"""
        mov r11, {NONCANONICAL}
        mov r10, [r11]
        mov r10, [r11]          # the handler clears P in the CS descriptor and jumps back
    2:  mov r10, [r11]          # no plan may be used now
        out 0xf4, al
    .org {HANDLER_A - ENTRY:#x}
        inc r12
        cmp r12, 2
        je 1f
        add rsp, 8
        add qword ptr [rsp], 3
        iretq
    1:  and byte ptr [{layout.GDT_ADDRESS + layout.KERNEL_CS64 + 5}], 0x7f
        add rsp, 48             # drop the frame; CS stays loaded (its hidden cache is unchanged)
        jmp 2b
    """)
    backend = boot(64, code, extra=[(layout.IDT_ADDRESS + 16 * 13, gate64(HANDLER_A))])
    assert run_to_exit(backend) == Shutdown()
    assert backend.get_regs().r12 == 2


def test_repeated_page_faults_report_each_cr2_and_error_code():
    """#PF on the fast path: CR2 (set by the CPU, not part of the plan) and the error code per fault."""
    code = assemble(f"""
        mov r11, 0x40000000     # above what the boot page tables map
    f1: mov r10, [r11]          # 3 bytes: #PF, read
        mov r10, [r11 + 8]      # 4 bytes
        mov [r11 + 16], r10     # 4 bytes: #PF, write
        out 0xf4, al
    .org {HANDLER_A - ENTRY:#x}
        mov rax, cr2
        mov [{RECORD} + r12 * 8], rax
        mov rax, [rsp]
        mov [{RECORD + 0x100} + r12 * 8], rax
        inc r12
        mov rax, 4
        lea rdx, [rip + f1]
        cmp [rsp + 8], rdx
        mov rdx, 3
        cmove rax, rdx          # the first fault's instruction is 3 bytes, the others 4
        add rsp, 8
        add [rsp], rax
        iretq
    """)
    backend = boot(64, code, extra=[(layout.IDT_ADDRESS + 16 * 14, gate64(HANDLER_A))])
    assert run_to_exit(backend) == layout.DEBUG_EXIT_PORT
    assert records(backend, 3) == (0x4000_0000, 0x4000_0008, 0x4000_0010)
    assert struct.unpack_from("<3Q", backend.memory, RECORD + 0x100) == (0, 0, 2)
