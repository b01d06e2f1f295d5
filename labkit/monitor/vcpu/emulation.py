"""Emulation for the virtual CPU: carry out a trapped privileged instruction, reflect an exception.

:func:`emulate`, :func:`reflect`, :func:`deliver_pending` and
:func:`after_emulation` are shared by both monitors (see :mod:`labkit.monitor.vcpu`).
"""

from __future__ import annotations

import struct
from enum import Enum
from typing import Callable

from labkit.errors import LabkitError
from labkit.monitor.vcpu.decoding import (MASK64, Decoded, Operand, decode, effective_address, read_register,
                                          write_register)
from labkit.monitor.vcpu.state import VirtualCpu, VirtualTripleFault
from labkit.vmm.forwarding import GuestContext, Trap
from labkit.x86.arch import (CR0_EM, CR0_MP, CR0_PE, CR0_TS, ERROR_CODE_VECTORS, INTERRUPT_GATE, RFLAGS_AC, RFLAGS_AF,
                             RFLAGS_CF, RFLAGS_DF, RFLAGS_FIXED, RFLAGS_ID, RFLAGS_IF, RFLAGS_IOPL, RFLAGS_NT,
                             RFLAGS_OF, RFLAGS_PF, RFLAGS_RF, RFLAGS_SF, RFLAGS_TF, RFLAGS_ZF, SELECTOR_RPL, TRAP_GATE,
                             Vector)
from labkit.x86.instructions import InstructionClass, instruction_class
from labkit.x86.state import Regs

RFLAGS_GUEST_SETTABLE = (RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_TF | RFLAGS_DF | RFLAGS_OF
                         | RFLAGS_AC | RFLAGS_ID)  # 0x240DD5
"""CF PF AF ZF SF TF DF OF AC ID: what a popped RFLAGS may change in the real one (not IF, IOPL, NT, RF, VM)."""

EMULATED = frozenset({
    "cli", "sti", "hlt", "pushfq", "popfq", "in", "out", "mov", "clts", "lgdt", "lidt", "sgdt", "sidt",
    "sldt", "str", "smsw", "lmsw", "invlpg", "rdmsr", "wrmsr", "iretq", "int", "int3",
})
"""Mnemonics :func:`emulate` carries out (``mov`` only to or from a control register)."""

def traps_when_deprivileged(decoded: Decoded) -> bool:
    """Whether a #GP/#UD at this instruction, in a kernel run in ring 3, is the monitor's business.

    True for a privileged instruction and for a sensitive one that traps all the same (``int n`` through a
    DPL-0 gate, ``sgdt`` under CR4.UMIP): both kinds as :mod:`labkit.x86.instructions` defines them.  A
    monitor that meets one it does not emulate must stop rather than blame the guest.
    """
    return instruction_class(decoded.mnemonic, decoded.text[len(decoded.mnemonic):]) is not InstructionClass.INNOCUOUS


def _read_operand(operand: Operand, regs: Regs, context: GuestContext, next_rip: int) -> int:
    if operand.kind == "reg":
        return read_register(regs, operand.reg)
    if operand.kind == "imm":
        return operand.imm & ((1 << 8 * operand.size) - 1)
    address = effective_address(operand, regs, next_rip)
    return int.from_bytes(context.read(address, operand.size), "little")


def _write_operand(operand: Operand, value: int, regs: Regs, context: GuestContext, next_rip: int) -> None:
    if operand.kind == "reg":
        write_register(regs, operand.reg, value)
    else:
        address = effective_address(operand, regs, next_rip)
        context.write(address, (value & ((1 << 8 * operand.size) - 1)).to_bytes(operand.size, "little"))


# -- the stack ------------------------------------------------------------------------------------

def _push(trap: Trap, context: GuestContext, values: tuple[int, ...]) -> None:
    """Push quadwords (first value pushed first) on the guest stack."""
    rsp = trap.regs.rsp
    for value in values:
        rsp = (rsp - 8) & MASK64
        context.write(rsp, struct.pack("<Q", value & MASK64))
    trap.regs.rsp = rsp


def _pop(trap: Trap, context: GuestContext, count: int) -> tuple[int, ...]:
    values = struct.unpack(f"<{count}Q", context.read(trap.regs.rsp, 8 * count))
    trap.regs.rsp = (trap.regs.rsp + 8 * count) & MASK64
    return values


def virtual_rflags(vcpu: VirtualCpu, rflags: int) -> int:
    """RFLAGS as the guest kernel should see it: the real arithmetic flags, the virtual IF, IOPL 0."""
    flags = rflags & ~(RFLAGS_IF | RFLAGS_IOPL) | RFLAGS_FIXED
    return flags | RFLAGS_IF if vcpu.interrupts_enabled else flags


def _load_rflags(vcpu: VirtualCpu, trap: Trap, value: int) -> None:
    """Take IF into the virtual CPU; the real RFLAGS keeps IF = 1 and IOPL 0 so ring 3 stays contained."""
    vcpu.interrupts_enabled = bool(value & RFLAGS_IF)
    trap.regs.rflags = value & RFLAGS_GUEST_SETTABLE | RFLAGS_IF | RFLAGS_FIXED


