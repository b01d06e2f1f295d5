"""Binary translation on both backends: the same console as native where the lesson says so."""

from __future__ import annotations

import pytest

from labkit import Guest, Machine
from labkit.vmm.status import StatusKind
from labkit.monitor.binary_translation import TRANSLATABLE, BinaryTranslator, run_translated
from labkit.monitor.trap_emulate import TrapAndEmulate, minikernel, run_deprivileged

# The lines of minikernel64's default routines where trap-and-emulate shows the truth and
# binary translation does not: pushf, popf (seen by the #UD handler), sgdt, sidt, smsw.
DIVERGENT = ("cli, then pushf: IF", "  #UD handler: rip 0x80fd", "sgdt:", "sidt:", "mov cr0 with TS set")


def differing(left: str, right: str) -> list[str]:
    a, b = left.splitlines(), right.splitlines()
    assert len(a) == len(b), (a, b)
    return [x for x, y in zip(a, b) if x != y]


def test_translation_gives_the_native_console_and_trap_and_emulate_differs_exactly_where_expected(backend_name):
    kernel = minikernel()
    native = Machine(kernel, backend=backend_name).run(timeout=20)
    te = run_deprivileged(kernel, backend=backend_name)
    bt = run_translated(kernel, backend=backend_name)
    assert native.status.kind == bt.status.kind == StatusKind.HALTED, (str(native.status), str(bt.status))
    assert bt.console == native.console
    assert "minikernel: done, halting" in bt.console
    diverging = differing(native.console, te.console)
    assert [line for line in diverging if not line.startswith(DIVERGENT)] == []
    assert len(diverging) == len(DIVERGENT)


def test_counters_show_the_cache_at_work(backend_name):
    result = run_translated(minikernel(), backend=backend_name)
    summary = result.monitor
    assert summary.blocks_translated == len(summary.blocks) > 10
    assert summary.chained > 0 and summary.inline_return_hits > 0
    assert summary.cache_hits > summary.blocks_translated  # the kernel's loops reuse translations
    assert summary.cache_bytes > summary.guest_bytes > 0
    for mnemonic in ("pushfq", "popfq", "sgdt", "sidt", "smsw"):  # what trap-and-emulate never sees
        assert summary.entries.get(f"emulate: {mnemonic}", 0) >= 1, mnemonic
    te = run_deprivileged(minikernel(), backend=backend_name).monitor
    assert not {"pushfq", "popfq", "sgdt"} & set(te.emulated)
    assert summary.entries["emulate: out"] == te.emulated["out"]  # the same port writes, one entry each


def test_the_counts_are_the_same_on_both_backends():
    from backends import HAS_KVM

    backends = ["emu", "kvm"] if HAS_KVM else ["emu"]
    summaries = [run_translated(minikernel(), backend=backend).monitor for backend in backends]
    first = summaries[0]
    for other in summaries[1:]:
        assert (other.entries, other.blocks_translated, other.cache_hits, other.chained, other.cache_bytes) == \
               (first.entries, first.blocks_translated, first.cache_hits, first.chained, first.cache_bytes)


def test_leaving_popf_untranslated_brings_its_divergence_back(backend_name):
    kernel = minikernel(("popf",))
    native = Machine(kernel, backend=backend_name).run(timeout=20)
    bt = run_translated(kernel, backend=backend_name, translate=TRANSLATABLE - {"popfq"})
    assert differing(native.console, bt.console) == [
        "  #UD handler: rip 0x80fd, IF in the interrupted code = 1"]
    assert "emulate: popfq" not in bt.monitor.entries


def test_an_untranslated_privileged_instruction_traps_and_is_emulated(backend_name):
    kernel = minikernel(("cli_pushf",))
    bt = run_translated(kernel, backend=backend_name, translate=TRANSLATABLE - {"cli"})
    assert bt.console == Machine(kernel, backend=backend_name).run(timeout=20).console
    assert bt.monitor.entries.get("trap: cli", 0) >= 1 and "emulate: cli" not in bt.monitor.entries


