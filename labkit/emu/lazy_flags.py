"""QEMU's lazy condition codes (CC_OP, CC_DST, CC_SRC, CC_SRC2) turned into RFLAGS' arithmetic flags.

While Unicorn runs, QEMU keeps RFLAGS' OF SF ZF AF PF CF implicit: ``cc_op``
says which operation last set them and ``cc_dst``/``cc_src``/``cc_src2`` hold
its operands (qemu/target/i386/cpu.h, ``enum CCOp``; cc_helper.c and
cc_helper_template.h compute them).  Asking Unicorn (``uc_reg_read(EFLAGS)``)
costs about 0.5 us through ctypes; a trap delivery needs RFLAGS for the frame,
so :func:`arithmetic_flags` computes them as QEMU does.

The table is indexed by the CCOp values of :attr:`internals.Layout.cc_op_names`.
:func:`check_flag_table` compares every entry with ``uc_reg_read(EFLAGS)`` on a
few operand values, once per process (a probe of :func:`internals.verify`), and
raises :class:`~labkit.errors.EmulatorError` for the first CC_OP that disagrees.
"""

from __future__ import annotations

import ctypes
from typing import Callable

from labkit.emu import internals
from labkit.emu.internals import LAYOUT, Layout
from labkit.errors import EmulatorError

CC_C, CC_P, CC_A, CC_Z, CC_S, CC_O = 0x1, 0x4, 0x10, 0x40, 0x80, 0x800
ARITHMETIC = CC_C | CC_P | CC_A | CC_Z | CC_S | CC_O
_PARITY = tuple(0 if bin(i).count("1") & 1 else CC_P for i in range(256))

FlagFunction = Callable[[int, int, int], int]
"""(cc_dst, cc_src, cc_src2) -> OF SF ZF AF PF CF."""


def _sized_flag_functions(bits: int) -> dict[str, FlagFunction]:
    """QEMU's cc_helper_template.h compute_all_* for one operand size, as (dst, src1, src2) -> flags.

    Written for speed (one of them runs on every trap): constants are closure
    variables, SF is the result's top bit shifted to bit 7.
    """
    mask = (1 << bits) - 1
    sign = 1 << (bits - 1)
    below_sign = sign - 1
    to_sf = bits - 8
    parity = _PARITY
    cf, af, zf, sf, of = CC_C, CC_A, CC_Z, CC_S, CC_O

    def mul(dst: int, src1: int, _src2: int) -> int:  # src1 is a target_long here: not cut to the operand size
        dst &= mask
        carry = 1 if src1 else 0
        return carry | parity[dst & 0xFF] | (0 if dst else zf) | (dst >> to_sf & sf) | carry << 11

    def add(dst: int, src1: int, _src2: int) -> int:
        dst &= mask
        src1 &= mask
        src2 = (dst - src1) & mask
        return ((dst < src1) | parity[dst & 0xFF] | ((dst ^ src1 ^ src2) & af) | (0 if dst else zf)
                | (dst >> to_sf & sf) | (of if (src1 ^ src2 ^ mask) & (src1 ^ dst) & sign else 0))

    def adc(dst: int, src1: int, carry: int) -> int:
        dst &= mask
        src1 &= mask
        carry &= mask
        src2 = (dst - src1 - carry) & mask
        return (((dst <= src1) if carry else (dst < src1)) | parity[dst & 0xFF] | ((dst ^ src1 ^ src2) & af)
                | (0 if dst else zf) | (dst >> to_sf & sf) | (of if (src1 ^ src2 ^ mask) & (src1 ^ dst) & sign else 0))

    def sub(dst: int, src2: int, _unused: int) -> int:
        dst &= mask
        src2 &= mask
        src1 = (dst + src2) & mask
        return ((src1 < src2) | parity[dst & 0xFF] | ((dst ^ src1 ^ src2) & af) | (0 if dst else zf)
                | (dst >> to_sf & sf) | (of if (src1 ^ src2) & (src1 ^ dst) & sign else 0))

    def sbb(dst: int, src2: int, borrow: int) -> int:
        dst &= mask
        src2 &= mask
        borrow &= mask
        src1 = (dst + src2 + borrow) & mask
        return (((src1 <= src2) if borrow else (src1 < src2)) | parity[dst & 0xFF] | ((dst ^ src1 ^ src2) & af)
                | (0 if dst else zf) | (dst >> to_sf & sf) | (of if (src1 ^ src2) & (src1 ^ dst) & sign else 0))

    def logic(dst: int, _src1: int, _src2: int) -> int:
        dst &= mask
        return parity[dst & 0xFF] | (0 if dst else zf) | (dst >> to_sf & sf)

    def inc(dst: int, carry: int, _src2: int) -> int:  # CC_SRC holds the carry flag from before
        dst &= mask
        return ((carry & mask) | parity[dst & 0xFF] | (0 if dst & 0xF else af) | (0 if dst else zf)
                | (dst >> to_sf & sf) | (of if dst == sign else 0))

    def dec(dst: int, carry: int, _src2: int) -> int:
        dst &= mask
        return ((carry & mask) | parity[dst & 0xFF] | (af if dst & 0xF == 0xF else 0) | (0 if dst else zf)
                | (dst >> to_sf & sf) | (of if dst == below_sign else 0))

    def shl(dst: int, src1: int, _src2: int) -> int:
        dst &= mask
        src1 &= mask
        return ((src1 >> (bits - 1) & cf) | parity[dst & 0xFF] | (0 if dst else zf) | (dst >> to_sf & sf)
                | (of if (src1 ^ dst) & sign else 0))

    def sar(dst: int, src1: int, _src2: int) -> int:
        dst &= mask
        src1 &= mask
        return ((src1 & cf) | parity[dst & 0xFF] | (0 if dst else zf) | (dst >> to_sf & sf)
                | (of if (src1 ^ dst) & sign else 0))

    def bmilg(dst: int, src1: int, _src2: int) -> int:
        dst &= mask
        return (0 if src1 & mask else cf) | (0 if dst else zf) | (dst >> to_sf & sf)

    return {"MUL": mul, "ADD": add, "ADC": adc, "SUB": sub, "SBB": sbb, "LOGIC": logic, "INC": inc, "DEC": dec,
            "SHL": shl, "SAR": sar, "BMILG": bmilg}


