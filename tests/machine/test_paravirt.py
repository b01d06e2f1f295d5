"""Paravirtualization: pvkernel64 under its hypervisor, on every backend.

The paravirtual kernel must print exactly what minikernel64 prints natively (where
trap-and-emulate differs in five lines), without a single privileged-instruction
trap; bad hypercalls get an error code, are counted, and change nothing.
"""

from __future__ import annotations

import errno
import re
import struct
from dataclasses import replace

import pytest

from labkit import Guest, Machine
from labkit.assembler import have_binutils
from labkit.monitor.paravirt import (MAX_MULTICALL, PV_ABI_VERSION, PV_ROUTINES, Hypercall, Paravirtual,
                                     ParavirtualSummary, pvkernel, run_paravirtual)
from labkit.monitor.trap_emulate import compare_consoles, minikernel, run_deprivileged
from labkit.monitor.translation_cache import SENSITIVE
from labkit.monitor.vcpu import PRIVILEGED, VirtualCpu
from labkit.vmm.status import StatusKind
from labkit.x86.disasm import disassemble

needs_binutils = pytest.mark.skipif(not have_binutils(), reason="GNU binutils are not installed")


def native_console(routines, backend: str) -> str:
    with Machine(minikernel(routines), backend=backend) as machine:
        result = machine.run(timeout=10)
    assert result.status.kind is StatusKind.HALTED, str(result.status)
    return result.console


def test_the_paravirtual_console_equals_the_native_one_where_trap_and_emulate_differs(backend_name):
    native = native_console(PV_ROUTINES, backend_name)
    report = run_paravirtual(backend=backend_name)
    assert report.result.status.kind is StatusKind.HALTED, str(report.result.status)
    assert report.console == native
    assert len(native.splitlines()) == 13
    deprivileged = run_deprivileged(minikernel(PV_ROUTINES), backend_name)
    assert len(compare_consoles(native, deprivileged.console).divergent) == 5
    assert compare_consoles(native, report.console).identical


@pytest.mark.parametrize("routines", [("cli_pushf",), ("popf", "sidt"), ("smsw", "page_fault", "control_registers"),
                                      ()])
def test_every_choice_of_routines_prints_the_native_lines(backend_name, routines):
    report = run_paravirtual(routines, backend=backend_name)
    assert report.console == native_console(routines, backend_name)


def test_the_hypervisor_sees_no_privileged_trap_only_hypercalls_and_the_kernels_own_faults(backend_name):
    report = run_paravirtual(backend=backend_name)
    assert report.traps == 0
    assert report.bounced == {6: 2, 14: 1}  # its two ud2 and its page fault, through its own trap table
    assert report.errors == {}
    console_lines = len(report.console.splitlines())
    assert report.hypercalls == {
        "version": 1, "multicall": 2,  # boot (GDT, trap table, TLB flush, boot line) and the three CR reads
        "console_io": console_lines - 1,  # one per line; the boot line went in the batch
        "irq_disable": 4, "irq_enable": 1, "irq_query": 2, "irq_restore": 1, "iret": 3,
        "get_descriptor_table": 2, "fpu_taskswitch": 2, "read_cr": 2, "sched_op": 1,
    }
    assert report.batched == {"set_gdt": 1, "set_trap_table": 1, "mmuext_op": 1, "console_io": 1, "read_cr": 3}
    assert report.entries == sum(report.hypercalls.values()) + 3
    vcpu = report.summary.vcpu
    assert vcpu.gdtr == (0x86A8, 0x17) and vcpu.idtr == (0x86E0, 0x30F) and vcpu.cr2 == 0x80000000
    # a native run of the same routines takes two port exits per console byte (LSR poll, THR write)
    with Machine(minikernel(PV_ROUTINES), backend=backend_name) as machine:
        native = machine.run(timeout=10)
    assert native.exits["IO"] == 2 * len(native.console)
    assert report.result.exits.get("IO", 0) == report.entries  # each entry is one exit, at the trap port


