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
