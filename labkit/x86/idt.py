"""Interrupt and trap gates, and real-mode IVT entries (Intel SDM vol. 3, 6.11 and 6.14.1; 20.1.4).

A 32-bit gate is 8 bytes, a 64-bit gate 16 bytes (with a 64-bit offset and an
IST index); an IVT entry is ``offset:segment``, 4 bytes.  Interrupt gates clear
IF on entry, trap gates do not.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Sequence

from labkit.errors import ConfigError
from labkit.x86.arch import ERROR_CODE_VECTORS, INTERRUPT_GATE, TRAP_GATE, VECTORS  # noqa: F401 (re-exported)

GATE32_SIZE = 8
GATE64_SIZE = 16
IVT_ENTRY_SIZE = 4



@dataclass(frozen=True)
class Gate:
    """One IDT gate: where the handler is and who may reach it with ``int n``."""

    offset: int
    selector: int
    type: int = INTERRUPT_GATE
    dpl: int = 0
    present: int = 1
    ist: int = 0


def _check(gate: Gate, offset_bits: int) -> None:
    if not 0 <= gate.offset < 1 << offset_bits:
        raise ConfigError(f"gate offset {gate.offset:#x} does not fit {offset_bits} bits")
    if gate.type not in (INTERRUPT_GATE, TRAP_GATE):
        raise ConfigError(f"gate type {gate.type:#x} is neither an interrupt (0xE) nor a trap (0xF) gate")
    if not 0 <= gate.selector <= 0xFFFF or not 0 <= gate.dpl <= 3 or not 0 <= gate.ist <= 7:
        raise ConfigError(f"bad gate fields: {gate}")


def _attributes(gate: Gate) -> int:
    return gate.type | gate.dpl << 5 | (gate.present & 1) << 7


def encode_gate32(gate: Gate) -> bytes:
    """The 8-byte protected-mode gate."""
    _check(gate, 32)
    if gate.ist:
        raise ConfigError("a 32-bit gate has no IST field")
    return struct.pack(
        "<HHBBH", gate.offset & 0xFFFF, gate.selector, 0, _attributes(gate), gate.offset >> 16
    )


def decode_gate32(raw: bytes) -> Gate:
    low, selector, _, attributes, high = struct.unpack_from("<HHBBH", raw)
    return Gate(
        offset=low | high << 16, selector=selector, type=attributes & 0xF,
        dpl=(attributes >> 5) & 3, present=attributes >> 7,
    )


def encode_gate64(gate: Gate) -> bytes:
    """The 16-byte long-mode gate."""
    _check(gate, 64)
    return struct.pack(
        "<HHBBHII",
        gate.offset & 0xFFFF, gate.selector, gate.ist, _attributes(gate),
        (gate.offset >> 16) & 0xFFFF, gate.offset >> 32, 0,
    )


def decode_gate64(raw: bytes) -> Gate:
    low, selector, ist, attributes, middle, high, _ = struct.unpack_from("<HHBBHII", raw)
    return Gate(
        offset=low | middle << 16 | high << 32, selector=selector, type=attributes & 0xF,
        dpl=(attributes >> 5) & 3, present=attributes >> 7, ist=ist & 7,
    )


def encode_ivt_entry(segment: int, offset: int) -> bytes:
    """A real-mode vector: ``offset`` then ``segment``, 16 bits each."""
    if not 0 <= segment <= 0xFFFF or not 0 <= offset <= 0xFFFF:
        raise ConfigError(f"real-mode vector {segment:#x}:{offset:#x} does not fit 16:16 bits")
    return struct.pack("<HH", offset, segment)


def decode_ivt_entry(raw: bytes) -> tuple[int, int]:
    """``(segment, offset)`` of a real-mode vector."""
    offset, segment = struct.unpack_from("<HH", raw)
    return segment, offset


def build_idt(gates: Sequence[Gate], mode: int) -> bytes:
    """An IDT of ``len(gates)`` gates for ``mode`` 32 or 64."""
    if mode == 64:
        return b"".join(encode_gate64(gate) for gate in gates)
    if mode == 32:
        return b"".join(encode_gate32(gate) for gate in gates)
    raise ConfigError(f"an IDT is for 32- or 64-bit mode, not {mode}")


def build_ivt(handlers: Sequence[tuple[int, int]]) -> bytes:
    """A real-mode IVT from ``(segment, offset)`` pairs."""
    return b"".join(encode_ivt_entry(segment, offset) for segment, offset in handlers)


def idt_limit(mode: int, vectors: int = VECTORS) -> int:
    """IDTR.limit (bytes - 1) for ``vectors`` gates; in real mode the IVT's."""
    size = {16: IVT_ENTRY_SIZE, 32: GATE32_SIZE, 64: GATE64_SIZE}.get(mode)
    if size is None:
        raise ConfigError(f"mode must be 16, 32 or 64, not {mode!r}")
    return vectors * size - 1