def test_a_privileged_instruction_in_a_paravirtual_kernel_is_a_counted_trap_that_stops_it(backend_name):
    kernel = pvkernel()
    code = bytearray(kernel.code)
    at = code.index(b"\x0f\x0b")  # the first ud2 (popf_ud2) becomes cli; nop
    code[at:at + 2] = b"\xfa\x90"
    report = run_paravirtual(guest=replace(kernel, code=bytes(code)), backend=backend_name)
    assert report.traps == 1
    assert report.result.status.kind is StatusKind.ERROR
    assert "privileged instruction at RIP 0x80fd: cli" in report.result.status.message


FORBIDDEN = (PRIVILEGED | SENSITIVE | {"pushf", "popf", "lar", "lsl", "verr", "verw"}) - {"mov", "int"}


def forbidden_in(lines) -> list[str]:
    """The privileged or sensitive instructions among disassembled lines: ``int n`` other than the
    hypercall's ``int 4`` and ``mov`` to or from a control or debug register count too."""
    return [text for _, _, text in lines
            if text.split()[0] in FORBIDDEN or re.search(r"\b[cd]r\d", text) and text.startswith("mov")
            or text.startswith("int ") and text != "int 4"]


def test_pvkernel64_contains_no_privileged_or_sensitive_instruction():
    code = Guest.named("pvkernel64").code
    code_size = struct.unpack_from("<Q", code, 24)[0]
    found, mnemonics = [], set()
    # The code has three parts between fixed addresses (its two ud2 sit where minikernel64 has them);
    # zero padding before each fixed address decodes as harmless "add [rax], al".
    for start, end in ((0x20, 0xFD), (0xFD, 0x19C), (0x19C, code_size)):
        part = code[start:end]
        lines = disassemble(part, 0x8000 + start, 64)
        assert sum(len(encoded) for _, encoded, _ in lines) >= len(part.rstrip(b"\0")), hex(start)  # all decoded
        found += forbidden_in(lines)
        mnemonics |= {text.split()[0] for _, _, text in lines}
    assert {"int", "ud2", "call", "ret"} <= mnemonics  # the decoding reached the hypercalls and the faults
    assert found == []
    native = Guest.named("minikernel64").code
    seen = forbidden_in(disassemble(native[0x18:0x200], 0x8018, 64))
    assert {"cli", "lgdt", "lidt", "mov rax, cr3", "pushfq", "sgdt"} <= {
        text if "cr" in text else text.split()[0] for text in seen}  # the check sees them


def test_without_the_hypervisor_the_kernel_says_so_through_labkits_services(backend_name):
    with Machine("pvkernel64", backend=backend_name) as machine:
        result = machine.run(timeout=10)
    assert result.status.kind is StatusKind.EXITED and result.status.code == 1
    assert "no paravirtual hypervisor" in result.console


def test_routines_pvkernel64_does_not_have_are_refused():
    with pytest.raises(Exception, match="pvkernel64 has no routine 'timer'"):
        pvkernel(["cli_pushf", "timer"])
    with pytest.raises(Exception, match="routines .* or a guest, not both"):
        run_paravirtual(["popf"], guest="pvkernel64")


# -- bad input ------------------------------------------------------------------------------------

