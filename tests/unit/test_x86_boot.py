"""boot_state: the hand-encoded stubs disassemble to their comments, and the state is a valid VM entry."""

from __future__ import annotations

import re
import struct

import capstone
import pytest

from labkit.errors import ConfigError
from labkit.memory import GuestMemory
from labkit.x86 import boot, gdt, idt, layout, paging

pytestmark = pytest.mark.unit

_CS_MODES = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}
_REGISTER_WIDTH = {16: "ax", 32: "eax", 64: "rax"}


def _numbers_as_ints(text: str) -> str:
    """Capstone writes small immediates in decimal, larger ones in hex: compare values."""
    return re.sub(r"\b(0x[0-9a-f]+|[0-9]+)\b", lambda m: str(int(m.group(0), 0)), text)


def _check_listing(listing: boot.Listing, mode: int, base: int = 0) -> None:
    """Each line disassembles (Capstone) to its comment; branch targets hit their labels."""
    disassembler = capstone.Cs(capstone.CS_ARCH_X86, _CS_MODES[mode])
    labels = listing.labels()
    offset = 0
    for encoded, text in listing.lines:
        if not encoded:
            continue
        instructions = list(disassembler.disasm(encoded, base + offset))
        assert len(instructions) == 1 and instructions[0].size == len(encoded), text
        instruction = instructions[0]
        mnemonic, _, operand = text.partition(" ")
        if mode != 64:  # the stubs are written once, with 64-bit names
            operand = operand.replace("rax", _REGISTER_WIDTH[mode])
        assert instruction.mnemonic == mnemonic, text
        if operand.startswith("."):
            assert int(instruction.op_str, 16) == base + labels[operand], text
        else:
            assert _numbers_as_ints(instruction.op_str) == _numbers_as_ints(operand), text
        offset += len(encoded)


@pytest.mark.parametrize("mode", [16, 32, 64])
@pytest.mark.parametrize("vector", [0, 6, 13, 14, 0x80, 255])
def test_fault_stub_disassembles_to_its_comment(mode, vector):
    stub = boot.fault_stub(vector)
    assert len(stub.code) == boot.FAULT_STUB_SIZE
    _check_listing(stub, mode, boot.fault_stub_address(vector))


def test_kernel_services_disassemble_to_their_comments():
    _check_listing(boot.SERVICE64, 64, boot.SERVICE_ADDRESS)
    _check_listing(boot.SERVICE32, 32, boot.SERVICE_ADDRESS)
    _check_listing(boot.TRAMPOLINE64, 64)
    _check_listing(boot.TRAMPOLINE32, 32)


def _image(state: boot.BootState, size: int = 0x80000) -> bytearray:
    ram = bytearray(size)
    for address, data in state.memory:
        assert 0 <= address and address + len(data) <= size
        ram[address:address + len(data)] = data
    return ram


def _regions_do_not_overlap(state: boot.BootState) -> None:
    spans = sorted((address, address + len(data)) for address, data in state.memory)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start, spans


STATES = [(16, False), (32, False), (32, True), (64, False), (64, True)]


@pytest.mark.parametrize("mode,user", STATES)
def test_boot_area_and_regions(mode, user):
    state = boot.boot_state(mode, layout.LOAD_ADDRESS, layout.DEFAULT_MEMORY, user=user)
    _regions_do_not_overlap(state)
    for address, data in state.memory:
        if layout.BOOT_AREA <= address < boot.BOOT_AREA_END:
            assert address + len(data) <= boot.BOOT_AREA_END
        assert address + len(data) <= layout.LOAD_ADDRESS or address >= layout.KERNEL_STACK_TOP - 0x100


@pytest.mark.parametrize("mode,user", STATES)
def test_hidden_segment_parts_match_the_gdt(mode, user):
    state = boot.boot_state(mode, layout.LOAD_ADDRESS, layout.DEFAULT_MEMORY, user=user)
    ram = _image(state)
    sregs = state.sregs
    assert (sregs.gdt.base, sregs.gdt.limit) == (layout.GDT_ADDRESS, layout.GDT_ENTRIES * 8 - 1)
    tr = gdt.decode_system_descriptor64(ram[layout.GDT_ADDRESS + layout.TSS_SELECTOR:][:16], layout.TSS_SELECTOR)
    assert tr == sregs.tr
    if mode == 16:
        return
    for name in ("cs", "ss", "ds", "es", "fs", "gs"):
        segment = getattr(sregs, name)
        raw = ram[layout.GDT_ADDRESS + (segment.selector & ~7):][:8]
        assert gdt.decode_descriptor(raw, segment.selector) == segment, name