def test_popf_enables_the_virtual_timer_only_under_translation(backend_name):
    kernel = minikernel(("timer",))
    te = run_deprivileged(kernel, backend=backend_name, monitor=TrapAndEmulate(timer=True))
    bt = run_translated(kernel, backend=backend_name, timer=True)
    assert "  ticks after popf: 0x0" in te.console.splitlines()
    assert "  ticks after popf: 0x1" in bt.console.splitlines()


def test_int_n_is_translated_on_every_backend(backend_name):
    bt = run_translated(minikernel(("int",)), backend=backend_name)
    assert "  int 0x30 handler: software interrupt taken" in bt.console.splitlines()
    assert bt.monitor.entries["emulate: int"] == 1


SHAPES = """
    lea rsi, [rip + table]
    mov ecx, 4
    xor eax, eax
again:
    add rax, [rsi + rcx * 8 - 8]      # memory operand, loop
    loop again
    call [rip + pointer]              # indirect call through memory
    lea rbx, [rip + after]
    jmp rbx                           # indirect jump through a register
    ud2
after:
    mov [rip + result], rax           # RIP-relative store
    xor ecx, ecx
    jrcxz zero
    ud2
zero:
    push 5
    call pop_one
    mov dx, 0x3f8
    add al, 'A'
    out dx, al
    mov rdx, [rip + result]
    hlt
pop_one:
    add rax, 3
    ret 8                             # ret imm16
double:
    shl rax, 1
    ret
pointer: .quad double
table:   .quad 1, 2, 3, 4
result:  .quad 0
"""


def test_control_flow_shapes_give_the_native_registers(backend_name):
    kernel = Guest.from_asm(SHAPES, mode=64, name="shapes")
    native = Machine(kernel, backend=backend_name).run(timeout=10)
    bt = run_translated(kernel, backend=backend_name)
    assert native.status.kind == bt.status.kind == StatusKind.HALTED
    assert bt.console == native.console == chr(ord("A") + 23)
    assert bt.regs.gprs() == native.regs.gprs()
    assert bt.regs.rip == native.regs.rip


def test_an_unemulated_instruction_stops_the_guest(backend_name):
    kernel = Guest.from_asm("xor eax, eax\nlldt ax\njmp $\n", mode=64)
    bt = run_translated(kernel, backend=backend_name)
    assert bt.status.kind == StatusKind.ERROR
    assert bt.status.message == "unemulated instruction at RIP 0x8002: lldt ax"
    assert bt.monitor.monitor_entries == 2  # the start, then lldt: no loop


def test_running_the_kernel_itself_is_refused(backend_name):
    kernel = Guest.from_asm("cli\nhlt\n", mode=64, user=True)
    translator = BinaryTranslator(kernel)
    result = Machine(kernel, backend=backend_name, monitor=translator).run(timeout=10)
    assert result.status.kind == StatusKind.ERROR and "run BinaryTranslator.guest" in result.status.message


def test_a_cache_that_does_not_fit_is_reported(backend_name):
    kernel = Guest.from_asm("hlt\n", mode=64)
    translator = BinaryTranslator(kernel, cache_size=1 << 20)
    result = Machine(translator.guest, backend=backend_name, memory=1 << 20, monitor=translator).run(timeout=10)
    assert result.status.kind == StatusKind.ERROR and "no room" in result.status.message


