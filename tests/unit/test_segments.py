"""Segment instructions at virtual CPL 0 (labkit.monitor.segments) against a hand-made GDT: the SDM's cases."""

from __future__ import annotations

import struct

import pytest

from labkit import assemble
from labkit.memory import GuestMemory
from labkit.monitor.segments import SegmentFault, Unmodelled, VirtualSegments, access_check, emulate_segment
from labkit.monitor.vcpu import VirtualCpu
from labkit.vmm.forwarding import MonitorContext, Trap
from labkit.x86.arch import RFLAGS_ZF
from labkit.x86.state import Regs

pytestmark = pytest.mark.unit

RIP, STACK, GDT = 0x8000, 0x9000, 0xA000

DESCRIPTORS = {
    0x08: 0x00AF9B000000FFFF,  # 64-bit code, DPL 0
    0x10: 0x00CF93000000FFFF,  # data, DPL 0, writable, accessed
    0x18: 0x00CFFB000000FFFF,  # 32-bit code, DPL 3
    0x20: 0x00CF91000000FFFF,  # data, DPL 0, read-only, accessed
    0x28: 0x00AF9F000000FFFF,  # 64-bit conforming code, DPL 0
    0x30: 0x00CF92000000FFFF,  # data, DPL 0, not yet accessed
    0x38: 0x00CF13000000FFFF,  # data, DPL 0, not present
    0x40: 0x0000890030000067,  # 64-bit TSS (available), base 0x3000 ...
    0x48: 0x0000000000000000,  # ... its upper half
    0x50: 0x0000820040000FFF,  # LDT, base 0x4000, limit 0xfff ...
    0x58: 0x0000000000000000,
    0x60: 0x00008C0000080000,  # 64-bit call gate ...
    0x68: 0x0000000000000000,
    0x70: 0x00CF9300100000FF,  # data, DPL 0, base 0x1000 (a non-zero base)
}
LIMIT = 0x77


def machine(source: str = "nop", **regs):
    memory = memoryview(bytearray(0x10000))
    for selector, value in DESCRIPTORS.items():
        struct.pack_into("<Q", memory, GDT + selector, value)
    code = assemble(source, 64, RIP)
    memory[RIP:RIP + len(code)] = code
    context = MonitorContext(GuestMemory([(0, memory, False)]), lambda *access: 0, lambda status, regs: None)
    trap = Trap(3, 0, Regs(rip=RIP, rsp=STACK, rflags=0x202, **regs), cs=0x2B, ss=0x23)
    context.trap = trap
    vcpu = VirtualCpu()
    vcpu.gdtr = (GDT, LIMIT)
    return vcpu, trap, context, code, memory


@pytest.mark.parametrize("mnemonic, selector, sets_zf", [
    ("lar", 0x08, True), ("lar", 0x00, False), ("lar", 0x78, False),   # null; beyond the limit
    ("lar", 0x18, True),                                               # DPL 3 is visible from CPL 0
    ("lar", 0x0B, False), ("lar", 0x2B, True),                         # RPL 3 > DPL 0; but conforming code
    ("lar", 0x40, True), ("lar", 0x50, False), ("lar", 0x60, True),    # IA-32e: TSS yes, LDT no, call gate yes
    ("lsl", 0x40, True), ("lsl", 0x50, True), ("lsl", 0x60, False),    # IA-32e: TSS, LDT yes; call gate no
    ("lar", 0x0C, False),                                              # an LDT selector with no LDT loaded
    ("verr", 0x08, True), ("verr", 0x20, True), ("verr", 0x40, False),
    ("verw", 0x10, True), ("verw", 0x20, False), ("verw", 0x08, False),
])
def test_access_checks_follow_the_sdm_tables(mnemonic, selector, sets_zf):
    vcpu, trap, context, _, _ = machine()
    assert (access_check(mnemonic, selector, vcpu, context) is not None) == sets_zf


def test_lar_and_lsl_load_the_masked_rights_and_the_byte_granular_limit():
    vcpu, trap, context, code, _ = machine("lar rax, rcx\nlsl edx, ecx\nlsl bx, cx", rax=(1 << 64) - 1,
                                            rbx=(1 << 64) - 1, rcx=0x10)
    segments = VirtualSegments()
    for _ in range(3):
        assert emulate_segment(vcpu, segments, trap, context, bytes(context.read(trap.regs.rip, 15)))
    assert trap.regs.rax == 0xC09300 and trap.regs.rdx == 0xFFFFFFFF
    assert trap.regs.rbx == 0xFFFF_FFFF_FFFF_FFFF  # 16-bit form: low 16 bits of the limit, merged
    assert trap.regs.rflags & RFLAGS_ZF


