"""Segment instructions of a deprivileged kernel, answered from its own descriptor tables at virtual CPL 0.

In ring 3 a kernel's segment instructions reveal where it really runs: ``mov
eax, cs`` gives the ring-3 selector (0x2b under the emulator, the host's 0x33
under PVM), ``lar``/``lsl``/``verr``/``verw`` check the selector against the
*real* GDT at CPL 3 (under PVM: the host's), and loads of the kernel's DPL-0
selectors (``mov ds, ax``, ``pop fs``, a far ``jmp``/``call``/``retf``) raise
#GP.  None of them traps reliably (Robin & Irvine 2000), so binary
translation replaces each by a monitor entry, and :func:`emulate_segment`
carries it out as the CPU would at CPL 0 with the kernel's GDTR and LDTR
(:class:`~labkit.monitor.vcpu.VirtualCpu`) and its virtual selectors
(:class:`VirtualSegments`):

=========================  ======================================================================
instruction                what the kernel gets (Intel SDM vol. 2A/2B, instruction pages)
=========================  ======================================================================
``mov r/m, sreg``          the virtual selector (a 32/64-bit register: zero-extended; memory: 16 bits)
``push fs``/``push gs``    the virtual selector, pushed zero-extended (8 bytes; 2 with 0x66)
``mov sreg, r/m``,         the checks of a load at CPL 0 (SDM vol. 2A MOV, POP; vol. 3A 5.10):
``pop fs``/``pop gs``,     #GP(selector), #NP/#SS(selector), #GP(0) for a null SS with RPL != 0;
``lfs``/``lgs``/``lss``    (the far pointer's offset goes to the register, as LDS/LES/LFS/LGS/LSS do);
                           ``mov cs, ...`` is #UD; the descriptor's accessed bit is set as the CPU does
``lar`` / ``lsl``          ZF = 1 and the access rights (masked by 00FxFF00H, bits 19:16 as 0) or
                           the byte-granular limit, when the selector's descriptor is valid for the
                           instruction (IA-32e table: LAR 9, B, C; LSL 2, 9, B; every code or data
                           segment) and visible (conforming code, or max(CPL, RPL) <= DPL);
                           else ZF = 0 and the destination is unchanged
``verr`` / ``verw``        ZF = 1 for a readable (writable) segment visible at CPL 0 and the RPL
``lcall``/``ljmp`` m16:x,  a transfer to a 64-bit code segment of the kernel's GDT at the same
``retf``/``retfq``         privilege (CS is pushed and popped as the operand size says)
=========================  ======================================================================

Where the emulator's CPU (QEMU/Unicorn) departs from the SDM, the monitor follows the SDM: QEMU's LAR
accepts an LDT descriptor and 16-bit system types that the IA-32e table rejects.

Not modelled, on purpose (the run stops with :class:`Unmodelled` naming the
instruction rather than giving a wrong answer): far transfers through call
gates or into compatibility mode, a far return to an outer ring (virtual user
mode is not modelled, as for ``iretq``), and FS/GS loads whose descriptor has a
non-zero base (the ring-3 FS/GS base the translated code uses stays 0).  In
64-bit mode DS, ES and SS bases are ignored (SDM vol. 3A 3.4.4), so a virtual
selector is all a load of them changes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from labkit.errors import LabkitError
from labkit.monitor.vcpu import MASK64, Decoded, Operand, decode, effective_address, read_register, write_register
from labkit.x86 import layout
from labkit.x86.arch import RFLAGS_ZF, SELECTOR_RPL, SELECTOR_TI, Vector
from labkit.x86.gdt import decode_descriptor
from labkit.x86.state import Regs

if TYPE_CHECKING:
    from labkit.monitor.vcpu import VirtualCpu
    from labkit.vmm.forwarding import GuestContext, Trap

SEGMENT_REGISTERS = ("es", "cs", "ss", "ds", "fs", "gs")
SEGMENT_MNEMONICS = frozenset({"lar", "lsl", "verr", "verw", "lcall", "ljmp", "retf", "retfq", "lfs", "lgs", "lss"})
"""Mnemonics :func:`emulate_segment` handles besides ``mov``/``push``/``pop`` of a segment register."""

LAR_SYSTEM_TYPES = frozenset({0x9, 0xB, 0xC})
"""System descriptor types LAR accepts in IA-32e mode: 64-bit TSS (available, busy), 64-bit call gate."""
LSL_SYSTEM_TYPES = frozenset({0x2, 0x9, 0xB})
"""System descriptor types LSL accepts in IA-32e mode: LDT, 64-bit TSS (available, busy)."""
ACCESS_RIGHTS_MASK = 0x00F0FF00
"""LAR's mask 00FxFF00H with the undefined bits 19:16 returned as 0 (as QEMU/Unicorn do)."""

