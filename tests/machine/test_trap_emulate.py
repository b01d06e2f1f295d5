"""Trap-and-emulate: the same kernel natively (ring 0) and deprivileged (ring 3), on every backend.

The console must be identical except on exactly the lines where the kernel
uses a sensitive instruction that does not trap (pushf, popf, sgdt, sidt,
smsw); there it shows what the monitor cannot hide.
"""

from __future__ import annotations

import pytest

from labkit import Guest, Machine
from labkit.vmm.status import StatusKind
from labkit.monitor.trap_emulate import (DEFAULT_ROUTINES, TrapAndEmulate, TrapEmulateReport, compare_consoles,
                                         minikernel, run_deprivileged)

DIVERGENT = {
    2: ("cli, then pushf: IF = 0", "cli, then pushf: IF = 1"),
    4: ("  #UD handler: rip 0x80fd, IF in the interrupted code = 1",
        "  #UD handler: rip 0x80fd, IF in the interrupted code = 0"),
    5: ("sgdt: GDT base 0x86a8, limit 0x17", "sgdt: GDT base 0x1000, limit 0x4f"),
    6: ("sidt: IDT base 0x86e0, limit 0x30f", "sidt: IDT base 0x2000, limit 0xfff"),
    7: ("mov cr0 with TS set, then smsw: 0x80010039, TS = 1", "mov cr0 with TS set, then smsw: 0x80010031, TS = 0"),
}
"""Line number -> (native, trap-and-emulate): pushf shows the real IF; popf did not restore the
virtual IF (the #UD frame shows it); sgdt/sidt show labkit's tables; smsw shows the real CR0."""


@pytest.fixture(scope="module")
def native_console():
    return Guest.named("minikernel64").expected["console"]


def test_native_and_deprivileged_differ_exactly_on_the_sensitive_lines(backend_name, native_console):
    native = Machine("minikernel64", backend=backend_name).run(timeout=10)
    monitored = run_deprivileged("minikernel64", backend_name)
    assert native.status.kind == StatusKind.HALTED and native.console == native_console
    assert monitored.status.kind == StatusKind.HALTED, str(monitored.status)
    comparison = compare_consoles(native.console, monitored.console)
    assert {line: (left, right) for line, left, right in comparison.divergent} == DIVERGENT
    assert len(comparison.rows) == len(native_console.splitlines()) == 13


def test_the_monitor_emulates_what_traps_and_reflects_the_kernels_own_faults(backend_name):
    result = run_deprivileged("minikernel64", backend_name)
    report = result.monitor
    assert isinstance(report, TrapEmulateReport)
    assert report.emulated["lgdt"] == report.emulated["lidt"] == 1
    assert report.emulated["in"] == report.emulated["out"] == len(result.console)  # one poll, one write per byte
    assert report.emulated["iretq"] == 3 and report.emulated["hlt"] == 1
    assert report.reflected == {6: 2, 14: 1}  # two ud2, one page fault: the kernel's own handlers ran
    assert report.traps == {13: 2 * len(result.console) + 20, 6: 2, 14: 1}
    assert report.vcpu.gdtr == (0x86A8, 0x17) and report.vcpu.idtr == (0x86E0, 0x30F)
    assert report.vcpu.cr2 == 0x80000000 and not report.vcpu.interrupts_enabled
    assert report.explanation == ""
    assert [event.text.split(" [")[0] for event in report.events[:3]] == ["lgdt", "lidt", "mov rax, cr3"]
    assert {event.action for event in report.events} == {"emulated", "reflected"}


def test_an_unemulated_instruction_stops_the_guest(backend_name):
    guest = Guest.from_asm("mov rax, cr0\nwbinvd\nhlt\n", name="wbinvd")
    result = run_deprivileged(guest, backend_name, timeout=5)
    assert result.status.kind == StatusKind.ERROR
    assert result.status.message == "unemulated instruction at RIP 0x8003: wbinvd"
    assert result.monitor.traps == {13: 2} and result.regs.rip == 0x8003