@pytest.mark.parametrize("memory", [2 << 20, 5 << 20], ids=["4k-pages", "split-2m-page"])
def test_a_kernel_writing_into_the_translation_cache_is_stopped_with_a_message(backend_name, memory):
    """The top of RAM is the monitor's: a read there is harmless, a write stops the run (nothing is overwritten)."""
    target = memory - 0x20000  # inside the 256 KiB cache
    kernel = Guest.from_asm(f"""
        mov rbx, {target:#x}
        mov rax, [rbx]          # reading is allowed
        mov dx, 0x3f8
        mov al, 'r'
        out dx, al
        mov qword ptr [rbx], 1  # writing is not
        mov al, 'w'
        out dx, al
        hlt
    """, mode=64)
    translator = BinaryTranslator(kernel)
    with Machine(translator.guest, backend=backend_name, memory=memory, monitor=translator) as machine:
        result = machine.run(timeout=10)
        cache = machine.read_memory(target, 8)
    assert result.console == "r"
    assert result.status.kind == StatusKind.ERROR
    assert result.status.message.startswith(f"the kernel wrote to {target:#x} at rip 0x8011, inside the translation "
                                            f"cache ({memory - (256 << 10):#x}-{memory:#x})"), result.status.message
    assert cache != (1).to_bytes(8, "little")


def test_translation_with_a_split_2m_page_gives_the_native_console(backend_name):
    kernel = minikernel()
    native = Machine(kernel, backend=backend_name, memory=5 << 20).run(timeout=20)
    bt = run_translated(kernel, backend=backend_name, memory=5 << 20)
    assert bt.status.kind == StatusKind.HALTED and bt.console == native.console
    assert bt.monitor.inline_return_hits > 0  # the counter's page stayed writable


def test_an_emulated_store_into_the_translation_cache_is_stopped_too(backend_name):
    """sgdt is carried out by the monitor, not the CPU: its store meets the same read-only cache."""
    kernel = Guest.from_asm("mov rbx, 0x1f0000\nsgdt [rbx]\nhlt\n", mode=64)
    result = run_translated(kernel, backend=backend_name)
    assert result.status.kind == StatusKind.ERROR
    assert result.status.message.startswith("the kernel wrote to 0x1f0000 at rip 0x8007, inside the translation "
                                            "cache (0x1c0000-0x200000)"), result.status.message


# -- self-modifying code ---------------------------------------------------------------------------

PATCHING = """
    call value                           # translates value: it returns 1
    mov r12, rax
    mov byte ptr [rip + value + 1], 2    # a plain store into translated code (the monitor does it)
    call value                           # must run the new code: 2
    mov r13, rax
    add byte ptr [rip + value + 1], 3    # a read-modify-write (run once from a one-shot translation)
    call value                           # 5
    mov r14, rax
    mov byte ptr [rip + ahead + 1], 7    # patches the next instruction of the running block
ahead:
    mov eax, 0
    mov r15, rax
    smsw word ptr [rip + emulated + 1]   # a store the monitor emulates (CR0[15:0] = 0x31)
emulated:
    mov eax, 0xffffffff
    mov rbx, rax
    hlt
value:
    mov eax, 1
    ret
"""


def test_a_kernel_that_patches_its_translated_code_runs_the_new_code(backend_name):
    kernel = Guest.from_asm(PATCHING, mode=64, name="patching")
    native = Machine(kernel, backend=backend_name).run(timeout=10)
    bt = run_translated(kernel, backend=backend_name)
    assert native.status.kind == bt.status.kind == StatusKind.HALTED, (str(native.status), str(bt.status))
    expected = {"r12": 1, "r13": 2, "r14": 5, "r15": 7, "rbx": 0xFFFF0031}
    assert {name: getattr(native.regs, name) for name in expected} == expected
    assert bt.regs.gprs() == native.regs.gprs()
    entries = bt.monitor.entries
    assert entries["write: store"] == 2 and entries["write: one-shot"] == 1
    # value's block twice, the running block once, the smsw block once
    assert bt.monitor.invalidated == 4


def test_without_write_protection_the_old_translation_would_run(backend_name):
    """The same store to a page with no translated code on it costs nothing: no trap, no invalidation."""
    kernel = Guest.from_asm("""
        mov byte ptr [rip + data], 2
        mov al, [rip + data]
        hlt
        .balign 4096
    data: .byte 1
    """, mode=64, name="data page")
    bt = run_translated(kernel, backend=backend_name)
    assert bt.regs.rax & 0xFF == 2
    assert not {reason for reason in bt.monitor.entries if reason.startswith("write")}


