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
