"""Whether Unicorn's last run ended in ``hlt``: QEMU's ``CPUState.halted``, found and verified.

``uc_emu_start`` returns ``UC_ERR_OK`` both after a ``hlt`` and after
``uc_emu_stop`` (a kick or the watchdog's deadline), and both can happen in
one run.  QEMU's ``do_hlt`` sets ``CPUState.halted = 1``; Unicorn clears it at
the start of every ``uc_emu_start`` (``resume_all_vcpus``), so after a run it
says exactly whether the run ended in ``hlt``.

``CPUState`` lies before ``CPUX86State`` in the same ``X86CPU`` object
(QEMU 5.0: ``parent_obj``, ``neg``, ``env``), and in Unicorn 2.1.4 it ends
with ``uint32_t halted; uint32_t can_do_io; int32_t exception_index;
struct uc_struct *uc; ...``.  The field is found deterministically from the
engine's own pointer: the one qword before ``env`` that equals the engine's
``uc_struct`` address is ``CPUState.uc``; among the int32 fields just before it,
``halted`` is the one that reads 1 after a ``hlt`` and 0 after a run stopped
otherwise, checked in a scratch engine.  Each engine then checks its own
back-pointer at the same offset.  Any failed check is an
:class:`~labkit.errors.EmulatorError` naming it.
"""

from __future__ import annotations

import ctypes
import os
import struct

from unicorn import UC_ARCH_X86, UC_HOOK_BLOCK, UC_MODE_64, UC_PROT_ALL, Uc

from labkit.emu.cpu_state import locate_state
from labkit.emu.internals import engine_address
from labkit.errors import EmulatorError

_SEARCH = 1 << 14
"""How far before CPUX86State the back-pointer is searched for (it sits about 2.2 KiB before, after
CPUState's 32 KiB tb_jmp_cache; further back lie other objects, which may point at the engine too)."""

_offsets: tuple[int, int] | None = None  # (halted, uc back-pointer), relative to CPUX86State


def _before(address: int, size: int) -> bytes:
    with open("/proc/self/mem", "rb", buffering=0) as mem:
        try:
            return os.pread(mem.fileno(), size, address - size)
        except (OSError, OverflowError):
            return b""


def _handle(uc: Uc) -> int:
    return engine_address(uc)


def find_halted_offset() -> tuple[int, int]:
    """(offset of ``halted``, offset of ``CPUState.uc``) relative to CPUX86State; found once per process."""
    global _offsets
    if _offsets is not None:
        return _offsets
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x10000, UC_PROT_ALL)
    uc.mem_write(0x1000, b"\xf4")  # hlt
    uc.mem_write(0x2000, b"\x90\xeb\xfd")  # loop: nop; jmp loop (stopped by a block hook)
    env = locate_state(uc)
    handle = _handle(uc)
    block = _before(env, _SEARCH)
    if len(block) != _SEARCH:
        raise EmulatorError("cannot read the memory before Unicorn's CPU state (CPUState.halted)")
    pointers = [i * 8 - _SEARCH for i, value in enumerate(struct.unpack(f"<{_SEARCH // 8}Q", block))
                if value == handle]
    if not pointers:
        raise EmulatorError("cannot find CPUState.uc (a pointer back to the engine) before Unicorn's CPU state")

    def fields() -> list[list[int]]:
        return [list(struct.unpack("<8i", _before(env + back, 32))) for back in pointers]

    uc.emu_start(0x1000, 1 << 63)
    after_hlt = fields()
    blocks = []

    def stop_later(engine: Uc, _address: int, _size: int, _data: object) -> None:
        blocks.append(_address)
        if len(blocks) == 3:
            engine.emu_stop()

    hook = uc.hook_add(UC_HOOK_BLOCK, stop_later)
    uc.emu_start(0x2000, 1 << 63)  # (an "until" address would end the run as a hlt does)
    uc.hook_del(hook)
    after_stop = fields()
    uc.emu_start(0x1000, 1 << 63)
    again = fields()
    hits = [(back - 32 + 4 * i, back) for n, back in enumerate(pointers) for i in range(8)
            if after_hlt[n][i] == again[n][i] == 1 and after_stop[n][i] == 0]
    del stop_later, uc
    if len(hits) != 1:
        raise EmulatorError(f"cannot find CPUState.halted before Unicorn's CPU state: candidates {hits}")
    _offsets = hits[0]
    return _offsets


class HaltedFlag:
    """``CPUState.halted`` of one engine, read in place."""

    def __init__(self, uc: Uc, cpu_address: int):
        halted, back = find_halted_offset()
        pointer = ctypes.c_uint64.from_address(cpu_address + back)
        if pointer.value != _handle(uc):
            raise EmulatorError("CPUState.uc does not point back at this engine: Unicorn's X86CPU layout differs")
        self._flag = ctypes.c_uint32.from_address(cpu_address + halted)

    @property
    def value(self) -> bool:
        """True when the last ``uc_emu_start`` ended in ``hlt``."""
        return bool(self._flag.value)