@pytest.mark.parametrize("mode,user", STATES)
def test_state_passes_vm_entry_checks(mode, user):
    """The checks of SDM vol. 3, 27.3.1 that a boot state can get wrong."""
    state = boot.boot_state(mode, layout.LOAD_ADDRESS, layout.DEFAULT_MEMORY, user=user)
    s = state.sregs
    assert s.cs.type in (0x9, 0xB, 0xD, 0xF) and s.cs.s == 1 and s.cs.present == 1
    assert s.ss.type in (0x3, 0x7) and s.ss.dpl == s.cs.dpl == 0
    for segment in (s.ds, s.es, s.fs, s.gs):
        assert segment.type & 1 and segment.present and not segment.unusable  # accessed, usable
    assert s.tr.type == 0xB and s.tr.s == 0 and s.tr.present and not s.tr.unusable
    assert s.ldt.unusable == 1
    for segment in (s.cs, s.ss, s.ds, s.es, s.fs, s.gs, s.tr):
        if segment.g:
            assert segment.limit & 0xFFF == 0xFFF
        else:
            assert segment.limit <= 0xFFFFF
    assert state.regs.rflags & 0x2
    if mode == 64:
        assert s.cr0 & boot.CR0_PG and s.cr0 & boot.CR0_PE and s.cr4 & boot.CR4_PAE
        assert s.efer & boot.EFER_LME and s.efer & boot.EFER_LMA
        assert s.cs.l == 1 and s.cs.db == 0 and s.cr3 == layout.PML4_ADDRESS
        assert state.msrs[boot.MSR_EFER] == s.efer
    elif mode == 32:
        assert s.cr0 & boot.CR0_PE and not s.cr0 & boot.CR0_PG and s.cs.db == 1 and s.efer == 0
    else:
        assert not s.cr0 & boot.CR0_PE and s.cs.base == s.cs.selector << 4 == 0


@pytest.mark.parametrize("mode", [32, 64])
def test_every_idt_gate_points_at_its_stub(mode):
    state = boot.boot_state(mode, layout.LOAD_ADDRESS, layout.DEFAULT_MEMORY)
    ram = _image(state)
    size = 16 if mode == 64 else 8
    decode = idt.decode_gate64 if mode == 64 else idt.decode_gate32
    assert state.sregs.idt.limit == 256 * size - 1
    for vector in range(256):
        gate = decode(ram[layout.IDT_ADDRESS + vector * size:][:size])
        assert gate.selector == state.sregs.cs.selector and gate.present
        assert gate.dpl == (3 if vector in (3, 4) else 0)  # int3 and the int 4 service
        if vector == boot.KERNEL_SERVICE_VECTOR:
            assert gate.offset == boot.service_entry(mode)
        else:
            assert gate.offset == boot.fault_stub_address(vector)
            assert ram[gate.offset:gate.offset + 8] == boot.fault_stub(vector).code


def test_real_mode_ivt_and_stack():
    state = boot.boot_state(16, 0x8000, layout.DEFAULT_MEMORY)
    ram = _image(state)
    for vector in (0, 6, 0x10, 255):
        assert idt.decode_ivt_entry(ram[vector * 4:vector * 4 + 4]) == (0, boot.fault_stub_address(vector))
    assert (state.sregs.idt.base, state.sregs.idt.limit) == (0, 0x3FF)
    ss = state.sregs.ss
    assert ss.base == ss.selector << 4
    assert ss.base + state.regs.rsp == layout.STACK_TOP - 2 and state.regs.rsp <= 0xFFFF
    low = boot.boot_state(16, 0x8000, layout.DEFAULT_MEMORY, stack_top=0xF000)
    assert (low.sregs.ss.selector, low.regs.rsp) == (0, 0xEFFE)
    assert (state.regs.rip, state.sregs.cs.selector) == (0x8000, 0)


def test_user_trampoline_64_iretq_frame():
    state = boot.boot_state(64, 0x9000, layout.DEFAULT_MEMORY, user=True, stack_top=0x60000)
    ram = _image(state)
    assert state.regs.rip == boot.USER_TRAMPOLINE
    frame = struct.unpack_from("<5Q", ram, state.regs.rsp)
    assert frame == (0x9000, layout.USER_CS64, 0x202, 0x60000, layout.USER_DS)
    assert state.regs.rsp + 5 * 8 == layout.KERNEL_STACK_TOP
    assert state.sregs.ds.selector == layout.USER_DS  # kept by the iretq
    assert ram[boot.USER_TRAMPOLINE:][:2] == boot.TRAMPOLINE64.code


def test_user_trampoline_32_sysexit():
    state = boot.boot_state(32, 0x9000, layout.DEFAULT_MEMORY, user=True, stack_top=0x60000)
    ram = _image(state)
    assert state.regs.rip == boot.USER_TRAMPOLINE
    assert ram[boot.USER_TRAMPOLINE:][:2] == boot.TRAMPOLINE32.code == b"\x0f\x35"
    assert (state.regs.rdx, state.regs.rcx) == (0x9000, 0x60000)  # SYSEXIT: EIP = EDX, ESP = ECX
    sysenter_cs = state.msrs[boot.MSR_SYSENTER_CS]
    assert (sysenter_cs + 16) | 3 == layout.USER_CS32 and (sysenter_cs + 24) | 3 == layout.USER_DS
    assert state.sregs.ds.selector == layout.USER_DS