_TYPE_CODE, _TYPE_CONFORMING, _TYPE_READABLE_OR_WRITABLE, _TYPE_ACCESSED = 0x8, 0x4, 0x2, 0x1


class SegmentFault(Exception):
    """The instruction raises ``vector`` (with ``error_code``) at CPL 0; the monitor reflects it."""

    def __init__(self, vector: int, error_code: int | None = None):
        super().__init__(vector, error_code)
        self.vector = vector
        self.error_code = error_code


class Unmodelled(LabkitError):
    """A segment operation binary translation does not model (a call gate, virtual user mode, ...)."""


@dataclass
class VirtualSegments:
    """The data-segment selectors the kernel believes it loaded (CS and SS live in the VirtualCpu)."""

    ds: int = layout.KERNEL_DS
    es: int = layout.KERNEL_DS
    fs: int = layout.KERNEL_DS
    gs: int = layout.KERNEL_DS

    def read(self, vcpu: VirtualCpu, name: str) -> int:
        return int(getattr(vcpu if name in ("cs", "ss") else self, name))

    def write(self, vcpu: VirtualCpu, name: str, selector: int) -> None:
        setattr(vcpu if name in ("cs", "ss") else self, name, selector & 0xFFFF)


@dataclass(frozen=True)
class Descriptor:
    """A descriptor of the kernel's GDT or LDT: where it is and its two doublewords (the high one holds the rights)."""

    address: int
    low: int
    high: int

    @property
    def system(self) -> bool:
        return not self.high >> 12 & 1

    @property
    def type(self) -> int:
        return self.high >> 8 & 0xF

    @property
    def dpl(self) -> int:
        return self.high >> 13 & 3

    @property
    def present(self) -> bool:
        return bool(self.high >> 15 & 1)

    @property
    def code(self) -> bool:
        return not self.system and bool(self.type & _TYPE_CODE)

    @property
    def conforming_code(self) -> bool:
        return self.code and bool(self.type & _TYPE_CONFORMING)

    @property
    def readable(self) -> bool:
        return not self.system and (not self.code or bool(self.type & _TYPE_READABLE_OR_WRITABLE))

    @property
    def writable_data(self) -> bool:
        return not self.system and not self.code and bool(self.type & _TYPE_READABLE_OR_WRITABLE)

    @property
    def limit(self) -> int:
        """The byte-granular limit (SDM vol. 2A LSL)."""
        return decode_descriptor(struct.pack("<II", self.low, self.high)).limit

    @property
    def base(self) -> int:
        return decode_descriptor(struct.pack("<II", self.low, self.high)).base

    @property
    def long_code(self) -> bool:
        return self.code and bool(self.high >> 21 & 1) and not self.high >> 22 & 1


def read_descriptor(vcpu: VirtualCpu, context: GuestContext, selector: int, *, size: int = 8) -> Descriptor | None:
    """The descriptor ``selector`` names in the kernel's GDT (or LDT, TI = 1); None beyond the table's limit.

    ``size`` 16 asks that a long-mode system descriptor's 16 bytes lie within the limit.
    """
    index = selector & ~(SELECTOR_RPL | SELECTOR_TI) & 0xFFFF
    if selector & SELECTOR_TI:
        if vcpu.ldtr & ~SELECTOR_RPL & 0xFFFF == 0:
            return None  # no LDT: every LDT selector lies beyond its (zero) limit
        ldt = read_descriptor(vcpu, context, vcpu.ldtr & ~SELECTOR_TI, size=16)
        if ldt is None or not ldt.system or ldt.type != 0x2:
            return None
        upper = struct.unpack("<I", context.read(ldt.address + 8, 4))[0]
        base, limit = ldt.base | upper << 32, ldt.limit
    else:
        base, limit = vcpu.gdtr
    if index + size - 1 > limit:
        return None
    try:
        low, high = struct.unpack("<II", context.read((base + index) & MASK64, 8))
    except LabkitError:
        return None
    return Descriptor((base + index) & MASK64, low, high)


# -- LAR, LSL, VERR, VERW --------------------------------------------------------------------------