def flag_table(layout: Layout = LAYOUT) -> list[FlagFunction | None]:
    """Index: the CCOp value (``layout.cc_op_names``); None: not modelled here, ask Unicorn."""
    names = layout.cc_op_names
    table: list[FlagFunction | None] = [None] * 64
    table[names.index("EFLAGS")] = lambda _dst, src1, _src2: src1 & ARITHMETIC  # CC_SRC = the flags
    sized = [_sized_flag_functions(bits) for bits in (8, 16, 32, 64)]
    for kind in ("MUL", "ADD", "ADC", "SUB", "SBB", "LOGIC", "INC", "DEC", "SHL", "SAR", "BMILG"):
        for size, suffix in enumerate("BWLQ"):
            table[names.index(kind + suffix)] = sized[size][kind]
    table[names.index("ADCX")] = lambda dst, src1, _src2: ((src1 & ~CC_C) | dst * CC_C) & ARITHMETIC  # CC_DST = C
    table[names.index("ADOX")] = lambda _dst, src1, src2: ((src1 & ~CC_O) | src2 * CC_O) & ARITHMETIC  # CC_SRC2 = O
    table[names.index("ADCOX")] = lambda dst, src1, src2: (  # CC_DST = C, CC_SRC2 = O
        (src1 & ~(CC_C | CC_O)) | dst * CC_C | src2 * CC_O) & ARITHMETIC
    table[names.index("CLR")] = lambda _dst, _src1, _src2: CC_Z | CC_P
    table[names.index("POPCNT")] = lambda _dst, src1, _src2: 0 if src1 else CC_Z
    return table


FLAG_TABLE = flag_table()
_FLAG_TABLE = FLAG_TABLE  # the name tests and older code use