# -- emulate ------------------------------------------------------------------------------------

CONTROL_REGISTERS = ("cr0", "cr2", "cr3", "cr4")


def emulate(vcpu: VirtualCpu, trap: Trap, context: GuestContext, code: bytes) -> str | None:
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
    if done is _DECLINED:
        return None
    if done is not _RIP_SET:
        regs.rip = next_rip
    vcpu.emulated[decoded.mnemonic] = vcpu.emulated.get(decoded.mnemonic, 0) + 1
    return decoded.text


class Handled(Enum):
    """A handler's answer when it did not simply complete (it returns None then: RIP moves past the instruction)."""

    RIP_SET = "rip set"
    """It moved RIP itself (iretq, int n)."""
    DECLINED = "declined"
    """Not emulated after all (an operand form not modelled): nothing changed."""


_RIP_SET, _DECLINED = Handled.RIP_SET, Handled.DECLINED


def _cli(vcpu: VirtualCpu, trap: Trap, context: GuestContext, decoded: Decoded, next_rip: int) -> Handled | None:
    vcpu.interrupts_enabled = False
    return None


def _sti(vcpu: VirtualCpu, trap: Trap, context: GuestContext, decoded: Decoded, next_rip: int) -> Handled | None:
    vcpu.interrupts_enabled = True
    return None


def _hlt(vcpu: VirtualCpu, trap: Trap, context: GuestContext, decoded: Decoded, next_rip: int) -> Handled | None:
    vcpu.halted = True
    return None


def _pushfq(vcpu: VirtualCpu, trap: Trap, context: GuestContext, decoded: Decoded, next_rip: int) -> Handled | None:
    _push(trap, context, (virtual_rflags(vcpu, trap.regs.rflags),))
    return None


def _popfq(vcpu: VirtualCpu, trap: Trap, context: GuestContext, decoded: Decoded, next_rip: int) -> Handled | None:
    value, = _pop(trap, context, 1)
    _load_rflags(vcpu, trap, value)
    return None


def _port_io(vcpu: VirtualCpu, trap: Trap, context: GuestContext, decoded: Decoded, next_rip: int) -> Handled | None:
    operands = decoded.operands
    if len(operands) != 2:
        return _DECLINED
    if decoded.mnemonic == "in":
        data, port_operand = operands
    else:
        port_operand, data = operands
    if data.kind != "reg":
        return _DECLINED
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
    return None


def _mov(vcpu: VirtualCpu, trap: Trap, context: GuestContext, decoded: Decoded, next_rip: int) -> Handled | None:
    if len(decoded.operands) != 2 or any(op.kind != "reg" for op in decoded.operands):
        return _DECLINED
    target, source = decoded.operands
    if target.reg in CONTROL_REGISTERS:
        setattr(vcpu, target.reg, read_register(trap.regs, source.reg))
    elif source.reg in CONTROL_REGISTERS:
        write_register(trap.regs, target.reg, getattr(vcpu, source.reg))
    else:
        return _DECLINED  # mov to/from cr8 or a debug register: not emulated
    return None


def _clts(vcpu: VirtualCpu, trap: Trap, context: GuestContext, decoded: Decoded, next_rip: int) -> Handled | None:
    vcpu.cr0 &= ~CR0_TS
    return None


def _descriptor_table(vcpu: VirtualCpu, trap: Trap, context: GuestContext, decoded: Decoded, next_rip: int) -> Handled | None:
    operand, = decoded.operands
    if operand.kind != "mem":
        return _DECLINED
    address = effective_address(operand, trap.regs, next_rip)
    name = "gdtr" if decoded.mnemonic[1:] == "gdt" else "idtr"
    if decoded.mnemonic[0] == "l":
        limit, base = struct.unpack("<HQ", context.read(address, 10))
        setattr(vcpu, name, (base, limit))
    else:
        base, limit = getattr(vcpu, name)
        context.write(address, struct.pack("<HQ", limit, base))
    return None


def _store_selector(vcpu: VirtualCpu, trap: Trap, context: GuestContext, decoded: Decoded, next_rip: int) -> Handled | None:
    operand, = decoded.operands
    value = {"sldt": vcpu.ldtr, "str": vcpu.tr, "smsw": vcpu.cr0}[decoded.mnemonic]
    if operand.kind == "mem":
        value &= 0xFFFF
    _write_operand(operand, value, trap.regs, context, next_rip)
    return None


def _lmsw(vcpu: VirtualCpu, trap: Trap, context: GuestContext, decoded: Decoded, next_rip: int) -> Handled | None:
    operand, = decoded.operands
    value = _read_operand(operand, trap.regs, context, next_rip)
    machine_status = CR0_PE | CR0_MP | CR0_EM | CR0_TS  # the four bits LMSW loads (SDM vol. 2A, LMSW)
    vcpu.cr0 = vcpu.cr0 & ~machine_status | value & machine_status | vcpu.cr0 & CR0_PE  # it cannot clear PE
    return None