def access_check(mnemonic: str, selector: int, vcpu: VirtualCpu, context: GuestContext) -> Descriptor | None:
    """The descriptor if ``lar``/``lsl``/``verr``/``verw`` of ``selector`` sets ZF at the virtual CPL; else None."""
    cpl, rpl = vcpu.cs & SELECTOR_RPL, selector & SELECTOR_RPL
    if selector & ~SELECTOR_RPL & 0xFFFF == 0:
        return None  # null selector
    descriptor = read_descriptor(vcpu, context, selector)
    if descriptor is None:
        return None
    if descriptor.system:
        valid = LAR_SYSTEM_TYPES if mnemonic == "lar" else LSL_SYSTEM_TYPES if mnemonic == "lsl" else frozenset()
        if descriptor.type not in valid or read_descriptor(vcpu, context, selector, size=16) is None:
            return None
    elif mnemonic == "verr" and not descriptor.readable:
        return None
    elif mnemonic == "verw" and not descriptor.writable_data:
        return None
    if not descriptor.conforming_code and (cpl > descriptor.dpl or rpl > descriptor.dpl):
        return None
    return descriptor


# -- the emulation ----------------------------------------------------------------------------------

def segment_operation(code: bytes, address: int) -> str | None:
    """What kind of segment instruction the bytes at ``address`` are, or None.

    ``"mov sreg"`` (either direction), ``"push sreg"``, ``"pop sreg"``, ``"lcall"``, ``"ljmp"``,
    ``"retf"``, ``"lar"``, ``"lsl"``, ``"verr"``, ``"verw"``, ``"lfs"``, ``"lgs"``, ``"lss"``.  Capstone calls the far forms of
    ``FF /3`` and ``FF /5`` without REX.W plain ``call``/``jmp ptr``: they are told by the ModRM byte.
    """
    decoded = decode(bytes(code[:15]), address)
    if decoded is None:
        return None
    name = decoded.mnemonic
    if name in ("mov", "push", "pop") and any(op.kind == "reg" and op.reg in SEGMENT_REGISTERS
                                               for op in decoded.operands):
        return f"{name} sreg"
    far = _far_indirect(code)
    if far is not None:
        return far
    if name == "retfq":
        return "retf"
    return name if name in SEGMENT_MNEMONICS else None


def _far_indirect(code: bytes) -> str | None:
    """``"lcall"``/``"ljmp"`` for FF /3 and FF /5 with a memory operand (after legacy and REX prefixes)."""
    at = 0
    while at < len(code) and code[at] in (0x66, 0x67, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0xF2, 0xF3):
        at += 1
    if at < len(code) and 0x40 <= code[at] <= 0x4F:
        at += 1
    if at + 1 >= len(code) or code[at] != 0xFF:
        return None
    modrm = code[at + 1]
    reg = modrm >> 3 & 7
    if modrm >> 6 == 3 or reg not in (3, 5):
        return None
    return "lcall" if reg == 3 else "ljmp"


def _operand_bytes(code: bytes) -> int:
    """Operand size of a far transfer or segment push/pop in 64-bit mode: 8 with REX.W, 2 with 0x66, else ``default``."""
    at, size = 0, 0
    while at < len(code) and code[at] in (0x66, 0x67, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0xF2, 0xF3):
        size = 2 if code[at] == 0x66 else size
        at += 1
    if at < len(code) and 0x40 <= code[at] <= 0x4F and code[at] & 0x8:
        return 8
    return size


def emulate_segment(vcpu: VirtualCpu, segments: VirtualSegments, trap: Trap, context: GuestContext,
                    code: bytes) -> str | None:
    """Carry out the segment instruction at ``trap.regs.rip`` at virtual CPL 0; its text, or None if it is not one.

    Advances ``trap.regs.rip`` (or moves it, for a far transfer).  Raises
    :class:`SegmentFault` for the exception the CPU would raise (nothing
    changed) and :class:`Unmodelled` for what is not modelled.
    """
    regs = trap.regs
    kind = segment_operation(code, regs.rip)
    if kind is None:
        return None
    decoded = decode(bytes(code[:15]), regs.rip)
    if decoded is None:  # segment_operation decoded it already
        return None
    next_rip = (regs.rip + decoded.length) & MASK64
    if kind in ("lar", "lsl", "verr", "verw"):
        _access_rights(kind, decoded, vcpu, trap, context, next_rip)
    elif kind == "mov sreg":
        _mov_segment(decoded, vcpu, segments, trap, context, next_rip)
    elif kind == "push sreg":
        size = _operand_bytes(code) or 8
        _push(trap, context, segments.read(vcpu, decoded.operands[0].reg), size)
    elif kind == "pop sreg":
        size = _operand_bytes(code) or 8
        selector = int.from_bytes(context.read(regs.rsp, size), "little") & 0xFFFF
        _load(decoded.operands[0].reg, selector, vcpu, segments, context)
        regs.rsp = (regs.rsp + size) & MASK64
    elif kind in ("lfs", "lgs", "lss"):
        target, pointer = decoded.operands
        address = effective_address(pointer, regs, next_rip)
        offset = int.from_bytes(context.read(address, target.size), "little")
        selector = struct.unpack("<H", context.read((address + target.size) & MASK64, 2))[0]
        _load(kind[1:], selector, vcpu, segments, context)
        write_register(regs, target.reg, offset)
    else:
        _far_transfer(kind, code, decoded, vcpu, trap, context, next_rip)
        return decoded.text
    regs.rip = next_rip
    return decoded.text


