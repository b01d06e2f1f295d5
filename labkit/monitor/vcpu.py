"""The virtual CPU of a deprivileged guest kernel, and how a monitor emulates and reflects for it.

A guest kernel run in ring 3 by a monitor (trap-and-emulate, binary
translation) believes it is in ring 0.  What ring 0 would own, the monitor
keeps here, in a :class:`VirtualCpu`: the virtual interrupt flag, CR0/CR2/CR3/CR4,
GDTR/IDTR/LDTR/TR, a few MSRs and the virtual interrupts waiting for the
virtual IF.  The real CPU keeps labkit's own GDT, IDT, page tables and IF = 1.

Three functions, shared by both monitors (stable interface)::

    emulate(vcpu, trap, context, code) -> str | None
        Decode the instruction at trap.regs.rip (its bytes are ``code``) with
        Capstone, carry it out on the virtual CPU and the guest's registers,
        advance trap.regs.rip past it and return its text ("mov cr3, rax").
        None when it is not an instruction this module emulates (see
        EMULATED); then nothing was changed.
    reflect(vcpu, trap, context, vector, error_code=None, *, cr2=None)
        Deliver exception/interrupt ``vector`` through the guest's *virtual*
        IDT: push SS, RSP, RFLAGS (IF = the virtual IF), CS (the virtual ring-0
        CS), RIP [, error code] on the guest's stack, as a CPU at CPL 0 would,
        and continue at the gate's handler.  Raises VirtualTripleFault when
        the virtual IDT cannot deliver it.
    deliver_pending(vcpu, trap, context) -> int | None
        Reflect the oldest pending virtual interrupt when the virtual IF is
        set; returns its vector.

Emulated instructions (EMULATED): ``cli sti hlt pushfq popfq in out mov crN
clts lgdt lidt sgdt sidt sldt str smsw lmsw invlpg rdmsr wrmsr iretq int n
int3``.  ``hlt`` only marks ``vcpu.halted`` (the monitor decides what a halt
means); ``in``/``out`` go to ``vcpu.ports`` (devices only the monitor has,
such as a virtual timer) or else to the machine's bus through
``context.pio``.  ``iretq`` returns to virtual ring 0 only (a virtual user
mode is not modelled: an ``iretq`` to RPL 3 is not emulated).

Simplifications, on purpose: guest-linear addresses are guest-physical
(labkit's identity map; the monitor does not shadow the guest's page
tables, so a ``mov cr3`` only changes the virtual CR3); FS/GS bases are
taken as 0 in memory operands; an ``sti`` makes a pending interrupt
deliverable at once (no one-instruction interrupt shadow).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Protocol

from labkit.errors import LabkitError
from labkit.x86 import layout
from labkit.x86.boot import (CR0_ET, CR0_NE, CR0_PE, CR0_PG, CR0_WP, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_PAE,
                             EFER_LMA, EFER_LME, EFER_SCE, MSR_EFER, RFLAGS_FIXED, RFLAGS_IF, RFLAGS_RF)
from labkit.x86.gdt import gdt_limit
from labkit.x86.idt import ERROR_CODE_VECTORS, idt_limit
from labkit.x86.paging import PF_USER

MASK64 = (1 << 64) - 1
CR0_TS = 1 << 3
RFLAGS_TF = 1 << 8
RFLAGS_IOPL = 3 << 12
RFLAGS_NT = 1 << 14
RFLAGS_GUEST_SETTABLE = 0x240DD5
"""CF PF AF ZF SF TF DF OF AC ID: what a popped RFLAGS may change in the real one (not IF, IOPL, NT, RF, VM)."""
"""#PF error code bit U/S: the access came from CPL 3 (SDM vol. 3, 4.7)."""

INTERRUPT_GATE = 0xE
TRAP_GATE = 0xF

EMULATED = frozenset({
    "cli", "sti", "hlt", "pushfq", "popfq", "in", "out", "mov", "clts", "lgdt", "lidt", "sgdt", "sidt",
    "sldt", "str", "smsw", "lmsw", "invlpg", "rdmsr", "wrmsr", "iretq", "int", "int3",
})
"""Mnemonics :func:`emulate` carries out (``mov`` only to or from a control register)."""

