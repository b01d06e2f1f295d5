"""The virtual CPU's emulate/reflect/deliver_pending on hand-made traps: no backend needed."""

from __future__ import annotations

import struct

import pytest

from labkit.memory import GuestMemory
from labkit.vmm.forwarding import MonitorContext, Trap
from labkit.monitor.vcpu import (VirtualCpu, VirtualTripleFault, decode, deliver_pending, emulate, reflect,
                                 write_register)
from labkit.x86.idt import Gate, encode_gate64
from labkit.x86.state import Regs

pytestmark = pytest.mark.unit

RIP = 0x8000
STACK = 0x9000
IDT = 0xA000


class Ports:
    def __init__(self):
        self.accesses = []

    def __call__(self, port, size, is_write, value=0):
        self.accesses.append((port, size, is_write, value))
        return 0x60 if not is_write else 0


def machine(code: bytes, **regs):
    memory = memoryview(bytearray(0x10000))
    memory[RIP:RIP + len(code)] = code
    ports, stops = Ports(), []
    context = MonitorContext(GuestMemory([(0, memory, False)]), ports, lambda status, regs: stops.append(status))
    trap = Trap(13, 0, Regs(rip=RIP, rsp=STACK, rflags=0x202, **regs), cs=0x2B, ss=0x23)
    context.trap = trap
    return trap, context, ports


def run(vcpu, code: bytes, **regs):
    trap, context, ports = machine(code, **regs)
    return emulate(vcpu, trap, context, code), trap, context, ports


def test_cli_sti_change_only_the_virtual_if():
    vcpu = VirtualCpu(interrupts_enabled=True)
    text, trap, _, _ = run(vcpu, b"\xfa")
    assert (text, vcpu.interrupts_enabled, trap.regs.rip, trap.regs.rflags) == ("cli", False, RIP + 1, 0x202)
    assert run(vcpu, b"\xfb")[0] == "sti" and vcpu.interrupts_enabled
    assert vcpu.emulated == {"cli": 1, "sti": 1}


def test_mov_to_and_from_control_registers():
    vcpu = VirtualCpu()
    assert run(vcpu, b"\x0f\x22\xd8", rax=0x1234000)[0] == "mov cr3, rax"  # mov cr3, rax
    assert vcpu.cr3 == 0x1234000
    text, trap, _, _ = run(vcpu, b"\x0f\x20\xdb", rbx=-1 & (2**64 - 1))  # mov rbx, cr3
    assert text == "mov rbx, cr3" and trap.regs.rbx == 0x1234000


def test_lgdt_and_sgdt_use_the_virtual_gdtr():
    vcpu = VirtualCpu()
    trap, context, _ = machine(b"\x0f\x01\x13", rbx=0x9100)  # lgdt [rbx]
    context.write(0x9100, struct.pack("<HQ", 0x17, 0x86A8))
    assert emulate(vcpu, trap, context, b"\x0f\x01\x13") == "lgdt [rbx]"
    assert vcpu.gdtr == (0x86A8, 0x17)
    trap, context, _ = machine(b"\x0f\x01\x03", rbx=0x9200)  # sgdt [rbx]
    assert emulate(vcpu, trap, context, b"\x0f\x01\x03") == "sgdt [rbx]"
    assert context.read(0x9200, 10) == struct.pack("<HQ", 0x17, 0x86A8)


def test_port_io_reaches_the_bus_and_merges_al():
    vcpu = VirtualCpu()
    text, trap, _, ports = run(vcpu, b"\xec", rdx=0x3FD, rax=0x1111)  # in al, dx
    assert text == "in al, dx" and trap.regs.rax == 0x1160 and ports.accesses == [(0x3FD, 1, False, 0)]
    text, _, _, ports = run(vcpu, b"\xee", rdx=0x3F8, rax=0x41)  # out dx, al
    assert ports.accesses == [(0x3F8, 1, True, 0x41)]


def test_a_monitor_port_device_comes_before_the_bus():
    vcpu = VirtualCpu()
    seen = []

    class Timer:
        def write(self, port, size, value):
            seen.append(port)

        def read(self, port, size):
            return 0

    vcpu.ports[0x40] = Timer()
    _, _, _, ports = run(vcpu, b"\xe6\x40")  # out 0x40, al
    assert seen == [0x40] and ports.accesses == []


def test_pushf_and_popf_when_they_trap_use_the_virtual_if():
    vcpu = VirtualCpu(interrupts_enabled=False)
    text, trap, context, _ = run(vcpu, b"\x9c")  # pushfq
    assert text == "pushfq" and trap.regs.rsp == STACK - 8
    assert struct.unpack("<Q", context.read(STACK - 8, 8))[0] & 0x200 == 0
    trap, context, _ = machine(b"\x9d")
    context.write(STACK, struct.pack("<Q", 0x3202 | 0x1))  # IOPL 3, IF, CF
    assert emulate(vcpu, trap, context, b"\x9d") == "popfq"
    assert vcpu.interrupts_enabled and trap.regs.rflags == 0x203  # IOPL stays 0, IF stays 1 for real


