"""Disassembly of guest code with Capstone, for messages, traces and monitors."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from labkit.x86.readable import Readable

MAX_INSTRUCTION = 15
"""The longest x86 instruction, in bytes (Intel SDM vol. 2, 2.3.11)."""


@lru_cache(maxsize=3)
def _disassembler(mode: int) -> Any:  # a capstone.Cs (Capstone has no type hints)
    import capstone

    cs_mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[mode]
    return capstone.Cs(capstone.CS_ARCH_X86, cs_mode)


def disassemble(code: bytes, address: int, mode: int, count: int = 0) -> list[tuple[int, bytes, str]]:
    """``(address, bytes, "mnemonic operands")`` for each instruction Capstone decodes (``count`` 0: all)."""
    return [
        (insn.address, bytes(insn.bytes), f"{insn.mnemonic} {insn.op_str}".strip())
        for insn in _disassembler(mode).disasm(code, address, count)
    ]


def instruction_at(memory: Readable, address: int, mode: int) -> str:
    """``"fsave [rax]"`` for the instruction at guest-physical ``address``, or a hex dump if it does not decode.

    ``memory`` is the guest's (a :class:`labkit.memory.GuestMemory`): the bytes
    are fetched through it, fewer than 15 where guest memory ends.
    """
    code = memory.read_at_most(address, MAX_INSTRUCTION)
    if not code:
        return f"(rip {address:#x} is outside guest RAM)"
    return instruction_text(code, address, mode)


def instruction_text(code: bytes, address: int, mode: int) -> str:
    """``"fsave [rax]"`` for the first instruction of ``code`` (at ``address``), or a hex dump if it does not decode."""
    decoded = disassemble(code, address, mode, count=1)
    if not decoded:
        return f"(undecodable bytes {code[:8].hex(' ')})"
    return decoded[0][2]