# -- every instruction of Robin and Irvine's list, as the kernel's routine -----------------------------

from labkit.monitor.robin_irvine import (ALL_PROBES, MORE_PROBES, ROBIN_IRVINE_PROBES,  # noqa: E402
                                         observation, probe_kernel, run_probe)

# What the kernel observes natively (ring 0), the same on every backend that can run it.
NATIVE = {"SGDT": "0x86b0", "SIDT": "0x9000", "SLDT": "0x0", "SMSW": "0x80010039", "PUSHF": "0x0", "POPF": "0x200",
          "LAR": "0xa09b00", "LSL": "0xffffffff", "VERR": "0x1", "VERW": "0x1", "PUSH": "0x10", "POP": "0x10",
          "CALL": "0x8", "JMP": "0x1", "INT n": "0x8", "RET": "0x1", "STR": "0x40", "MOV": "0x8",
          "MOV from SS": "0x10", "MOV to DS": "0x10", "PUSH CS": "#UD, then 0x0"}
# Ring-0 instructions KVM's instruction emulator cannot run: under PVM (all ring-0 code is emulated)
# the native run ends in KVM_INTERNAL_ERROR_EMULATION, and the emulator's native run is the reference.
NOT_IN_KVM_EMULATOR = {"LAR", "LSL", "VERR", "VERW", "INT n"}


def test_the_probes_cover_every_row_of_the_paper():
    from labkit.classify.robin_irvine import ROBIN_IRVINE

    assert [probe.name for probe in ROBIN_IRVINE_PROBES] == [experiment.name for experiment in ROBIN_IRVINE]
    assert set(NATIVE) == {probe.name for probe in ALL_PROBES} and len(MORE_PROBES) == 3


@pytest.mark.parametrize("probe", ALL_PROBES, ids=[probe.name for probe in ALL_PROBES])
def test_translation_gives_the_kernel_its_native_view(probe, backend_name):
    from labkit.kvm.system import kvm_flavour

    native = observation(run_probe(probe, "native", backend_name))
    if backend_name == "kvm" and probe.name in NOT_IN_KVM_EMULATOR and kvm_flavour() == "kvm_pvm":
        assert native.kind == StatusKind.ERROR and "KVM_INTERNAL_ERROR_EMULATION" in native.status, native
        native = observation(run_probe(probe, "native", "emu"))
    assert native.value == NATIVE[probe.name], native
    translated = run_probe(probe, "binary translation", backend_name)
    assert observation(translated).value == native.value, translated.console
    assert translated.status.kind == StatusKind.HALTED


def test_segment_emulation_follows_the_sdm_where_the_kernel_errs(backend_name):
    """Null, out-of-limit and LDT selectors, a 16-bit LAR, and a #GP the kernel's own handler gets."""
    routine = """
        xor ecx, ecx
        mov eax, 0x1234
        lar eax, ecx          # null selector: ZF = 0, EAX unchanged
        setz bl
        mov ecx, 0x7ff8
        lsl eax, ecx          # beyond the GDT limit: ZF = 0
        setz bh
        mov ecx, 0x0c
        verr cx               # an LDT selector, and there is no LDT: ZF = 0
        setz dl
        mov ecx, 8
        verw cx               # a code segment is never writable: ZF = 0
        setz dh
        lar ax, cx            # 16-bit form: FF00H of the access rights
        shl rax, 16
        mov al, bl
        mov ah, bh
        shl rax, 16
        mov al, dl
        mov ah, dh
    """
    kernel = probe_kernel(routine)
    native = Machine(kernel, backend="emu").run(timeout=10)
    bt = run_translated(kernel, backend=backend_name)
    assert "  rax = 0x9b0000000000" in native.console.splitlines(), native.console
    assert bt.console == native.console