def test_iretq_returns_to_virtual_ring_0_and_loads_the_virtual_if():
    vcpu = VirtualCpu()
    trap, context, _ = machine(b"\x48\xcf")
    context.write(STACK, struct.pack("<5Q", 0x8123, 0x08, 0x246, 0x7000, 0x10))
    assert emulate(vcpu, trap, context, b"\x48\xcf") == "iretq"
    assert (trap.regs.rip, trap.regs.rsp, vcpu.interrupts_enabled, trap.cs) == (0x8123, 0x7000, True, 0x2B)
    trap, context, _ = machine(b"\x48\xcf")
    context.write(STACK, struct.pack("<5Q", 0x8123, 0x2B, 0x246, 0x7000, 0x23))
    assert emulate(vcpu, trap, context, b"\x48\xcf") is None  # to virtual ring 3: not modelled


def test_unemulated_instructions_change_nothing():
    vcpu = VirtualCpu()
    text, trap, _, _ = run(vcpu, b"\x0f\x09")  # wbinvd
    assert text is None and trap.regs.rip == RIP and vcpu.emulated == {}
    assert run(vcpu, b"\x48\x89\xd8")[0] is None  # mov rax, rbx: not privileged at all


def install_gate(context, vector, handler, gate_type=0xE):
    context.write(IDT + 16 * vector, encode_gate64(Gate(offset=handler, selector=0x08, type=gate_type)))


def test_reflect_builds_a_ring0_frame_on_the_guest_stack():
    vcpu = VirtualCpu(interrupts_enabled=True, idtr=(IDT, 0xFFF))
    trap, context, _ = machine(b"")
    trap.regs.rsp = STACK + 8  # not 16-aligned: the CPU aligns first
    trap.regs.rflags = 0x246
    install_gate(context, 13, 0x8400)
    reflect(vcpu, trap, context, 13, 0x18)
    frame = struct.unpack("<6Q", context.read(trap.regs.rsp, 48))
    assert frame == (0x18, RIP, 0x08, 0x246, STACK + 8, 0x10)  # error, RIP, CS (ring 0), RFLAGS, RSP, SS
    assert trap.regs.rsp == STACK - 48 and trap.regs.rip == 0x8400 and not vcpu.interrupts_enabled
    assert vcpu.reflected == {13: 1}


def test_reflect_page_fault_sets_virtual_cr2_and_trap_gates_keep_if():
    vcpu = VirtualCpu(interrupts_enabled=True, idtr=(IDT, 0xFFF))
    trap, context, _ = machine(b"")
    install_gate(context, 14, 0x8500, gate_type=0xF)
    reflect(vcpu, trap, context, 14, 0, cr2=0x80000000)
    assert vcpu.cr2 == 0x80000000 and vcpu.interrupts_enabled


def test_reflect_without_a_gate_is_a_virtual_triple_fault():
    vcpu = VirtualCpu(idtr=(IDT, 0xFFF))
    trap, context, _ = machine(b"")
    with pytest.raises(VirtualTripleFault, match="no present"):
        reflect(vcpu, trap, context, 6)
    with pytest.raises(VirtualTripleFault, match="limit"):
        reflect(VirtualCpu(idtr=(IDT, 0x0F)), trap, context, 6)


def test_int_n_is_reflected_with_rip_after_it():
    vcpu = VirtualCpu(idtr=(IDT, 0xFFF))
    trap, context, _ = machine(b"\xcd\x30")
    install_gate(context, 0x30, 0x8600)
    assert emulate(vcpu, trap, context, b"\xcd\x30") == "int 0x30"
    assert trap.regs.rip == 0x8600 and struct.unpack("<Q", context.read(trap.regs.rsp, 8))[0] == RIP + 2


def test_pending_interrupts_wait_for_the_virtual_if():
    vcpu = VirtualCpu(idtr=(IDT, 0xFFF), pending=[0x20])
    trap, context, _ = machine(b"")
    install_gate(context, 0x20, 0x8700)
    assert deliver_pending(vcpu, trap, context) is None and trap.regs.rip == RIP
    vcpu.interrupts_enabled = True
    assert deliver_pending(vcpu, trap, context) == 0x20 and trap.regs.rip == 0x8700 and vcpu.pending == []


def test_decode_and_register_writes():
    decoded = decode(b"\x0f\x01\x15\x10\x00\x00\x00", 0x8000)  # lgdt [rip + 0x10]
    assert decoded.mnemonic == "lgdt" and decoded.length == 7 and decoded.operands[0].base == "rip"
    regs = Regs(rax=0xFFFF_FFFF_FFFF_FFFF)
    write_register(regs, "eax", 1)
    assert regs.rax == 1
    write_register(regs, "ah", 0x12)
    assert regs.rax == 0x1201


def test_snapshot_pickles_without_port_devices():
    import pickle

    vcpu = VirtualCpu()
    vcpu.ports[0x40] = object()
    copy = pickle.loads(pickle.dumps(vcpu.snapshot()))
    assert copy.ports == {} and copy.cr3 == vcpu.cr3