def _invlpg(vcpu: VirtualCpu, trap: Trap, context: GuestContext, decoded: Decoded, next_rip: int) -> Handled | None:
    pass  # no shadow page tables: nothing cached to drop
    return None


def _rdmsr(vcpu: VirtualCpu, trap: Trap, context: GuestContext, decoded: Decoded, next_rip: int) -> Handled | None:
    index = trap.regs.rcx & 0xFFFF_FFFF
    if index not in vcpu.msrs:
        return _DECLINED
    value = vcpu.msrs[index]
    trap.regs.rax, trap.regs.rdx = value & 0xFFFF_FFFF, value >> 32 & 0xFFFF_FFFF
    return None


def _wrmsr(vcpu: VirtualCpu, trap: Trap, context: GuestContext, decoded: Decoded, next_rip: int) -> Handled | None:
    index = trap.regs.rcx & 0xFFFF_FFFF
    vcpu.msrs[index] = (trap.regs.rdx & 0xFFFF_FFFF) << 32 | trap.regs.rax & 0xFFFF_FFFF
    return None


def _iretq(vcpu: VirtualCpu, trap: Trap, context: GuestContext, decoded: Decoded, next_rip: int) -> Handled | None:
    rip, cs, rflags, rsp, ss = struct.unpack("<5Q", context.read(trap.regs.rsp, 40))
    if cs & SELECTOR_RPL:
        return _DECLINED  # a return to virtual user mode is not modelled
    vcpu.cs, vcpu.ss = cs & 0xFFFF, ss & 0xFFFF
    trap.regs.rip, trap.regs.rsp = rip, rsp
    _load_rflags(vcpu, trap, rflags)
    return _RIP_SET


def _int(vcpu: VirtualCpu, trap: Trap, context: GuestContext, decoded: Decoded, next_rip: int) -> Handled | None:
    vector = Vector.BP if decoded.mnemonic == "int3" else decoded.operands[0].imm & 0xFF
    trap.regs.rip = next_rip
    reflect(vcpu, trap, context, vector)
    return _RIP_SET


Handler = Callable[[VirtualCpu, Trap, GuestContext, Decoded, int], "Handled | None"]
"""Carries out one mnemonic on the virtual CPU and the trap's registers."""

_HANDLERS: dict[str, Handler] = {
    "cli": _cli, "sti": _sti, "hlt": _hlt, "pushfq": _pushfq, "popfq": _popfq, "in": _port_io, "out": _port_io,
    "mov": _mov, "clts": _clts, "lgdt": _descriptor_table, "lidt": _descriptor_table,
    "sgdt": _descriptor_table, "sidt": _descriptor_table, "sldt": _store_selector, "str": _store_selector,
    "smsw": _store_selector, "lmsw": _lmsw, "invlpg": _invlpg, "rdmsr": _rdmsr, "wrmsr": _wrmsr,
    "iretq": _iretq, "int": _int, "int3": _int,
}


# -- reflect ------------------------------------------------------------------------------------

def reflect(vcpu: VirtualCpu, trap: Trap, context: GuestContext, vector: int, error_code: int | None = None, *,
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
    if vector == Vector.PF:
        vcpu.cr2 = trap.cr2 if cr2 is None else cr2
    regs = trap.regs
    old_rsp = regs.rsp
    regs.rsp = old_rsp & ~0xF
    frame: tuple[int, ...] = (vcpu.ss, old_rsp, virtual_rflags(vcpu, regs.rflags), vcpu.cs, regs.rip)
    if error_code is not None:
        frame += (error_code,)
    try:
        _push(trap, context, frame)
    except LabkitError as error:  # outside guest RAM, or (shadow paging) memory the monitor keeps for itself
        raise VirtualTripleFault(f"the guest's stack at {old_rsp:#x} cannot take the frame: {error}") from None
    vcpu.cs = selector & ~3
    if gate_type == INTERRUPT_GATE:
        vcpu.interrupts_enabled = False
    regs.rip = offset
    regs.rflags &= ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF)
    vcpu.halted = False
    vcpu.reflected[vector] = vcpu.reflected.get(vector, 0) + 1


def deliver_pending(vcpu: VirtualCpu, trap: Trap, context: GuestContext) -> int | None:
    """Reflect the oldest pending virtual interrupt if the virtual IF allows; its vector, else None."""
    if not vcpu.interrupts_enabled or not vcpu.pending:
        return None
    vector = vcpu.pending.pop(0)
    reflect(vcpu, trap, context, vector)
    return vector


LETS_INTERRUPTS_IN = frozenset({"sti", "popfq", "iretq", "hlt"})
"""Emulated instructions after which a pending virtual interrupt may be delivered."""


def after_emulation(vcpu: VirtualCpu, trap: Trap, context: GuestContext, mnemonic: str) -> tuple[int | None, str | None]:
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