RAM = 2 << 20
OUTSIDE = 0x300000  # above RAM, below 1 GiB
CASES = [
    # (what, number, (rdi, rsi, rdx, r10, r8), errno or None for success)
    ("unknown number", 1, (0, 0, 0, 0, 0), errno.ENOSYS),
    ("unknown 64-bit number", 0xFFFF_FFFF_0000_0011, (0, 0, 0, 0, 0), errno.ENOSYS),
    ("version", Hypercall.VERSION, (0, 0, 0, 0, 0), None),
    ("console_io: read command", Hypercall.CONSOLE_IO, (1, 4, "text", 0, 0), errno.EINVAL),
    ("console_io: too long", Hypercall.CONSOLE_IO, (0, 5000, "text", 0, 0), errno.EINVAL),
    ("console_io: buffer outside RAM", Hypercall.CONSOLE_IO, (0, 4, OUTSIDE, 0, 0), errno.EFAULT),
    ("console_io: buffer across the end of RAM", Hypercall.CONSOLE_IO, (0, 32, RAM - 16, 0, 0), errno.EFAULT),
    ("console_io: buffer wrapping around", Hypercall.CONSOLE_IO, (0, 32, 2**64 - 16, 0, 0), errno.EFAULT),
    ("console_io: good", Hypercall.CONSOLE_IO, (0, 4, "text", 0, 0), None),
    ("set_gdt: limit not 8n-1", Hypercall.SET_GDT, ("good_gdt", 0x18, 0, 0, 0), errno.EINVAL),
    ("set_gdt: limit of 64 KiB", Hypercall.SET_GDT, ("good_gdt", 0x10007, 0, 0, 0), errno.EINVAL),
    ("set_gdt: outside RAM", Hypercall.SET_GDT, (OUTSIDE, 0x17, 0, 0, 0), errno.EFAULT),
    ("set_gdt: first entry not null", Hypercall.SET_GDT, ("bad_gdt_null", 0x17, 0, 0, 0), errno.EINVAL),
    ("set_gdt: a TSS descriptor", Hypercall.SET_GDT, ("bad_gdt_tss", 0x17, 0, 0, 0), errno.EINVAL),
    ("set_trap_table: limit not 16n-1", Hypercall.SET_TRAP_TABLE, ("good_idt", 0x20, 0, 0, 0), errno.EINVAL),
    ("set_trap_table: a call gate", Hypercall.SET_TRAP_TABLE, ("bad_idt_call", 0x1F, 0, 0, 0), errno.EINVAL),
    ("set_trap_table: handler outside RAM", Hypercall.SET_TRAP_TABLE, ("bad_idt_far", 0x1F, 0, 0, 0), errno.EINVAL),
    ("set_trap_table: outside RAM", Hypercall.SET_TRAP_TABLE, (OUTSIDE, 0xF, 0, 0, 0), errno.EFAULT),
    ("multicall: too many entries", Hypercall.MULTICALL, ("batch", MAX_MULTICALL + 1, 0, 0, 0), errno.E2BIG),
    ("multicall: entries outside RAM", Hypercall.MULTICALL, (RAM - 64, 2, 0, 0, 0), errno.EFAULT),
    ("multicall: nested, iret, unknown, good", Hypercall.MULTICALL, ("batch", 4, 0, 0, 0), None),
    ("irq_restore: 2", Hypercall.IRQ_RESTORE, (2, 0, 0, 0, 0), errno.EINVAL),
    ("fpu_taskswitch: 7", Hypercall.FPU_TASKSWITCH, (7, 0, 0, 0, 0), errno.EINVAL),
    ("read_cr: CR8", Hypercall.READ_CR, (8, 0, 0, 0, 0), errno.EINVAL),
    ("get_descriptor_table: 2", Hypercall.GET_DESCRIPTOR_TABLE, (2, "scratch", 0, 0, 0), errno.EINVAL),
    ("get_descriptor_table: buffer outside RAM", Hypercall.GET_DESCRIPTOR_TABLE, (0, RAM - 4, 0, 0, 0), errno.EFAULT),
    ("mmuext_op: unknown op", Hypercall.MMUEXT_OP, (99, 0, 0, 0, 0), errno.EINVAL),
    ("mmuext_op: unaligned new_baseptr", Hypercall.MMUEXT_OP, (5, 0x4008, 0, 0, 0), errno.EINVAL),
    ("mmuext_op: new_baseptr outside RAM", Hypercall.MMUEXT_OP, (5, OUTSIDE, 0, 0, 0), errno.EFAULT),
    ("sched_op: unknown command", Hypercall.SCHED_OP, (7, 0, 0, 0, 0), errno.EINVAL),
    ("sched_op: unknown shutdown reason", Hypercall.SCHED_OP, (2, 9, 0, 0, 0), errno.EINVAL),
    ("sched_op: yield", Hypercall.SCHED_OP, (0, 0, 0, 0, 0), None),
]
BATCH_RESULTS = [-errno.EINVAL, -errno.EINVAL, -errno.ENOSYS, 0]  # nested multicall, iret, number 99, irq_query


def _argument(register: str, value) -> str:
    if isinstance(value, str):
        return f"        lea {register}, [rip + {value}]"
    return f"        mov {register}, {value:#x}"