def _access_rights(kind: str, decoded: Decoded, vcpu: VirtualCpu, trap: Trap, context: GuestContext,
                   next_rip: int) -> None:
    regs = trap.regs
    source = decoded.operands[-1]
    selector = _read(source, regs, context, next_rip, 2)
    descriptor = access_check(kind, selector, vcpu, context)
    regs.rflags = regs.rflags | RFLAGS_ZF if descriptor is not None else regs.rflags & ~RFLAGS_ZF
    if descriptor is None or kind in ("verr", "verw"):
        return
    target = decoded.operands[0]
    if kind == "lar":
        value = descriptor.high & (0xFF00 if target.size == 2 else ACCESS_RIGHTS_MASK)
    else:
        value = descriptor.limit & (0xFFFF if target.size == 2 else 0xFFFF_FFFF)
    write_register(regs, target.reg, value)


def _mov_segment(decoded: Decoded, vcpu: VirtualCpu, segments: VirtualSegments, trap: Trap, context: GuestContext,
                 next_rip: int) -> None:
    target, source = decoded.operands
    regs = trap.regs
    if source.kind == "reg" and source.reg in SEGMENT_REGISTERS:
        selector = segments.read(vcpu, source.reg)
        if target.kind == "reg":
            write_register(regs, target.reg, selector)  # 32/64-bit: zero-extended; 16-bit: merged
        else:
            context.write(effective_address(target, regs, next_rip), struct.pack("<H", selector))
        return
    if target.reg == "cs":
        raise SegmentFault(Vector.UD)  # MOV cannot load CS (SDM vol. 2A MOV)
    _load(target.reg, _read(source, regs, context, next_rip, 2), vcpu, segments, context)


def _read(operand: Operand, regs: Regs, context: GuestContext, next_rip: int, size: int) -> int:
    if operand.kind == "reg":
        return read_register(regs, operand.reg) & ((1 << 8 * size) - 1)
    return int.from_bytes(context.read(effective_address(operand, regs, next_rip), size), "little")


def _push(trap: Trap, context: GuestContext, value: int, size: int) -> None:
    rsp = (trap.regs.rsp - size) & MASK64
    context.write(rsp, value.to_bytes(size, "little"))
    trap.regs.rsp = rsp


def _selector_error(selector: int) -> int:
    """The error code of #GP/#NP/#SS(selector): the selector's index and TI (SDM vol. 3A 6.13)."""
    return selector & 0xFFFC


def _set_accessed(descriptor: Descriptor, context: GuestContext) -> None:
    """The CPU sets the descriptor's accessed bit when it loads a segment register from it."""
    if not descriptor.high >> 8 & _TYPE_ACCESSED:
        context.write(descriptor.address + 5, bytes([(descriptor.high >> 8 | _TYPE_ACCESSED) & 0xFF]))