def test_long_mode_msrs_and_identity_map():
    state = boot.boot_state(64, layout.LOAD_ADDRESS, layout.DEFAULT_MEMORY)
    star = state.msrs[boot.MSR_STAR]
    assert (star >> 32) & 0xFFFF == layout.KERNEL_CS64
    assert (star >> 48) + 16 | 3 == layout.USER_CS64 and (star >> 48) + 8 | 3 == layout.USER_DS
    assert state.msrs[boot.MSR_LSTAR] == boot.service_entry(64, "syscall")
    ram = _image(state)
    assert paging.translate(GuestMemory([(0, memoryview(ram), False)]), 0x8000, cr3=state.sregs.cr3).physical == 0x8000


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mode=8, entry=0x8000, memory_size=2 << 20),
        dict(mode=16, entry=0x8000, memory_size=2 << 20, user=True),
        dict(mode=64, entry=0x100, memory_size=2 << 20),
        dict(mode=64, entry=0x8000, memory_size=1000),
        dict(mode=64, entry=0x300000, memory_size=2 << 20),
        dict(mode=16, entry=0x18000, memory_size=2 << 20),
        dict(mode=64, entry=0x8000, memory_size=2 << 20, stack_top=0x80008),
        dict(mode=64, entry=0x8000, memory_size=2 << 20, stack_top=0x400000),
    ],
)
def test_bad_boot_arguments(kwargs):
    with pytest.raises(ConfigError):
        boot.boot_state(**kwargs)


class LoadTarget:
    """Records what load_boot_state does to a backend: RAM writes land in ``memory``, register loads in ``calls``."""

    def __init__(self, size: int):
        self.memory = memoryview(bytearray(size))
        self.calls: list[tuple[str, object]] = []

    def set_regs(self, regs):
        self.calls.append(("set_regs", regs))

    def set_sregs(self, sregs):
        self.calls.append(("set_sregs", sregs))

    def set_msrs(self, msrs):
        self.calls.append(("set_msrs", dict(msrs)))


@pytest.mark.parametrize("mode", [16, 32, 64])
def test_load_boot_state_writes_the_tables_the_code_and_the_registers(mode):
    size = 2 << 20
    state = boot.boot_state(mode, layout.LOAD_ADDRESS, size)
    target = LoadTarget(size)
    code = b"\x90\x90\xf4"
    boot.load_boot_state(target, state, code)
    for address, data in state.memory:
        assert bytes(target.memory[address:address + len(data)]) == data
    assert bytes(target.memory[layout.LOAD_ADDRESS:layout.LOAD_ADDRESS + 3]) == code
    assert [name for name, _ in target.calls] == ["set_sregs", "set_msrs", "set_regs"]
    assert target.calls[0][1] is state.sregs and target.calls[2][1] is state.regs
    assert target.calls[1][1] == state.msrs


def test_load_boot_state_puts_code_at_its_load_address_and_refuses_what_does_not_fit():
    size = 1 << 20
    state = boot.boot_state(64, layout.LOAD_ADDRESS + 0x10, size)
    target = LoadTarget(size)
    boot.load_boot_state(target, state, b"\xeb\x0e" + bytes(14) + b"\xf4", layout.LOAD_ADDRESS)
    assert target.memory[layout.LOAD_ADDRESS] == 0xEB and target.memory[layout.LOAD_ADDRESS + 0x10] == 0xF4
    untouched = LoadTarget(size)
    with pytest.raises(ConfigError, match=r"guest 'big' ends at 0x108000, beyond guest RAM \(0x100000 bytes\)"):
        boot.load_boot_state(untouched, state, bytes(size), layout.LOAD_ADDRESS, name="guest 'big'")
    assert untouched.calls == [] and not any(untouched.memory)


@pytest.mark.parametrize("memory, message", [
    (2 << 20, None),
    (layout.MIN_MEMORY, None),
    (layout.MAX_MEMORY, None),
    ((2 << 20) + 100, "memory must be a multiple of the 4 KiB page size; 2097252 bytes is not (try 2097152)"),
    (4096, "memory must be between 1 MiB and 1024 MiB; got 4096 bytes"),
    (layout.MAX_MEMORY + 4096, "memory must be between 1 MiB and 1024 MiB; got 1073745920 bytes"),
    ("2M", "memory must be a whole number of bytes, not '2M'"),
    (True, "memory must be a whole number of bytes, not True"),
])
def test_one_memory_size_check_and_the_boot_state_uses_it(memory, message):
    """layout.check_memory_size is the one check (Machine and both backends call it); boot_state too."""
    if message is None:
        assert layout.check_memory_size(memory) == memory
        assert boot.boot_state(64, layout.LOAD_ADDRESS, memory).regs.rip == layout.LOAD_ADDRESS
        return
    with pytest.raises(ConfigError) as raised:
        layout.check_memory_size(memory)
    assert str(raised.value) == message
    if isinstance(memory, int) and not isinstance(memory, bool):
        with pytest.raises(ConfigError) as from_boot:
            boot.boot_state(64, layout.LOAD_ADDRESS, memory)
        assert str(from_boot.value) == message
