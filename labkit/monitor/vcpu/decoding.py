"""Decoding for the virtual CPU: one 64-bit instruction with Capstone, and the guest's registers by name."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from labkit.x86.state import Regs

MASK64 = (1 << 64) - 1


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
    """One decoded instruction: where it is, how long, its mnemonic, its text and its operands."""

    address: int
    length: int
    mnemonic: str
    text: str
    operands: tuple[Operand, ...]


@lru_cache(maxsize=1)
def _capstone() -> Any:
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


def read_register(regs: Regs, name: str) -> int:
    """The value of the Capstone-named register ``name`` (``"eax"``, ``"r9b"``, ``"ah"``) in ``regs``."""
    field_name, size, shift = _REGISTERS[name]
    return getattr(regs, field_name) >> shift & ((1 << 8 * size) - 1)


def write_register(regs: Regs, name: str, value: int) -> None:
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


def effective_address(operand: Operand, regs: Regs, next_rip: int) -> int:
    """base + index * scale + disp (RIP-relative from the next instruction); FS/GS bases taken as 0."""
    address = operand.disp
    if operand.base:
        address += next_rip if operand.base == "rip" else read_register(regs, operand.base)
    if operand.index:
        address += read_register(regs, operand.index) * operand.scale
    return address & MASK64