def test_a_failed_lar_clears_zf_and_leaves_the_destination():
    vcpu, trap, context, code, _ = machine("lar eax, ecx", rax=0x1234, rcx=0x78)
    trap.regs.rflags |= RFLAGS_ZF
    assert emulate_segment(vcpu, VirtualSegments(), trap, context, code) == "lar eax, ecx"
    assert trap.regs.rax == 0x1234 and not trap.regs.rflags & RFLAGS_ZF and trap.regs.rip == RIP + len(code)


@pytest.mark.parametrize("source, rcx, vector, error_code", [
    ("mov ds, ecx", 0x78, 13, 0x78),      # beyond the GDT limit
    ("mov ds, ecx", 0x40, 13, 0x40),      # a system segment
    ("mov ds, ecx", 0x38, 11, 0x38),      # not present: #NP
    ("mov ss, ecx", 0x20, 13, 0x20),      # SS must be writable
    ("mov ss, ecx", 0x13, 13, 0x10),      # RPL 3 != CPL 0
    ("mov ss, ecx", 0x03, 13, 0),         # null SS with RPL 3: #GP(0)
    ("mov cs, ecx", 0x08, 6, None),       # MOV cannot load CS
])
def test_a_bad_load_raises_what_the_cpu_raises_and_changes_nothing(source, rcx, vector, error_code):
    vcpu, trap, context, code, _ = machine(source, rcx=rcx)
    segments = VirtualSegments()
    with pytest.raises(SegmentFault) as raised:
        emulate_segment(vcpu, segments, trap, context, code)
    assert (raised.value.vector, raised.value.error_code) == (vector, error_code)
    assert segments == VirtualSegments() and (vcpu.cs, vcpu.ss) == (0x08, 0x10) and trap.regs.rip == RIP


def test_a_load_sets_the_descriptors_accessed_bit_and_the_virtual_selector():
    vcpu, trap, context, code, memory = machine("mov es, ecx\nmov eax, es", rcx=0x30)
    segments = VirtualSegments()
    emulate_segment(vcpu, segments, trap, context, code)
    assert segments.es == 0x30 and memory[GDT + 0x30 + 5] == 0x93
    emulate_segment(vcpu, segments, trap, context, bytes(context.read(trap.regs.rip, 15)))
    assert trap.regs.rax == 0x30


def test_far_call_pushes_the_virtual_cs_and_retf_comes_back():
    vcpu, trap, context, code, memory = machine("call fword ptr [rbx]", rbx=0xB000)
    struct.pack_into("<IH", memory, 0xB000, 0x8100, 0x08)
    emulate_segment(vcpu, VirtualSegments(), trap, context, code)
    assert trap.regs.rip == 0x8100 and trap.regs.rsp == STACK - 8
    assert struct.unpack_from("<II", memory, STACK - 8) == (RIP + len(code), 0x08)
    ret = assemble("retf", 64, 0x8100)
    trap.regs.rip = 0x8100
    emulate_segment(vcpu, VirtualSegments(), trap, context, ret)
    assert (trap.regs.rip, trap.regs.rsp, vcpu.cs) == (RIP + len(code), STACK, 0x08)


@pytest.mark.parametrize("source, rbx, message", [
    ("call fword ptr [rbx]", 0x60, "call gates and task switches are not modelled"),
    ("jmp fword ptr [rbx]", 0x18, None),  # DPL 3 code from CPL 0: #GP, not "not modelled"
    ("mov fs, ebx", 0x70, "keeps the ring-3 FS base at 0"),
])
def test_what_is_not_modelled_says_so(source, rbx, message):
    vcpu, trap, context, code, memory = machine(source, rbx=rbx if source.startswith("mov") else 0xB000)
    struct.pack_into("<IH", memory, 0xB000, 0x8100, rbx)
    if message is None:
        with pytest.raises(SegmentFault):
            emulate_segment(vcpu, VirtualSegments(), trap, context, code)
        return
    with pytest.raises(Unmodelled, match=message):
        emulate_segment(vcpu, VirtualSegments(), trap, context, code)