PRIVILEGED = EMULATED | frozenset({
    "insb", "insw", "insd", "outsb", "outsw", "outsd", "lldt", "ltr", "invd", "wbinvd", "wbnoinvd",
    "swapgs", "sysret", "sysretq", "sysexit", "rdpmc", "xsetbv", "invpcid", "iret", "iretd", "into",
    "hlt", "monitor", "mwait",
})
"""Instructions that trap in ring 3 because they are privileged (or sensitive and trapping):
a monitor that meets one it does not emulate must stop rather than blame the guest."""


class VirtualTripleFault(LabkitError):
    """The guest's virtual IDT cannot deliver an exception (no gate, not present, outside RAM)."""


class PortDevice(Protocol):
    """A device only the monitor has, reached by the guest's trapped ``in``/``out``."""

    def read(self, port: int, size: int) -> int: ...

    def write(self, port: int, size: int, value: int) -> None: ...


@dataclass
class VirtualCpu:
    """What the deprivileged guest kernel believes ring 0 owns; starts as labkit's 64-bit boot state."""

    interrupts_enabled: bool = False
    """The virtual RFLAGS.IF (the real IF stays 1 while the guest runs in ring 3)."""
    cr0: int = CR0_PE | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    cr2: int = 0
    cr3: int = layout.PML4_ADDRESS
    cr4: int = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    gdtr: tuple[int, int] = (layout.GDT_ADDRESS, gdt_limit())
    """(base, limit) as the guest loaded it with ``lgdt``."""
    idtr: tuple[int, int] = (layout.IDT_ADDRESS, idt_limit(64))
    ldtr: int = 0
    tr: int = layout.TSS_SELECTOR
    cs: int = layout.KERNEL_CS64
    """The code selector the guest believes it runs with (RPL 0); pushed in reflected frames."""
    ss: int = layout.KERNEL_DS
    msrs: dict[int, int] = field(default_factory=lambda: {MSR_EFER: EFER_SCE | EFER_LME | EFER_LMA})
    pending: list[int] = field(default_factory=list)
    """Vectors of virtual interrupts waiting for the virtual IF, oldest first."""
    halted: bool = False
    """Set by an emulated ``hlt``; the monitor decides whether to wake the guest or end the run."""
    ports: dict[int, PortDevice] = field(default_factory=dict, repr=False, compare=False)
    """Port -> a device only the monitor has (consulted before the machine's bus)."""
    emulated: dict[str, int] = field(default_factory=dict)
    """Emulated instructions by mnemonic."""
    reflected: dict[int, int] = field(default_factory=dict)
    """Exceptions and interrupts reflected into the virtual IDT, by vector."""

    def snapshot(self) -> "VirtualCpu":
        """A copy without the port devices (it pickles)."""
        return VirtualCpu(self.interrupts_enabled, self.cr0, self.cr2, self.cr3, self.cr4, self.gdtr, self.idtr,
                          self.ldtr, self.tr, self.cs, self.ss, dict(self.msrs), list(self.pending), self.halted,
                          {}, dict(self.emulated), dict(self.reflected))


# -- decoding ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Operand:
    """A decoded operand: ``kind`` "reg" (``reg``), "imm" (``imm``) or "mem" (``base``, ``index``,
    ``scale``, ``disp``), ``size`` in bytes."""

    kind: str
    size: int
    reg: str = ""
    imm: int = 0
    base: str = ""
    index: str = ""
    scale: int = 1
    disp: int = 0


@dataclass(frozen=True)
class Decoded:
    address: int
    length: int
    mnemonic: str
    text: str
    operands: tuple[Operand, ...]


@lru_cache(maxsize=1)
def _capstone():
    import capstone

    disassembler = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    disassembler.detail = True
    return disassembler