def test_a_kernel_without_a_handler_is_a_virtual_triple_fault(backend_name):
    guest = Guest.from_asm("lidt [rip + empty]\nud2\nempty: .word 0\n.quad 0\n", name="no-idt")
    result = run_deprivileged(guest, backend_name, timeout=5)
    assert result.status.kind == StatusKind.SHUTDOWN and "virtual triple fault" in result.status.message


def test_the_virtual_timer_arrives_after_sti_but_not_after_popf(backend_name):
    result = run_deprivileged(minikernel(["timer"]), backend_name, monitor=TrapAndEmulate(timer=True))
    assert result.console.splitlines()[1:4] == ["timer armed with IF = 0; popf with IF = 1",
                                                "  ticks after popf: 0x0", "  ticks after sti: 0x1"]
    assert result.monitor.delivered == {0x20: 1}
    native = Machine(minikernel(["timer"]), backend=backend_name).run(timeout=10)
    assert "  ticks after sti: 0x0" in native.console  # labkit's machine has no timer of its own


def test_int_n_natively_and_deprivileged(backend_name):
    """The monitor reflects int 0x30 (#GP on the emulator and VT-x, #UD under PVM) into the virtual IDT.
    Natively, PVM's instruction emulator cannot run a ring-0 int n at all."""
    from labkit.kvm.system import kvm_flavour

    handled = "  int 0x30 handler: software interrupt taken"
    monitored = run_deprivileged(minikernel(["int"]), backend_name)
    assert handled in monitored.console.splitlines() and monitored.monitor.reflected == {0x30: 1}
    native = Machine(minikernel(["int"]), backend=backend_name).run(timeout=10)
    if backend_name == "kvm" and kvm_flavour() == "kvm_pvm":
        assert native.status.kind == StatusKind.ERROR and "int 0x30" in native.status.message
        assert monitored.monitor.traps.get(6) == 1  # PVM: ring-3 int n is #UD
    else:
        assert handled in native.console.splitlines()


def test_the_students_routine_runs_in_both(backend_name):
    guest = minikernel([], student="pushfq\npop rax\nand eax, 0x200")
    native = Machine(guest, backend=backend_name).run(timeout=10)
    monitored = run_deprivileged(guest, backend_name)
    assert native.console.splitlines()[-2:] == ["  rax = 0x0", "minikernel: done, halting"]
    assert monitored.console.splitlines()[-2:] == ["  rax = 0x200", "minikernel: done, halting"]


@pytest.mark.unit
def test_minikernel_routine_selection():
    from labkit.errors import ConfigError

    assert minikernel().code[16] == 0xFF and minikernel(DEFAULT_ROUTINES).code == Guest.named("minikernel64").code
    assert minikernel(["sgdt"]).code[16:24] == (4).to_bytes(8, "little")
    with pytest.raises(ConfigError, match="no routine 'lgdt'"):
        minikernel(["lgdt"])
    text = str(compare_consoles("a\nb\n", "a\nc\nd\n"))
    assert [line[0] for line in text.splitlines()] == [" ", " ", "≠", "≠"]


@pytest.mark.unit
def test_a_kvm_shutdown_at_port_io_is_explained():
    """Where a KVM host turns ring-3 port I/O into a triple fault (not this project's PVM host, which
    raises #GP), the report says why the monitor never saw it."""
    from types import SimpleNamespace

    from labkit.monitor.trap_emulate import _explain_shutdown
    from labkit.vmm.status import Origin
    from labkit.x86.state import Regs

    from labkit.memory import GuestMemory

    class Stopped:  # a Machine that stopped with RIP at an `in`
        def __init__(self):
            ram = bytearray(0x10000)
            ram[0x8010] = 0xEC  # in al, dx
            self.memory = GuestMemory([(0, memoryview(ram), False)])

        def read_memory(self, address, size):
            return self.memory.read(address, size)

    report = TrapAndEmulate().summary()
    report.traps[13] = 4
    origin = Origin("kvm", "kvm_intel", None, "0.1.0", "a VT-x host")
    result = SimpleNamespace(regs=Regs(rip=0x8010), monitor=report, origin=origin)
    text = _explain_shutdown(Stopped(), result)
    assert "'in al, dx' at RIP 0x8010 into a triple fault instead of a #GP" in text and "after 4 trap(s)" in text
    assert "kvm_intel" in text  # where the run happened, not this host's KVM
    outside = SimpleNamespace(regs=Regs(rip=0x10000), monitor=report, origin=origin)
    assert _explain_shutdown(Stopped(), outside) == "the guest shut down (triple fault) at RIP 0x10000 (?) under KVM (kvm_intel)"