_SAMPLES = ((0, 0, 0), (1, 0, 1), (0x80, 0x7F, 1), (0x7F, 0x80, 0), (0x8000, 0xFFFF, 1),
            (0x8000_0000, 0x7FFF_FFFF, 0), (1 << 63, (1 << 63) - 1, 1), (0xFFFF_FFFF_FFFF_FFFF, 1, 0),
            (0x1234_5678_9ABC_DEF0, 0x0FED_CBA9_8765_4321, 1), (0x10, 0x0F, 0))


def arithmetic_flags(cc_op: int, cc_dst: int, cc_src: int, cc_src2: int) -> int | None:
    """OF SF ZF AF PF CF as QEMU computes them from its lazy state; None for a CC_OP not modelled here."""
    function = FLAG_TABLE[cc_op] if 0 <= cc_op < len(FLAG_TABLE) else None
    return None if function is None else function(cc_dst, cc_src, cc_src2)


def check_flag_table(address: int, read_eflags: Callable[[], int], layout: Layout = LAYOUT) -> None:
    """Compare every modelled CC_OP with Unicorn's own computation; EmulatorError for the first that differs.

    ``address`` is a CPUX86State of an engine that is not running; for each
    sample, cc_dst/cc_src/cc_src2/cc_op are written in place and the result
    compared with ``read_eflags()`` (``uc_reg_read``: QEMU's cpu_compute_eflags).
    The fields are put back afterwards.
    """
    start, end = layout.eflags, layout.hflags
    saved = ctypes.string_at(address + start, end - start)

    def q(offset: int) -> ctypes.c_uint64:
        return ctypes.c_uint64.from_address(address + offset)

    names = layout.cc_op_names
    carry_only = {names.index(kind + suffix) for kind in ("INC", "DEC") for suffix in "BWLQ"}

    def unicorn_flags(cc_op: int, dst: int, src1: int, src2: int) -> int:
        q(layout.cc_dst).value, q(layout.cc_src).value, q(layout.cc_src2).value = dst, src1, src2
        ctypes.c_uint32.from_address(address + layout.cc_op).value = cc_op
        return read_eflags() & ARITHMETIC

    def fail(what: str) -> EmulatorError:
        return EmulatorError(f"Unicorn's CPU state: {what} (is unicorn 2.1.4 installed?)")

    try:
        q(layout.eflags).value = 0x2
        ctypes.c_int32.from_address(address + layout.df).value = 1
        # The operand fields one at a time: LOGICQ reads only cc_dst, ADOX takes OF from cc_src2.
        logic, adox = names.index("LOGICQ"), names.index("ADOX")
        if (unicorn_flags(logic, 0, 0, 0), unicorn_flags(logic, 1 << 63, 0, 0)) != (CC_Z | CC_P, CC_S | CC_P):
            raise fail(f"field cc_dst (offset {layout.cc_dst:#x}) is not what Unicorn computes CC_OP_LOGICQ "
                       f"({logic} in cc_op_names) from")
        if (unicorn_flags(adox, 0, 0, 1), unicorn_flags(adox, 0, 0, 0)) != (CC_O, 0):
            raise fail(f"field cc_src2 (offset {layout.cc_src2:#x}) is not where Unicorn takes CC_OP_ADOX's "
                       f"({adox} in cc_op_names) OF from")
        for cc_op, function in enumerate(flag_table(layout)):
            if function is None:
                continue
            for dst, src1, src2 in _SAMPLES:
                if cc_op in carry_only:  # INC, DEC: CC_SRC holds the carry flag, 0 or 1
                    src1 &= 1
                ours, unicorns = function(dst, src1, src2), unicorn_flags(cc_op, dst, src1, src2)
                if ours != unicorns:
                    raise fail(f"lazy flags of CC_OP {cc_op} ({names[cc_op]} in cc_op_names) with cc_dst={dst:#x} "
                               f"cc_src={src1:#x} cc_src2={src2:#x} are {ours:#x} here and {unicorns:#x} in Unicorn")
    finally:
        ctypes.memmove(address + start, saved, len(saved))


def checked_flag_table(cpu: object, read_eflags: Callable[[], int]) -> list[FlagFunction | None]:
    """The flag table, once :func:`internals.verify` has checked it (kept for older callers)."""
    internals.verify()
    return FLAG_TABLE