@lru_cache(maxsize=4096)
def decode(code: bytes, address: int) -> Decoded | None:
    """The first instruction of ``code`` (at ``address``), 64-bit mode; None when it does not decode."""
    from capstone import x86 as cx

    for insn in _capstone().disasm(code, address, 1):
        operands = []
        for op in insn.operands:
            if op.type == cx.X86_OP_REG:
                operands.append(Operand("reg", op.size, reg=insn.reg_name(op.reg)))
            elif op.type == cx.X86_OP_IMM:
                operands.append(Operand("imm", op.size, imm=op.imm))
            elif op.type == cx.X86_OP_MEM:
                mem = op.mem
                operands.append(Operand("mem", op.size, base=insn.reg_name(mem.base) if mem.base else "",
                                        index=insn.reg_name(mem.index) if mem.index else "",
                                        scale=mem.scale, disp=mem.disp))
        return Decoded(insn.address, insn.size, insn.mnemonic, f"{insn.mnemonic} {insn.op_str}".strip(),
                       tuple(operands))
    return None


# -- registers -------------------------------------------------------------------------------------

_GPR64 = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi") + tuple(f"r{n}" for n in range(8, 16))


def _register_table() -> dict[str, tuple[str, int, int]]:
    """Capstone register name -> (Regs field, size in bytes, bit shift)."""
    table = {}
    for name in _GPR64:
        table[name] = (name, 8, 0)
        if name.startswith("r") and name[1:].isdigit():
            table[name + "d"], table[name + "w"], table[name + "b"] = (name, 4, 0), (name, 2, 0), (name, 1, 0)
        else:
            short = name[1:]
            table["e" + short] = (name, 4, 0)
            table[short] = (name, 2, 0)
    for letter in "abcd":
        table[letter + "l"] = ("r" + letter + "x", 1, 0)
        table[letter + "h"] = ("r" + letter + "x", 1, 8)
    for name in ("sil", "dil", "bpl", "spl"):
        table[name] = ("r" + name[:2], 1, 0)
    return table


_REGISTERS = _register_table()


def read_register(regs, name: str) -> int:
    field_name, size, shift = _REGISTERS[name]
    return getattr(regs, field_name) >> shift & ((1 << 8 * size) - 1)


def write_register(regs, name: str, value: int) -> None:
    """Write as the CPU does: 32-bit writes zero-extend, 8/16-bit writes merge."""
    field_name, size, shift = _REGISTERS[name]
    if size == 8:
        setattr(regs, field_name, value & MASK64)
    elif size == 4:
        setattr(regs, field_name, value & 0xFFFF_FFFF)
    else:
        mask = ((1 << 8 * size) - 1) << shift
        old = getattr(regs, field_name)
        setattr(regs, field_name, (old & ~mask) | (value << shift & mask))


def effective_address(operand: Operand, regs, next_rip: int) -> int:
    """base + index * scale + disp (RIP-relative from the next instruction); FS/GS bases taken as 0."""
    address = operand.disp
    if operand.base:
        address += next_rip if operand.base == "rip" else read_register(regs, operand.base)
    if operand.index:
        address += read_register(regs, operand.index) * operand.scale
    return address & MASK64


def _read_operand(operand: Operand, regs, context, next_rip: int) -> int:
    if operand.kind == "reg":
        return read_register(regs, operand.reg)
    if operand.kind == "imm":
        return operand.imm & ((1 << 8 * operand.size) - 1)
    address = effective_address(operand, regs, next_rip)
    return int.from_bytes(context.read(address, operand.size), "little")


def _write_operand(operand: Operand, value: int, regs, context, next_rip: int) -> None:
    if operand.kind == "reg":
        write_register(regs, operand.reg, value)
    else:
        address = effective_address(operand, regs, next_rip)
        context.write(address, (value & ((1 << 8 * operand.size) - 1)).to_bytes(operand.size, "little"))


# -- the stack ------------------------------------------------------------------------------------

def _push(trap, context, values: tuple[int, ...]) -> None:
    """Push quadwords (first value pushed first) on the guest stack."""
    rsp = trap.regs.rsp
    for value in values:
        rsp = (rsp - 8) & MASK64
        context.write(rsp, struct.pack("<Q", value & MASK64))
    trap.regs.rsp = rsp