def bad_input_kernel() -> Guest:
    lines = []
    for index, (_, number, args, _) in enumerate(CASES):
        lines += [_argument(register, value) for register, value in zip(("rdi", "rsi", "rdx", "r10", "r8"), args)]
        lines += [f"        mov rax, {int(number):#x}", "        int 4", f"        mov [rip + results + {8 * index}], rax"]
    entry = lambda op: f"        .quad {op:#x}, 0, 0, 0, 0, 0, 0, 0"  # noqa: E731
    source = "\n".join([
        *lines,
        # an iret to the CS of ring 3 (no virtual user mode) and with the frame outside RAM
        "        push 0x2b", "        push 0x80000", "        push 0x202", "        push 0x2b",
        "        lea rax, [rip + after]", "        push rax", "        push 0", f"        mov eax, {Hypercall.IRET}",
        "        int 4", "        mov [rip + iret_results], rax", "        add rsp, 48",
        "        mov rbx, rsp", f"        mov rsp, {RAM - 8:#x}", f"        mov eax, {Hypercall.IRET}", "        int 4",
        "        mov rsp, rbx", "        mov [rip + iret_results + 8], rax",
        "after:",
        f"        mov edi, 2", "        xor esi, esi", f"        mov eax, {Hypercall.SCHED_OP}", "        int 4",
        "        .balign 64",
        "batch:", entry(Hypercall.MULTICALL), entry(Hypercall.IRET), entry(99), entry(Hypercall.IRQ_QUERY),
        "good_gdt: .quad 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF",
        "bad_gdt_null: .quad 1, 0x00AF9B000000FFFF, 0x00CF93000000FFFF",
        "bad_gdt_tss: .quad 0, 0x00AF9B000000FFFF, 0x0000890000000067",
        "good_idt: .quad 0x00008E0000080000, 0, 0x00008E0000080000, 0",
        "bad_idt_call: .quad 0x00008E0000080000, 0, 0x00008C0000080000, 0",
        "bad_idt_far: .quad 0x00008E0000080000, 0, 0x40008E0000080000, 0",
        "text: .ascii \"ok!\\n\"",
        "scratch: .quad 0, 0",
        "iret_results: .quad 0, 0",
        f"results: .fill {len(CASES)}, 8, 0",
    ])
    return Guest.from_asm(source, name="pv-bad-input", user=True)


@needs_binutils
def test_bad_hypercalls_get_an_error_code_are_counted_and_change_nothing(backend_name):
    kernel = bad_input_kernel()
    hypervisor = Paravirtual()
    with Machine(kernel, backend=backend_name, monitor=hypervisor) as machine:
        result = machine.run(timeout=10)
        memory = machine.read_memory(0x8000, len(kernel.code))
    assert result.status.kind is StatusKind.EXITED and result.status.code == 0, str(result.status)

    def at(label_offset: int, count: int) -> list[int]:
        return list(struct.unpack_from(f"<{count}q", memory, label_offset))

    results = at(len(kernel.code) - 8 * len(CASES), len(CASES))  # "results" is the last thing in the image
    for (what, _, _, expected), got in zip(CASES, results):
        if expected is None:
            assert got >= 0, (what, got)
        else:
            assert got == -expected, (what, got, -expected)
    assert results[2] == PV_ABI_VERSION
    iret_results = at(len(kernel.code) - 8 * len(CASES) - 16, 2)
    assert iret_results == [-errno.EINVAL, -errno.EFAULT]
    batch = kernel.code.index(struct.pack("<Q", Hypercall.MULTICALL) + bytes(56) + struct.pack("<Q", Hypercall.IRET))
    assert [struct.unpack_from("<q", memory, batch + 64 * i + 8)[0] for i in range(4)] == BATCH_RESULTS
    assert result.console == "ok!\n"

    summary = result.monitor
    assert isinstance(summary, ParavirtualSummary)
    refused = sum(expected is not None for *_, expected in CASES) + 2 + 3  # two irets, three batch entries
    assert sum(summary.errors.values()) == refused
    assert summary.errors["unknown: ENOSYS"] == 3 and summary.errors["multicall: E2BIG"] == 1
    assert summary.errors["set_gdt: EINVAL"] == 4 and summary.errors["console_io: EFAULT"] == 3
    assert summary.hypercalls["unknown"] == 2 and summary.batched["unknown"] == 1
    assert summary.traps == 0 and summary.bounced == {}
    fresh = VirtualCpu()
    vcpu = summary.vcpu
    assert (vcpu.gdtr, vcpu.idtr, vcpu.cr0, vcpu.cr3) == (fresh.gdtr, fresh.idtr, fresh.cr0, fresh.cr3)
    assert [event.error.split(":")[0] for event in summary.events if event.name == "set_gdt"] == \
        ["EINVAL", "EINVAL", "EFAULT", "EINVAL", "EINVAL"]


