"""Trap forwarding: a monitor on the host sees the guest's exceptions, on both backends."""

from __future__ import annotations

import pytest

from labkit import Guest, Machine
from labkit.vmm import forwarding
from labkit.vmm.status import Status, StatusKind
from labkit.x86 import layout
from labkit.x86.disasm import disassemble


class Skipper:
    """Emulates nothing: records each trap, steps over the instruction, ends the run at `hlt`."""

    def __init__(self):
        self.seen = []

    def on_trap(self, trap, context):
        code = context.read(trap.regs.rip, 15)
        (_, encoded, text), = disassemble(code, trap.regs.rip, 64, count=1)
        self.seen.append((trap.vector, trap.error_code, text, trap.cpl))
        if text == "hlt":
            context.stop(Status(StatusKind.HALTED, message="hlt emulated by the monitor"))
        trap.regs.rip += len(encoded)
        trap.regs.rbx += 1  # visible to the guest after the trap

    def summary(self):
        return list(self.seen)


@pytest.mark.unit
def test_stubs_are_what_the_docstring_says():
    assert forwarding.stub(13) == bytes.fromhex("6a0d") + b"\xe9" + (0x200 - (0xD0 + 7)).to_bytes(4, "little", signed=True) + b"\xcc" * 9
    assert forwarding.stub(6)[:4] == bytes.fromhex("6a006a06")
    listing = [text for _, _, text in disassemble(forwarding.common_routine(), forwarding.COMMON, 64)]
    assert listing[:2] == ["push rax", "push rcx"] and "out 0xf2, al" in listing
    assert listing[-2:] == ["add rsp, 0x10", "iretq"]


def test_a_monitor_sees_ring3_privileged_instructions(backend_name):
    guest = Guest.from_asm("mov rbx, 100\ncli\nmov rcx, cr0\nhlt\n", mode=64, user=True)
    monitor = Skipper()
    result = Machine(guest, backend=backend_name, monitor=monitor).run(timeout=10)
    assert result.status.kind == StatusKind.HALTED, str(result.status)
    assert result.monitor == [(13, 0, "cli", 3), (13, 0, "mov rcx, cr0", 3), (13, 0, "hlt", 3)]
    assert result.trace.count("IO") == 3  # one TRAP_PORT exit per trap
    assert all(record.address == layout.TRAP_PORT for record in result.trace if record.reason == "IO")


def test_registers_written_by_the_monitor_reach_the_guest(backend_name):
    guest = Guest.from_asm("mov rbx, 7\nmov rax, 0x1111\ncli\nmov rdx, rbx\nmov rsi, rax\nhlt\n", mode=64, user=True)
    result = Machine(guest, backend=backend_name, monitor=Skipper()).run(timeout=10)
    assert result.status.kind == StatusKind.HALTED
    assert result.regs.rdx == 8 and result.regs.rsi == 0x1111


@pytest.mark.unit
def test_monitors_need_long_mode():
    from labkit.errors import ConfigError

    with pytest.raises(ConfigError, match="long-mode"):
        Machine(Guest.from_bytes(b"\xf4", mode=32), backend="emu", monitor=Skipper(), isolate=False)


def test_a_run_the_monitor_stops_reports_the_guests_registers(backend_name):
    guest = Guest.from_asm("mov rbx, 1\nmov r12, 0x4242\nhlt\n", mode=64, user=True)
    result = Machine(guest, backend=backend_name, monitor=Skipper()).run(timeout=10)
    assert result.status.kind == StatusKind.HALTED
    assert result.regs.r12 == 0x4242 and result.regs.rbx == 2  # the monitor's increment
    assert result.regs.rip == guest.load_address + len(guest.code)  # after the emulated hlt