def _pop(trap, context, count: int) -> tuple[int, ...]:
    values = struct.unpack(f"<{count}Q", context.read(trap.regs.rsp, 8 * count))
    trap.regs.rsp = (trap.regs.rsp + 8 * count) & MASK64
    return values


def virtual_rflags(vcpu: VirtualCpu, rflags: int) -> int:
    """RFLAGS as the guest kernel should see it: the real arithmetic flags, the virtual IF, IOPL 0."""
    flags = rflags & ~(RFLAGS_IF | RFLAGS_IOPL) | RFLAGS_FIXED
    return flags | RFLAGS_IF if vcpu.interrupts_enabled else flags


def _load_rflags(vcpu: VirtualCpu, trap, value: int) -> None:
    """Take IF into the virtual CPU; the real RFLAGS keeps IF = 1 and IOPL 0 so ring 3 stays contained."""
    vcpu.interrupts_enabled = bool(value & RFLAGS_IF)
    trap.regs.rflags = value & RFLAGS_GUEST_SETTABLE | RFLAGS_IF | RFLAGS_FIXED


# -- emulate ------------------------------------------------------------------------------------

CONTROL_REGISTERS = ("cr0", "cr2", "cr3", "cr4")


def emulate(vcpu: VirtualCpu, trap, context, code: bytes) -> str | None:
    """Carry out the privileged instruction at ``trap.regs.rip`` on the virtual CPU (see the module docstring).

    ``code`` holds its bytes (up to 15).  Advances ``trap.regs.rip`` past it and
    returns its text; None (nothing changed) when it is not emulated.
    """
    decoded = decode(bytes(code[:15]), trap.regs.rip)
    if decoded is None or decoded.mnemonic not in EMULATED:
        return None
    regs = trap.regs
    next_rip = (regs.rip + decoded.length) & MASK64
    handler = _HANDLERS[decoded.mnemonic]
    done = handler(vcpu, trap, context, decoded, next_rip)
    if done is False:
        return None
    if done is not _RIP_SET:
        regs.rip = next_rip
    vcpu.emulated[decoded.mnemonic] = vcpu.emulated.get(decoded.mnemonic, 0) + 1
    return decoded.text


_RIP_SET = object()
"""A handler's answer when it moved RIP itself (iretq, int n)."""


def _cli(vcpu, trap, context, decoded, next_rip):
    vcpu.interrupts_enabled = False


def _sti(vcpu, trap, context, decoded, next_rip):
    vcpu.interrupts_enabled = True


def _hlt(vcpu, trap, context, decoded, next_rip):
    vcpu.halted = True


def _pushfq(vcpu, trap, context, decoded, next_rip):
    _push(trap, context, (virtual_rflags(vcpu, trap.regs.rflags),))


def _popfq(vcpu, trap, context, decoded, next_rip):
    value, = _pop(trap, context, 1)
    _load_rflags(vcpu, trap, value)


def _port_io(vcpu, trap, context, decoded, next_rip):
    operands = decoded.operands
    if len(operands) != 2:
        return False
    if decoded.mnemonic == "in":
        data, port_operand = operands
    else:
        port_operand, data = operands
    if data.kind != "reg":
        return False
    port = _read_operand(port_operand, trap.regs, context, next_rip) & 0xFFFF
    size = data.size
    device = vcpu.ports.get(port)
    if decoded.mnemonic == "in":
        value = device.read(port, size) if device is not None else context.pio(port, size, False)
        write_register(trap.regs, data.reg, value & ((1 << 8 * size) - 1))
    else:
        value = read_register(trap.regs, data.reg)
        if device is not None:
            device.write(port, size, value)
        else:
            context.pio(port, size, True, value)


def _mov(vcpu, trap, context, decoded, next_rip):
    if len(decoded.operands) != 2 or any(op.kind != "reg" for op in decoded.operands):
        return False
    target, source = decoded.operands
    if target.reg in CONTROL_REGISTERS:
        setattr(vcpu, target.reg, read_register(trap.regs, source.reg))
    elif source.reg in CONTROL_REGISTERS:
        write_register(trap.regs, target.reg, getattr(vcpu, source.reg))
    else:
        return False  # mov to/from cr8 or a debug register: not emulated