def _load(register: str, selector: int, vcpu: VirtualCpu, segments: VirtualSegments, context: GuestContext) -> None:
    """Load a data or stack segment register at virtual CPL 0 (SDM vol. 2A MOV and POP, 64-bit mode)."""
    cpl, rpl = vcpu.cs & SELECTOR_RPL, selector & SELECTOR_RPL
    null = selector & ~SELECTOR_RPL & 0xFFFF == 0
    if register == "ss":
        if null:
            if cpl == 3 or rpl != cpl:
                raise SegmentFault(Vector.GP, 0)
            segments.write(vcpu, "ss", selector)
            return
        descriptor = read_descriptor(vcpu, context, selector)
        if descriptor is None or rpl != cpl or not descriptor.writable_data or descriptor.dpl != cpl:
            raise SegmentFault(Vector.GP, _selector_error(selector))
        if not descriptor.present:
            raise SegmentFault(Vector.SS, _selector_error(selector))
    elif null:
        segments.write(vcpu, register, selector)
        return
    else:
        descriptor = read_descriptor(vcpu, context, selector)
        if (descriptor is None or not descriptor.readable
                or (not descriptor.conforming_code and (rpl > descriptor.dpl or cpl > descriptor.dpl))):
            raise SegmentFault(Vector.GP, _selector_error(selector))
        if not descriptor.present:
            raise SegmentFault(Vector.NP, _selector_error(selector))
        if register in ("fs", "gs") and descriptor.base:
            raise Unmodelled(f"{register} loaded with selector {selector:#x}, whose descriptor has base "
                             f"{descriptor.base:#x}: binary translation keeps the ring-3 {register.upper()} base at 0")
    _set_accessed(descriptor, context)
    segments.write(vcpu, register, selector)


def _code_segment(selector: int, vcpu: VirtualCpu, context: GuestContext, what: str) -> Descriptor:
    """Check a far transfer's target CS at the same privilege (SDM vol. 2A JMP/CALL/RET far, 64-bit mode)."""
    cpl, rpl = vcpu.cs & SELECTOR_RPL, selector & SELECTOR_RPL
    if selector & ~SELECTOR_RPL & 0xFFFF == 0:
        raise SegmentFault(Vector.GP, 0)
    descriptor = read_descriptor(vcpu, context, selector)
    if descriptor is None:
        raise SegmentFault(Vector.GP, _selector_error(selector))
    if descriptor.system:
        raise Unmodelled(f"{what} through the system descriptor {selector:#x} (type {descriptor.type:#x}): "
                         "call gates and task switches are not modelled")
    if not descriptor.code or (descriptor.conforming_code and descriptor.dpl > cpl) or (
            not descriptor.conforming_code and (rpl > cpl or descriptor.dpl != cpl)):
        raise SegmentFault(Vector.GP, _selector_error(selector))
    if not descriptor.present:
        raise SegmentFault(Vector.NP, _selector_error(selector))
    if not descriptor.long_code:
        raise Unmodelled(f"{what} to the code segment {selector:#x}, which is not a 64-bit one: compatibility "
                         "mode is not modelled")
    return descriptor


def _canonical(address: int) -> bool:
    top = address >> 47
    return top == 0 or top == (1 << 17) - 1


def _far_transfer(kind: str, code: bytes, decoded: Decoded, vcpu: VirtualCpu, trap: Trap, context: GuestContext,
                  next_rip: int) -> None:
    regs = trap.regs
    size = _operand_bytes(code) or 4  # far transfers default to 32-bit operands in 64-bit mode
    mask = (1 << 8 * size) - 1
    if kind == "retf":
        rip, cs = (int.from_bytes(context.read((regs.rsp + size * i) & MASK64, size), "little") for i in (0, 1))
        cs &= 0xFFFF
        if cs & SELECTOR_RPL > vcpu.cs & SELECTOR_RPL:
            raise Unmodelled(f"far return to ring {cs & SELECTOR_RPL} (selector {cs:#x}): a virtual user mode "
                             "is not modelled")
        descriptor = _code_segment(cs, vcpu, context, "far return")
        if not _canonical(rip):
            raise SegmentFault(Vector.GP, 0)
        _set_accessed(descriptor, context)
        pop = decoded.operands[0].imm if decoded.operands else 0
        regs.rsp = (regs.rsp + 2 * size + pop) & MASK64
        vcpu.cs = cs
        regs.rip = rip
        return
    pointer = effective_address(decoded.operands[0], regs, next_rip)
    offset = int.from_bytes(context.read(pointer, size), "little")
    selector = struct.unpack("<H", context.read((pointer + size) & MASK64, 2))[0]
    descriptor = _code_segment(selector, vcpu, context, "far jump" if kind == "ljmp" else "far call")
    if not _canonical(offset):
        raise SegmentFault(Vector.GP, 0)
    if kind == "lcall":
        _push(trap, context, vcpu.cs, size)
        _push(trap, context, next_rip & mask, size)
    _set_accessed(descriptor, context)
    vcpu.cs = selector & ~SELECTOR_RPL | vcpu.cs & SELECTOR_RPL  # RPL := CPL
    regs.rip = offset