# -- the three kernels side by side -------------------------------------------------------------------

def test_the_three_kernels_count_their_entries_by_kind_the_same_on_every_backend(backend_name):
    from labkit.monitor.paravirt import compare_kernels

    comparison = compare_kernels(backend=backend_name)
    native, trapped, paravirtual = (comparison.runs[k] for k in ("native", "trap-and-emulate", "paravirtual"))
    console = native.result.console
    assert native.entries == {"port exit: in 0x3fd": len(console), "port exit: out 0x3f8": len(console), "exit: HLT": 1}
    assert native.total == native.result.trace.exit_count()
    assert trapped.total == sum(trapped.result.monitor.traps.values())  # every trap, by what the monitor did
    assert trapped.by_category()["console output"] == 2 * len(console)
    assert paravirtual.by_category() == {"console output": 12, "interrupt flag": 8, "descriptor tables, CRs": 6,
                                         "the kernel's own exceptions": 6, "halt": 1, "batch (multicall)": 2,
                                         "other": 1}
    assert paravirtual.total == 36 and native.total > 25 * paravirtual.total
    table = comparison.table()
    assert table.rows[-3] == ["all entries", str(native.total), str(trapped.total), "36"]
    consoles = comparison.consoles()
    assert "trap-and-emulate: 5 line(s) differ from native; paravirtual: 0 line(s) differ from native" in consoles.note


def test_kernel_choice_reruns_for_its_routines_and_kernel(backend_name):
    from test_widgets import Panel, text_of

    from labkit.widgets import KernelChoice

    choice = KernelChoice(routines=PV_ROUTINES, backend=backend_name)
    panel = Panel(choice)
    assert "paravirtual 36 entries (0 line(s) differ)" in text_of(panel.first[0])
    assert text_of(panel.first[2]).startswith("paravirtual: 36 entries")
    texts = panel.after(lambda: setattr(choice.routines, "value", ["cli_pushf"]))
    assert "1 routine(s)" in texts[0] and "trap-and-emulate" in texts[0]
    assert choice.last.runs["paravirtual"].result.console == native_console(("cli_pushf",), backend_name)
    texts = panel.after(lambda: setattr(choice.kernel, "value", "trap-and-emulate"))
    assert texts[2].startswith("trap-and-emulate:") and "trap: cli" in texts[2]


def test_console_batch_reruns_the_ring_for_its_batch_size_and_reuses_the_uart(backend_name):
    from test_widgets import Panel, text_of

    from labkit.virtio import measure_console
    from labkit.widgets import ConsoleBatch

    uart = [measure_console(kib, "uart", backend=backend_name) for kib in (1, 4)]
    batch = ConsoleBatch(batch=1, backend=backend_name, kib=(1, 4), measured=uart)
    panel = Panel(batch)
    ring = {m.kib: m for m in batch.last if m.path == "ring"}
    assert [m for m in batch.last if m.path == "uart"] == uart  # reused, not measured again
    assert all(m.batch == 1 for m in ring.values())
    assert ring[4].notifications == 16 and all(m.console_ok for m in batch.last)  # 4 KiB in 256-byte buffers
    assert "4 KiB on" in text_of(panel.first[0]) and "batch of 1:" in text_of(panel.first[0])
    texts = panel.after(lambda: setattr(batch.batch, "value", 16))
    assert {m.kib: m.notifications for m in batch.last if m.path == "ring"} == {1: 1, 4: 1}
    assert "batch of 16:" in texts[0]
    uart_exits, ring_exits = uart[1].exits, {m.kib: m for m in batch.last if m.path == "ring"}[4].exits
    assert uart_exits >= 2 * 4096 and uart_exits >= 50 * ring_exits  # 4 KiB each: at least 50x fewer exits by ring
