"""One engine's CPU state (QEMU's ``CPUX86State``) as a writable view, with the accessors the backend needs.

Where the state is and how it is laid out is :mod:`labkit.emu.internals`' job
(reached through ``uc->cpu->env_ptr``, every field probed at start-up); this
module only wraps the bytes.  The offsets and bits below are
:data:`internals.LAYOUT`'s, kept under the names the backend and the delivery
use (``S.EIP``, ``S.HFLAGS``, ``S.R_CS``, ...).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from unicorn import Uc

from labkit.emu import internals
from labkit.emu.internals import (  # noqa: F401 - re-exported: the names the backend uses as S.*
    CC_DST, CC_OP, CC_OP_EFLAGS, CC_SRC, CC_SRC2, CR, DF, EFLAGS, EIP, GDT, HF_ADDSEG_MASK,
    HF_CPL_MASK, HF_CS32_MASK, HF_CS64_MASK, HF_INHIBIT_IRQ_MASK, HF_LMA_MASK, HF_SS32_MASK, HFLAGS, IDT, LAYOUT, LDT,
    R_CS, R_DS, R_ES, R_FS, R_GS, R_SS, REGS, RSP_INDEX, SEG_BASE, SEG_FLAGS, SEG_LIMIT, SEGMENT_SIZE, SEGS, TR,
)
from labkit.x86.arch import DESC_B, DESC_L, RFLAGS_ARITHMETIC, RFLAGS_DF, RFLAGS_FIXED  # also S.DESC_* for the backend


@dataclass(frozen=True)
class DeepFields:
    """Offsets in CPUX86State beyond the first block of registers (from :data:`internals.LAYOUT`, probed)."""

    error_code: int
    exception_is_int: int
    old_exception: int
    efer: int
    state_size: int
    """Bytes of CPUX86State that uc_context_save copies (everything labkit touches lies below)."""


def find_deep_fields() -> DeepFields:
    """Run every probe of :mod:`labkit.emu.internals` (once per process) and return the deep offsets."""
    layout = internals.verify()
    return DeepFields(error_code=layout.error_code, exception_is_int=layout.exception_is_int,
                      old_exception=layout.old_exception, efer=layout.efer, state_size=layout.end_reset_fields)


def locate_state(uc: Uc) -> int:
    """Address of ``uc``'s CPUX86State (``uc->cpu->env_ptr``, checked); see :func:`internals.locate`."""
    return internals.locate(uc)


class CpuStateView:
    """A writable view of one engine's CPUX86State, with the accessors the backend needs."""

    def __init__(self, uc: Uc):
        self.deep = find_deep_fields()
        self.address = internals.locate(uc)
        raw = (ctypes.c_char * self.deep.state_size).from_address(self.address)
        self.bytes = memoryview(raw).cast("B")
        self.q = self.bytes.cast("Q")  # 64-bit fields, index = offset // 8
        self.u32 = self.bytes.cast("I")  # 32-bit fields, index = offset // 4
        self.i32 = self.bytes.cast("i")

    def segment(self, offset: int) -> tuple[int, int, int, int]:
        """(selector, base, limit, flags) of the SegmentCache at ``offset``."""
        return (self.u32[offset // 4], self.q[(offset + SEG_BASE) // 8], self.u32[(offset + SEG_LIMIT) // 4],
                self.u32[(offset + SEG_FLAGS) // 4])

    def load_segment(self, index: int, selector: int, base: int, limit: int, flags: int) -> None:
        """Load segs[index]'s hidden cache and update hflags as QEMU's cpu_x86_load_seg_cache does.

        Loading SS sets the CPL to the descriptor's DPL; loading CS sets the
        CS32/CS64 bits.  No descriptor is read and no check is made: callers
        have done the checks the instruction or event requires.
        """
        offset = SEGS + index * SEGMENT_SIZE
        u32, q = self.u32, self.q
        u32[offset // 4] = selector
        q[(offset + SEG_BASE) // 8] = base
        u32[(offset + SEG_LIMIT) // 4] = limit
        u32[(offset + SEG_FLAGS) // 4] = flags
        hflags = u32[HFLAGS // 4]
        if index == R_CS:
            if hflags & HF_LMA_MASK and flags & DESC_L:
                hflags |= HF_CS32_MASK | HF_SS32_MASK | HF_CS64_MASK
            else:
                hflags = (hflags & ~(HF_CS32_MASK | HF_CS64_MASK)) | (HF_CS32_MASK if flags & DESC_B else 0)
        elif index == R_SS:
            hflags = (hflags & ~HF_CPL_MASK) | ((flags >> 13) & 3)
        new = HF_SS32_MASK if u32[(SEGS + R_SS * SEGMENT_SIZE + SEG_FLAGS) // 4] & DESC_B else 0
        if hflags & HF_CS64_MASK:
            pass
        elif not (q[CR // 8] & 1) or q[EFLAGS // 8] & (1 << 17) or not hflags & HF_CS32_MASK:
            new |= HF_ADDSEG_MASK
        elif q[(SEGS + R_DS * SEGMENT_SIZE + SEG_BASE) // 8] | q[(SEGS + R_ES * SEGMENT_SIZE + SEG_BASE) // 8] | \
                q[(SEGS + R_SS * SEGMENT_SIZE + SEG_BASE) // 8]:
            new |= HF_ADDSEG_MASK
        u32[HFLAGS // 4] = (hflags & ~(HF_SS32_MASK | HF_ADDSEG_MASK)) | new

    def set_rflags(self, rflags: int) -> None:
        """Set RFLAGS in place as QEMU keeps it inside a run: CC_SRC holds the arithmetic flags, df the DF."""
        self.q[CC_SRC // 8] = rflags & RFLAGS_ARITHMETIC
        self.u32[CC_OP // 4] = CC_OP_EFLAGS
        self.i32[DF // 4] = -1 if rflags & RFLAGS_DF else 1
        self.q[EFLAGS // 8] = (rflags & ~(RFLAGS_ARITHMETIC | RFLAGS_DF)) | RFLAGS_FIXED

    def release(self) -> None:
        for view in (self.i32, self.u32, self.q, self.bytes):
            view.release()


CpuState = CpuStateView
"""The name the issue uses for this view."""