def is_pvm(backend: str) -> bool:
    from labkit.kvm.system import kvm_flavour

    return backend == "kvm" and kvm_flavour() == "kvm_pvm"


def test_kvm_counts_what_the_traps_cost_inside_it(backend_name):
    """On KVM the report carries KVM's own exit count; under PVM every trap costs exits KVM handles itself,
    which the native run of the same kernel does not have (notebook 02 shows this table)."""
    from labkit.monitor.trap_emulate import run_native

    native, native_counts = run_native("minikernel64", backend_name)
    monitored = run_deprivileged("minikernel64", backend_name)
    counts = monitored.monitor.kvm
    if backend_name == "emu":
        assert native_counts is None and counts is None
        return
    assert native.status.kind == StatusKind.HALTED
    assert counts.userspace == len(monitored.trace.records) == monitored.monitor.trap_count
    assert counts.exits >= counts.userspace and counts.in_kernel == counts.exits - counts.userspace
    assert native_counts.userspace == len(native.trace.records)
    if is_pvm(backend_name):
        # Measured: about two exits inside KVM per trap (the fault's delivery and the stub's return), against a
        # handful for the whole native run; every instruction of the forwarding stub is emulated.
        assert counts.in_kernel > monitored.monitor.trap_count
        assert counts.in_kernel > 10 * max(native_counts.in_kernel, 1)
        assert counts.emulated > native_counts.emulated


def test_mov_cr3_only_changes_the_virtual_cr3(backend_name):
    """The monitor does not shadow page tables: a kernel that loads another CR3 keeps running on labkit's map."""
    kernel = minikernel([], student="mov rax, 0x123000\nmov cr3, rax\nmov rax, cr3")
    native = Machine(kernel, backend=backend_name).run(timeout=10)
    monitored = run_deprivileged(kernel, backend_name)
    assert "rax = 0x123000" in monitored.console, monitored.console
    assert monitored.status.kind == StatusKind.HALTED, str(monitored.status)
    assert monitored.monitor.vcpu.cr3 == 0x123000
    # Natively the CPU walks the (empty) tables at 0x123000 at the next fetch: a triple fault, nothing printed.
    assert native.status.kind == StatusKind.SHUTDOWN and "rax =" not in native.console


def test_the_figure_and_tables_read_on_a_projector(backend_name):
    """150 dpi, no text under 11 pt, no overlapping labels; exceptions by name, never by number."""
    from labkit.viz.style import readability_problems
    from labkit.viz.trap_emulate import (FONT, costs_table, divergence_table, events_table, monitor_table,
                                         trap_profile)

    native = Machine("minikernel64", backend=backend_name).run(timeout=10)
    monitored = run_deprivileged("minikernel64", backend_name)
    figure = trap_profile({backend_name: (native, monitored)})
    assert figure.dpi >= 150 and FONT >= 11
    assert readability_problems(figure) == []
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure).draw()
    texts = [text for text in figure.findobj(lambda artist: hasattr(artist, "get_fontsize")) if text.get_text()]
    assert texts and min(text.get_fontsize() for text in texts) >= 11
    renderer = figure.canvas.get_renderer()
    for axes in figure.axes:
        boxes = [label.get_window_extent(renderer) for label in axes.get_yticklabels() if label.get_text()]
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), "tick labels overlap"
    report = monitored.monitor
    shown = "\n".join(str(table) for table in (monitor_table(report), events_table(report),
                                               costs_table({backend_name: (native, monitored)}),
                                               divergence_table(compare_consoles(native.console, monitored.console))))
    assert "#GP" in shown and "#UD" in shown and "#PF" in shown
    assert "vector 13" not in shown and "vector 6" not in shown
    assert "The 5 of 13 console lines that differ" in shown and "measured on" in shown