def _clts(vcpu, trap, context, decoded, next_rip):
    vcpu.cr0 &= ~CR0_TS


def _descriptor_table(vcpu, trap, context, decoded, next_rip):
    operand, = decoded.operands
    if operand.kind != "mem":
        return False
    address = effective_address(operand, trap.regs, next_rip)
    name = "gdtr" if decoded.mnemonic[1:] == "gdt" else "idtr"
    if decoded.mnemonic[0] == "l":
        limit, base = struct.unpack("<HQ", context.read(address, 10))
        setattr(vcpu, name, (base, limit))
    else:
        base, limit = getattr(vcpu, name)
        context.write(address, struct.pack("<HQ", limit, base))


def _store_selector(vcpu, trap, context, decoded, next_rip):
    operand, = decoded.operands
    value = {"sldt": vcpu.ldtr, "str": vcpu.tr, "smsw": vcpu.cr0}[decoded.mnemonic]
    if operand.kind == "mem":
        value &= 0xFFFF
    _write_operand(operand, value, trap.regs, context, next_rip)


def _lmsw(vcpu, trap, context, decoded, next_rip):
    operand, = decoded.operands
    value = _read_operand(operand, trap.regs, context, next_rip)
    vcpu.cr0 = vcpu.cr0 & ~0xE | value & 0xF | vcpu.cr0 & 1  # LMSW cannot clear PE


def _invlpg(vcpu, trap, context, decoded, next_rip):
    pass  # no shadow page tables: nothing cached to drop


def _rdmsr(vcpu, trap, context, decoded, next_rip):
    index = trap.regs.rcx & 0xFFFF_FFFF
    if index not in vcpu.msrs:
        return False
    value = vcpu.msrs[index]
    trap.regs.rax, trap.regs.rdx = value & 0xFFFF_FFFF, value >> 32 & 0xFFFF_FFFF


def _wrmsr(vcpu, trap, context, decoded, next_rip):
    index = trap.regs.rcx & 0xFFFF_FFFF
    vcpu.msrs[index] = (trap.regs.rdx & 0xFFFF_FFFF) << 32 | trap.regs.rax & 0xFFFF_FFFF


def _iretq(vcpu, trap, context, decoded, next_rip):
    rip, cs, rflags, rsp, ss = struct.unpack("<5Q", context.read(trap.regs.rsp, 40))
    if cs & 3:
        return False  # a return to virtual user mode is not modelled
    vcpu.cs, vcpu.ss = cs & 0xFFFF, ss & 0xFFFF
    trap.regs.rip, trap.regs.rsp = rip, rsp
    _load_rflags(vcpu, trap, rflags)
    return _RIP_SET


def _int(vcpu, trap, context, decoded, next_rip):
    vector = 3 if decoded.mnemonic == "int3" else decoded.operands[0].imm & 0xFF
    trap.regs.rip = next_rip
    reflect(vcpu, trap, context, vector)
    return _RIP_SET


_HANDLERS: dict[str, Callable] = {
    "cli": _cli, "sti": _sti, "hlt": _hlt, "pushfq": _pushfq, "popfq": _popfq, "in": _port_io, "out": _port_io,
    "mov": _mov, "clts": _clts, "lgdt": _descriptor_table, "lidt": _descriptor_table,
    "sgdt": _descriptor_table, "sidt": _descriptor_table, "sldt": _store_selector, "str": _store_selector,
    "smsw": _store_selector, "lmsw": _lmsw, "invlpg": _invlpg, "rdmsr": _rdmsr, "wrmsr": _wrmsr,
    "iretq": _iretq, "int": _int, "int3": _int,
}


# -- reflect ------------------------------------------------------------------------------------