def test_a_bad_segment_load_raises_the_native_gp_in_the_kernel(backend_name):
    kernel = probe_kernel("mov ecx, 0x7ff8\nmov ds, ecx")  # beyond the kernel's GDT limit: #GP(0x7ff8)
    native = Machine(kernel, backend="emu").run(timeout=10)
    bt = run_translated(kernel, backend=backend_name)
    assert "minikernel: unexpected exception or interrupt, halting" in native.console
    assert bt.console == native.console
    assert bt.monitor.vcpu.reflected == {13: 1}


def test_what_segment_emulation_does_not_model_stops_the_run_with_a_message(backend_name):
    kernel = probe_kernel("push 0x1b\nlea rax, [rip + 1f]\npush rax\nretfq\n1:")  # a far return to ring 3
    bt = run_translated(kernel, backend=backend_name)
    assert bt.status.kind == StatusKind.ERROR
    assert "retfq): far return to ring 3 (selector 0x1b): a virtual user mode is not modelled" in bt.status.message


def test_a_far_pointer_load_checks_the_kernels_selector(backend_name):
    routine = """
        lea rbx, [rip + 1f]
        jmp 2f
1:      .long 0x1234
        .word 0x10
2:      lss ecx, [rbx]            # SS := 0x10, ECX := 0x1234
        lfs eax, [rbx]            # FS := 0x10
        mov edx, fs
        shl rax, 16
        mov ax, ss
        shl rax, 16
        mov ax, dx
    """
    kernel = probe_kernel(routine)
    native = Machine(kernel, backend="emu").run(timeout=10)
    bt = run_translated(kernel, backend=backend_name)
    assert "  rax = 0x123400100010" in native.console.splitlines(), native.console
    assert bt.console == native.console
    assert bt.monitor.entries["emulate: lss"] == bt.monitor.entries["emulate: lfs"] == 1


def test_a_stack_on_a_page_of_translated_code_works(backend_name):
    """Every push to it traps (the page is read-only) and runs once with the page open."""
    kernel = Guest.from_asm("""
        lea rsp, [rip + stack_top]
        mov eax, 5
        call function
        hlt
    function:
        add eax, 1
        ret
        .fill 64, 1, 0
    stack_top:
    """, mode=64, name="stack on code")
    native = Machine(kernel, backend=backend_name).run(timeout=10)
    bt = run_translated(kernel, backend=backend_name)
    assert bt.status.kind == StatusKind.HALTED and bt.regs.gprs() == native.regs.gprs()
    assert bt.monitor.entries["write: one-shot"] >= 2  # the call's push, the ret's inline lookup


def test_a_ret_whose_inline_lookup_straddles_into_translated_code_is_undone_and_run_once(backend_name):
    """The inline ret's first push lands on the stack's page, its second on the code's: the monitor puts RSP,
    RAX and the flags back and runs the ret once, as for any other store into translated code."""
    kernel = Guest.from_asm("""
        lea rsp, [rip + stack + 16]   # at the ret, RSP = stack + 8: pushfq writes stack, push rax the code page
        mov eax, 7
        call function
        hlt
    function:
        cmp eax, 7                    # flags the ret must not disturb
        ret
        .balign 4096
    stack:
        .fill 64, 1, 0
    """, mode=64, name="straddling stack")
    native = Machine(kernel, backend=backend_name).run(timeout=10)
    bt = run_translated(kernel, backend=backend_name)
    assert bt.status.kind == StatusKind.HALTED, bt.status
    assert bt.regs.gprs() == native.regs.gprs() and bt.regs.rflags & 0xFF == native.regs.rflags & 0xFF
    assert bt.monitor.entries["write: one-shot"] == 1


def test_the_translation_widget_runs_a_probe_with_its_instruction_left_out(backend_name):
    from labkit.widgets import TranslationChoice

    choice = TranslationChoice(routine="Robin & Irvine: LAR", leave_out=frozenset({"lar"}), backend=backend_name)
    summary = choice.results()[0].data
    assert "left untranslated: lar. The translated console is different from the native one" in summary
    choice.translate.value = tuple(choice.translate.options)
    assert "The translated console is the same as the native one" in choice.results()[0].data
