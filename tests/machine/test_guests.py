"""Every shipped guest on every backend, and the same guest on both (differential)."""

from __future__ import annotations

import pytest

from backends import HAS_KVM, NO_KVM_REASON
from labkit import Guest, Machine, list_guests
from labkit.vmm.status import KINDS

GUESTS = {guest.name: guest for guest in list_guests()}
DETERMINISTIC = [name for name, guest in GUESTS.items() if guest.expected.get("status") != "timeout"]


def expected_of(name: str) -> dict:
    return GUESTS[name].expected


@pytest.mark.parametrize("name", sorted(GUESTS))
def test_shipped_guest_behaves_as_its_manifest_says(name, backend_name):
    expected = expected_of(name)
    timeout = 0.5 if expected["status"] == "timeout" else 10
    with Machine(name, backend=backend_name) as machine:
        result = machine.run(timeout=timeout)
    assert result.status.kind == expected["status"], (str(result.status), result.console)
    if "console" in expected:
        assert result.console == expected["console"]
    if "exit_code" in expected:
        assert result.status.code == expected["exit_code"]
    if "vector" in expected:
        assert result.status.fault.vector == expected["vector"]
    assert len(result.trace) >= 1


@pytest.mark.kvm
@pytest.mark.skipif(not HAS_KVM, reason=NO_KVM_REASON)
@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_same_guest_same_behaviour_on_kvm_and_emulation(name):
    results = {}
    for backend in ("kvm", "emu"):
        with Machine(name, backend=backend) as machine:
            results[backend] = machine.run(timeout=10)
    kvm, emu = results["kvm"], results["emu"]
    assert kvm.console == emu.console
    assert str(kvm.status) == str(emu.status)
    assert kvm.regs.gprs() == emu.regs.gprs(), "final general-purpose registers differ"
    assert kvm.regs.rip == emu.regs.rip
    assert kvm.trace.by_reason().get("IO") == emu.trace.by_reason().get("IO")


def test_hello_exits_once_per_port_access(backend_name):
    result = Machine("hello64", backend=backend_name).run(timeout=10)
    text = "Hello from 64-bit mode!\n"
    assert result.console == text
    records = [record for record in result.trace if record.reason == "IO"]
    transmitted = [record for record in records if record.address == 0x3F8 and record.direction == "out"]
    assert bytes(record.data for record in transmitted).decode() == text
    polls = [record for record in records if record.address == 0x3FD and record.direction == "in"]
    assert len(polls) >= len(text) and all(record.data & 0x20 for record in polls)
    assert result.trace[len(result.trace.records) - 1].reason == "HLT"


def test_steps_yield_every_exit_then_stop(backend_name):
    machine = Machine("hello16", backend=backend_name)
    records = list(machine.steps(timeout=10))
    assert [record.seq for record in records] == list(range(len(records)))
    assert records[-1].reason == "HLT"
    assert machine.last_result.status.kind == "halted"
    assert machine.last_result.console == "Hello from 16-bit mode!\n"
    machine.close()


def test_unmapped_memory_is_mmio(backend_name):
    result = Machine("unmapped64", backend=backend_name).run(timeout=10)
    directions = {record.direction for record in result.trace if record.reason == "MMIO"}
    assert directions == {"read", "write"}
    reads = [record for record in result.trace if record.direction == "read"]
    assert all(record.data == (1 << (8 * record.size)) - 1 for record in reads), "nothing there reads as all ones"


@pytest.mark.parametrize("mode", [16, 32, 64])
def test_a_notebook_cell_guest_runs_in_each_mode(mode, backend_name):
    source = """
        mov dx, 0x3f8
        mov al, 'o'
        out dx, al
        mov al, 'k'
        out dx, al
        mov eax, 7
        mov ebx, 0x1234
        hlt
    """
    guest = Guest.from_asm(source, mode=mode)
    result = Machine(guest, backend=backend_name).run(timeout=10)
    assert (result.console, result.status.kind) == ("ok", "halted")
    assert result.regs.rax & 0xFFFF == 7 and result.regs.rbx & 0xFFFF == 0x1234


def test_fault_reports_vector_rip_and_registers(backend_name):
    guest = Guest.from_asm("mov rcx, 0x55\nmov rax, 0x1122334455667788\nud2\n", mode=64)
    result = Machine(guest, backend=backend_name).run(timeout=10)
    assert result.status.kind == "fault"
    fault = result.status.fault
    assert fault.vector == 6 and fault.error_code is None
    assert fault.rip == guest.load_address + 7 + 10
    assert result.regs.rax == 0x1122334455667788 and result.regs.rcx == 0x55
    assert result.regs.rip == fault.rip
    assert "#UD" in str(result.status)


def test_page_fault_reports_cr2_and_error_code(backend_name):
    guest = Guest.from_asm("mov rax, 0x80000000\nmov rbx, [rax]\nhlt\n", mode=64)
    result = Machine(guest, backend=backend_name).run(timeout=10)
    assert result.status.kind == "fault", str(result.status)
    assert result.status.fault.vector == 14
    assert result.status.fault.cr2 == 0x80000000
    assert result.status.fault.error_code == 0  # not present, read, supervisor


def test_statuses_are_classified(backend_name):
    for name in ("triplefault64", "forever64", "exit64"):
        result = Machine(name, backend=backend_name).run(timeout=0.3)
        assert result.status.kind in KINDS and result.status.kind != "running"