def reflect(vcpu: VirtualCpu, trap, context, vector: int, error_code: int | None = None, *,
            cr2: int | None = None) -> None:
    """Deliver ``vector`` through the guest's virtual IDT, as a CPU at virtual CPL 0 would (64-bit gates).

    The frame goes on the guest's current stack, aligned down to 16 bytes: SS,
    RSP, RFLAGS (with the virtual IF), the virtual CS, RIP (``trap.regs.rip``:
    the faulting instruction, or the next one for ``int n``), then the error code
    if given.  An interrupt gate clears the virtual IF.  For #PF, ``cr2`` (default
    ``trap.cr2``) goes to the virtual CR2.  Raises :class:`VirtualTripleFault`
    when the gate is missing, not present, or outside guest RAM.
    """
    if not 0 <= vector <= 255:
        raise VirtualTripleFault(f"vector {vector} is not 0..255")
    base, limit = vcpu.idtr
    if 16 * vector + 15 > limit:
        raise VirtualTripleFault(f"vector {vector:#x} lies beyond the virtual IDT's limit {limit:#x}")
    try:
        low, high = struct.unpack("<QQ", context.read(base + 16 * vector, 16))
    except LabkitError:
        raise VirtualTripleFault(f"the virtual IDT gate {vector:#x} at {base + 16 * vector:#x} is outside guest RAM") from None
    gate_type, present = low >> 40 & 0xF, low >> 47 & 1
    if not present or gate_type not in (INTERRUPT_GATE, TRAP_GATE):
        raise VirtualTripleFault(f"the virtual IDT has no present interrupt or trap gate for vector {vector:#x}")
    offset = (low & 0xFFFF) | (low >> 48 & 0xFFFF) << 16 | (high & 0xFFFF_FFFF) << 32
    selector = low >> 16 & 0xFFFF
    if vector == 14:
        vcpu.cr2 = trap.cr2 if cr2 is None else cr2
    regs = trap.regs
    old_rsp = regs.rsp
    regs.rsp = old_rsp & ~0xF
    frame = (vcpu.ss, old_rsp, virtual_rflags(vcpu, regs.rflags), vcpu.cs, regs.rip)
    if error_code is not None:
        frame += (error_code,)
    try:
        _push(trap, context, frame)
    except LabkitError:
        raise VirtualTripleFault(f"the guest's stack at {old_rsp:#x} is outside guest RAM") from None
    vcpu.cs = selector & ~3
    if gate_type == INTERRUPT_GATE:
        vcpu.interrupts_enabled = False
    regs.rip = offset
    regs.rflags &= ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF)
    vcpu.halted = False
    vcpu.reflected[vector] = vcpu.reflected.get(vector, 0) + 1


def deliver_pending(vcpu: VirtualCpu, trap, context) -> int | None:
    """Reflect the oldest pending virtual interrupt if the virtual IF allows; its vector, else None."""
    if not vcpu.interrupts_enabled or not vcpu.pending:
        return None
    vector = vcpu.pending.pop(0)
    reflect(vcpu, trap, context, vector)
    return vector


LETS_INTERRUPTS_IN = frozenset({"sti", "popfq", "iretq", "hlt"})
"""Emulated instructions after which a pending virtual interrupt may be delivered."""


def after_emulation(vcpu: VirtualCpu, trap, context, mnemonic: str) -> tuple[int | None, str | None]:
    """What follows an emulated instruction, for every monitor alike.

    After ``sti``, ``popfq``, ``iretq`` or ``hlt`` the oldest pending virtual
    interrupt is delivered if the virtual IF allows.  Returns the delivered
    vector (or None) and, for a ``hlt`` nothing can ever wake, why the run ends.
    """
    delivered = deliver_pending(vcpu, trap, context) if mnemonic in LETS_INTERRUPTS_IN else None
    if mnemonic != "hlt" or delivered is not None:
        return delivered, None
    if vcpu.pending:
        return None, f"hlt with the virtual IF clear: pending virtual interrupt(s) {vcpu.pending} can never arrive"
    return None, "hlt emulated: no virtual interrupt can wake the kernel"


def has_error_code(vector: int) -> bool:
    """Whether the CPU pushes an error code for exception ``vector`` (SDM vol. 3, table 6-1)."""
    return vector in ERROR_CODE_VECTORS
