"""Exception and interrupt delivery through the guest's IVT or IDT, done as the CPU does it.

Unicorn hands every exception to a ``UC_HOOK_INTR`` hook and skips QEMU's own
delivery code, so this module does the delivery (Intel SDM vol. 3, chapter 6):

- real mode: IVT entry ``CS:IP`` at IDTR.base + 4 * vector; push FLAGS, CS, IP;
  clear IF, TF, AC, RF;
- 32-bit protected mode: 8-byte IDT gates (16/32-bit interrupt and trap gates),
  limit, type, present and DPL checks, a stack switch to SS0:ESP0 (SS1/SS2) from
  the TSS when the handler is more privileged, frame ``[SS, ESP,] EFLAGS, CS,
  EIP[, error code]``;
- long mode: 16-byte gates, RSP0..2 or IST from the 64-bit TSS, the stack
  aligned to 16, frame ``SS, RSP, RFLAGS, CS, RIP[, error code]`` always.

For a fault (:data:`FAULT_VECTORS`, not raised by ``int n``) RF is set in
RFLAGS before the frame is pushed, so the pushed image has RF = 1 (SDM vol. 3,
18.3.1.1); the delivery then clears RF, as the CPU does.  When the delivery
itself fails and the faults end in a triple fault, RF stays set in RFLAGS, as
KVM leaves it (it sets RF before it injects a fault).

Interrupt gates clear IF, trap gates do not.  Software ``int n`` (and ``int3``,
``into``) checks the gate's DPL against the CPL (#GP(vector * 8 + 2) when it is
lower) and pushes no error code.  A fault raised while delivering combines with
the first one as in SDM table 6-5: two contributory faults, or a page fault
followed by a contributory fault or page fault, become #DF (error code 0); a
fault while delivering #DF is a triple fault (:class:`TripleFault`).  Task
gates and virtual-8086 mode are not modelled (:class:`DeliveryUnsupported`).

Guest-physical memory with no RAM behind it (the MMIO hole above RAM) is
treated during a delivery as KVM treats it (measured on kvm_pvm; the SDM
defines no outcome for an access to where no memory is, and bare metal would
hand it to the bus):

- a paging-structure entry there reads as not present: #PF with P = 0 (KVM's
  guest page walker fails the same way, and a normal store through such a
  table gets that #PF on KVM too);
- reading a gate, a descriptor or the TSS there, or writing a frame word
  there, makes the delivery fail: the exception being delivered becomes #DF
  (error code 0), and a #DF that cannot be delivered is a triple fault, as in
  SDM vol. 3, 6.15 "Interrupt 8".  A #DF gate with an IST stack in RAM
  therefore catches a fault pushed onto a stack in the MMIO hole, on both
  backends.

A #PF's error code is the CPU's: QEMU raises a read-modify-write
instruction's #PF from its load (W/R = 0), the CPU and KVM report a write;
:meth:`ExceptionDelivery.page_fault_error_code` (and trap_replay.c) set W/R
for such an instruction (:func:`reads_and_writes_memory`).

Linear addresses (IDT, GDT, TSS, stack) are translated by the page walk of
:mod:`labkit.emu.page_walk` (no paging, 32-bit, PAE and 4-level paging), which
sets the accessed and dirty bits like the CPU.  Translations are cached here like a TLB: the cache is
dropped at each run and whenever CR0, CR3 or CR4 change; a guest that edits the
page-table entries of its IDT, GDT, TSS or stack pages in the middle of a run
and only uses ``invlpg`` keeps seeing the old mapping during delivery.

Fast path: after a successful long-mode delivery its outcome is kept as a plan,
keyed by (hflags, software, vector), so ring-0 and ring-3 faults on one vector
keep separate plans.  The next time, :meth:`ExceptionDelivery.deliver_fast`
compares what the delivery read (LDTR, TR, GDTR, IDTR and CR0..CR4 as one
136-byte slice, where only CR2 may differ; the IDT gate's two qwords; the code
descriptor's qword) with the plan, reads RSP0/IST from the TSS afresh, and only pushes the frame and loads
the cached segment state.  Nothing is watched: a guest that rewrites a gate, a
descriptor, the TSS stack pointer or a table register between two faults is
delivered as the new values say.  (A write hook on the table pages would avoid
the compares, but any UC_HOOK_MEM_WRITE slows every guest store: about 25 % of
compute speed here.)  RFLAGS is computed from QEMU's lazy condition codes
(:mod:`labkit.emu.lazy_flags`) instead of asking Unicorn, which costs about
0.5 us per call through ctypes; the formulas are checked against
``uc_reg_read`` once per process (a CC_OP that disagrees is an EmulatorError
at start-up) and a CC_OP outside the table falls back to it.

Where a C compiler is available the same plans are also handed to
``trap_replay.c`` (:mod:`labkit.emu.native`), whose UC_HOOK_INTR callback
replays them without entering Python and passes everything else to this module.
It makes the same checks, and in addition needs the frame on the linear page
the plan's frame went to (else Python delivers, and records a plan for the new page).
"""

from __future__ import annotations

import struct
from typing import Callable

from labkit.emu import cpu_state as S
from labkit.emu.lazy_flags import (  # noqa: F401 - re-exported where they were imported from before
    _FLAG_TABLE, ARITHMETIC, CC_A, CC_C, CC_O, CC_P, CC_S, CC_Z, arithmetic_flags, checked_flag_table,
)
from labkit.emu.native import NativeTrapReplay
from labkit.emu.page_walk import PageFault, TableOutsideRam, walk
from labkit.x86.arch import DESC_B, DESC_CODE, DESC_CONFORMING, DESC_G, DESC_L, DESC_P, DESC_S, DESC_WRITABLE
from labkit.x86.arch import ERROR_CODE_VECTORS as HAS_ERROR_CODE
from labkit.x86.arch import RFLAGS_AC as AC, RFLAGS_IF as IF, RFLAGS_NT as NT, RFLAGS_RF as RF, RFLAGS_TF as TF
from labkit.x86.arch import RFLAGS_VM as VM

FAULT_VECTORS = frozenset({0, 5, 6, 7, 10, 11, 12, 13, 14, 16, 17, 19, 20, 21})
"""Fault-class exceptions: the CPU sets RF in the RFLAGS image it pushes for them (SDM vol. 3, 18.3.1.1:
"for any fault-class exception except a debug exception generated in response to an instruction
breakpoint, the value pushed for RF is 1"; labkit sets no instruction breakpoints).  Not for traps
(#DB, #BP, #OF), aborts (#DF, #MC), software ``int n`` or external interrupts.  trap_replay.c's
FAULT_VECTORS is the same set as a bit mask."""
CONTRIBUTORY = frozenset({0, 10, 11, 12, 13})


_HFLAGS = S.HFLAGS // 4
_EFLAGS = S.EFLAGS // 8
_EIP = S.EIP // 8
_RSP = S.RSP_INDEX
_CS_OFFSET = S.SEGS + S.R_CS * S.SEGMENT_SIZE
_SS_OFFSET = S.SEGS + S.R_SS * S.SEGMENT_SIZE
_SYSTEM = slice(S.LDT, S.CR + 40)  # LDTR, TR, GDTR, IDTR, CR0..CR4
_CR2_AT = S.CR + 16 - S.LDT  # CR2 within that slice: a #PF changes it, the plan does not depend on it
_FRAME5 = struct.Struct("<5Q")  # RIP, CS, RFLAGS, RSP, SS from the lowest address up
_FRAME6 = struct.Struct("<6Q")  # error code first

# QEMU's lazy flags (lazy_flags.py): eflags, cc_dst, cc_src, cc_src2, cc_op, df, hflags follow eip
# in CPUX86State.  While the CPU runs, eflags holds no arithmetic flags and no DF.
_HEAD = struct.Struct("<5QIiI")  # eip, eflags, cc_dst, cc_src, cc_src2, cc_op, df, hflags
# From RSP (regs[4]): rsp, eip, eflags, cc_dst, cc_src, cc_src2, cc_op, df, hflags, CS.selector, SS.selector
_TRAP_STATE = struct.Struct("<Q88x5QIiI28xI20xI")
_TRAP_STATE_AT = S.RSP_INDEX * 8
if _TRAP_STATE_AT + 8 + 88 != S.EIP or _TRAP_STATE.size != _SS_OFFSET + 4 - _TRAP_STATE_AT:
    raise ImportError("labkit.emu.delivery's trap-state struct does not match internals.LAYOUT")
if (S.EFLAGS, S.CC_DST, S.CC_SRC, S.CC_SRC2, S.CC_OP, S.DF, S.HFLAGS) != (
        S.EIP + 8, S.EIP + 16, S.EIP + 24, S.EIP + 32, S.EIP + 40, S.EIP + 44, S.EIP + 48):
    raise ImportError("labkit.emu.delivery expects QEMU's CPUX86State order eip .. hflags (internals.LAYOUT)")


_LEGACY_PREFIXES = frozenset({0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3})
_ALU_TO_MEMORY = frozenset(base + low for base in (0x00, 0x08, 0x10, 0x18, 0x20, 0x28, 0x30) for low in (0, 1))
"""ADD, OR, ADC, SBB, AND, SUB, XOR with an r/m destination (opcodes 00/01 .. 30/31; not CMP, 38/39)."""
_READ_MODIFY_WRITE = {
    # one-byte opcode: the ModRM reg fields (None: all) that read and write the r/m operand
    **{opcode: None for opcode in _ALU_TO_MEMORY}, 0x86: None, 0x87: None,          # XCHG
    0x80: frozenset(range(7)), 0x81: frozenset(range(7)), 0x82: frozenset(range(7)),  # group 1 but CMP (/7)
    0x83: frozenset(range(7)),
    0xC0: None, 0xC1: None, 0xD0: None, 0xD1: None, 0xD2: None, 0xD3: None,         # group 2: shifts, rotates
    0xF6: frozenset({2, 3}), 0xF7: frozenset({2, 3}),                                # NOT, NEG (not TEST, MUL, DIV)
    0xFE: frozenset({0, 1}), 0xFF: frozenset({0, 1}),                                # INC, DEC
}
_READ_MODIFY_WRITE_0F = {
    0xA4: None, 0xA5: None, 0xAC: None, 0xAD: None,                                  # SHLD, SHRD
    0xAB: None, 0xB3: None, 0xBB: None, 0xBA: frozenset({5, 6, 7}),                 # BTS, BTR, BTC (not BT)
    0xB0: None, 0xB1: None, 0xC0: None, 0xC1: None, 0xC7: frozenset({1}),           # CMPXCHG, XADD, CMPXCHG8B/16B
}


def reads_and_writes_memory(code: bytes, long_mode: bool) -> bool:
    """Whether the instruction at the start of ``code`` reads and writes one memory operand (ModRM r/m).

    The read-modify-write instructions of the SDM's opcode map (vol. 2, appendix A): ALU operations with
    an r/m destination but CMP, XCHG, the shifts and rotates, NOT, NEG, INC, DEC, SHLD/SHRD, BTS/BTR/BTC,
    CMPXCHG, CMPXCHG8B/16B, XADD.  Legacy prefixes (and REX in 64-bit mode) are skipped.
    """
    at = 0
    while at < len(code) and (code[at] in _LEGACY_PREFIXES or (long_mode and 0x40 <= code[at] <= 0x4F)):
        at += 1
    table = _READ_MODIFY_WRITE
    if at < len(code) and code[at] == 0x0F:
        table, at = _READ_MODIFY_WRITE_0F, at + 1
    if at + 1 >= len(code) or code[at] not in table:
        return False
    fields, modrm = table[code[at]], code[at + 1]
    return modrm >> 6 != 3 and (fields is None or (modrm >> 3) & 7 in fields)


class TripleFault(Exception):
    """A fault while delivering #DF: the CPU shuts down."""


class DeliveryUnsupported(Exception):
    """The guest needs something this delivery does not model (task gates, virtual-8086 mode)."""


class _NoRam(Exception):
    """A delivery access (gate, descriptor, TSS, frame) to guest-physical memory with no RAM behind it."""


class _Fault(Exception):
    def __init__(self, vector: int, error_code: int = 0, cr2: int | None = None):
        super().__init__(vector, error_code)
        self.vector = vector
        self.error_code = error_code
        self.cr2 = cr2


def segment_base(e1: int, e2: int) -> int:
    return (e1 >> 16) | ((e2 & 0xFF) << 16) | (e2 & 0xFF000000)


def segment_limit(e1: int, e2: int) -> int:
    limit = (e1 & 0xFFFF) | (e2 & 0x000F0000)
    return (limit << 12) | 0xFFF if e2 & DESC_G else limit


class ExceptionDelivery:
    """Delivers exceptions for one engine; works on the in-place CPU state and guest RAM."""

    def __init__(self, cpu: S.CpuStateView, ram: memoryview, read_eflags: Callable[[], int]):
        self.cpu = cpu
        self.ram = ram
        self.written: set[int] | None = None
        """While the dirty log is on: the pages this delivery wrote (frames pushed as the CPU would)."""
        self.ram_size = len(ram)
        self.read_eflags = read_eflags
        self._flags = checked_flag_table(cpu, read_eflags)  # verified by internals.verify(), once per process
        self._tlb: dict[int, int] = {}
        self._tlb_key: tuple[int, int, int, int] = (-1, -1, -1, -1)
        self._plans: dict[int, tuple] = {}
        self._record_plan = False
        # Guest RAM as qwords, at offset 0 and at offset 4 (RSP0..2 and IST sit at 4 mod 8 in a TSS).
        self._ram_q = ram.cast("Q")
        self._ram_q4 = ram[4:len(ram) - 4].cast("Q")
        self._views: list[memoryview] = []
        self.deliver_fast = self._fast_path()
        self.native: NativeTrapReplay | None = None
        """The engine's :class:`labkit.emu.native.NativeTrapReplay`, if any: plans are kept there too."""

    def release(self) -> None:
        """Let go of the views of guest RAM (before the RAM is unmapped)."""
        del self.deliver_fast
        for view in (*self._views, self._ram_q, self._ram_q4):
            view.release()

    def flush(self) -> None:
        """Forget cached translations and delivery plans (called at the start of every run)."""
        self._tlb.clear()
        self._plans.clear()
        self._tlb_key = (-1, -1, -1, -1)
        if self.native is not None:
            self.native.flush()

    def rflags(self) -> int:
        """RFLAGS as the guest would push it: QEMU's eflags | lazy arithmetic flags | DF."""
        _eip, eflags, cc_dst, cc_src, cc_src2, cc_op, df, _hflags = _HEAD.unpack_from(self.cpu.bytes, S.EIP)
        function = self._flags[cc_op] if cc_op < 64 else None
        if function is None:
            return self.read_eflags()
        return eflags | function(cc_dst, cc_src, cc_src2) | (df & 0x400)

    def _fast_path(self) -> Callable[[int], bool]:
        """Build ``deliver_fast(vector) -> bool``: replay a long-mode delivery made before, if still valid.

        A plan is looked up by (hflags, software, vector); it is used when LDTR,
        TR, GDTR, IDTR, CR0, CR3, CR4, the IDT gate's two qwords and the code
        descriptor's qword are all as when it was made.  RSP0/IST is read from
        the TSS each time; RFLAGS comes from the lazy flags.  Then the frame is
        one ``struct.pack_into`` into guest RAM, and RSP, CS (and SS), hflags,
        RIP and RFLAGS are stored in place.  Returns False when there is no
        valid plan or the frame would not fit in one cached, RAM-backed page
        (use :meth:`deliver`).  Everything is bound to locals: this runs once
        per guest exception.
        """
        cpu = self.cpu
        raw, q, u32, i32 = cpu.bytes, cpu.q, cpu.u32, cpu.i32
        ram, ram_q = self.ram, self._ram_q
        error_code_index, is_int_index = cpu.deep.error_code // 4, cpu.deep.exception_is_int // 4
        plans_get, tlb_get = self._plans.get, self._tlb.get
        trap_state, trap_state_at = _TRAP_STATE.unpack_from, _TRAP_STATE_AT
        system_view = raw[_SYSTEM]
        self._views = [system_view]
        cr2_at = _CR2_AT
        flags = self._flags
        read_eflags = self.read_eflags
        pack5, pack6 = _FRAME5.pack_into, _FRAME6.pack_into
        rsp_index, eip_index, eflags_index, hflags_index, cs_offset = _RSP, _EIP, _EFLAGS, _HFLAGS, _CS_OFFSET
        struct_error = struct.error
        faults = FAULT_VECTORS

        def deliver_fast(vector: int) -> bool:
            old_rsp, eip, eflags, cc_dst, cc_src, cc_src2, cc_op, df, hflags, cs, ss = trap_state(raw, trap_state_at)
            plan = plans_get(hflags << 9 | i32[is_int_index] << 8 | vector)
            if plan is None:
                return False
            (system, gate, gate_low, gate_high, descriptor, descriptor_value, stack_view, stack_index, tlb_tag,
             frame_size, target, caches, caches_end, hflags_after, keep_mask, error) = plan
            if ram_q[gate] != gate_low or ram_q[gate + 1] != gate_high or ram_q[descriptor] != descriptor_value:
                return False
            now = system_view.tobytes()
            if now != system and (now[:cr2_at] != system[:cr2_at] or now[cr2_at + 8:] != system[cr2_at + 8:]):
                return False
            function = flags[cc_op] if cc_op < 64 else None
            rflags = eflags | function(cc_dst, cc_src, cc_src2) | (df & 0x400) if function else read_eflags()
            if vector in faults and not i32[is_int_index]:
                rflags |= RF  # pushed only: keep_mask clears RF in RFLAGS
            rsp = ((old_rsp if stack_view is None else stack_view[stack_index]) & ~0xF) - frame_size
            page = tlb_get(rsp >> 12 << 2 | tlb_tag)
            if page is None or (rsp & 0xFFF) + frame_size > 0x1000:
                return False
            try:
                if error:
                    pack6(ram, page | (rsp & 0xFFF), i32[error_code_index], eip, cs, rflags, old_rsp, ss)
                else:
                    pack5(ram, page | (rsp & 0xFFF), eip, cs, rflags, old_rsp, ss)
            except struct_error:  # the stack page is not RAM
                return False
            q[rsp_index] = rsp
            raw[cs_offset:caches_end] = caches
            u32[hflags_index] = hflags_after
            q[eip_index] = target
            q[eflags_index] = eflags & keep_mask
            return True

        return deliver_fast

    # --- public entry point --------------------------------------------------------------------

    def deliver(self, vector: int, error_code: int, software: bool, external: bool = False) -> None:
        """Deliver ``vector``; escalate faults during delivery to #DF and a triple fault.

        ``software`` is true for ``int n``/``int3``/``into``: the gate's DPL is checked
        and no error code is pushed.  ``external`` is true for an external interrupt
        (a vector from the interrupt controller): no error code whatever the vector,
        no DPL check (SDM vol. 3, 6.12.1.1), EXT set in the error code of a fault it
        causes, and no fast-path plan is kept (one would be keyed as the exception).
        RIP must already point where the frame's RIP should (the faulting
        instruction for faults, the next one for traps and interrupts).
        """
        ext = 0 if software else 1
        first = not external
        while True:
            try:
                code = error_code if (vector in HAS_ERROR_CODE and not software and not external) else None
                if vector in FAULT_VECTORS and not software and not external:
                    self.cpu.q[_EFLAGS] |= RF  # pushed with the frame; cleared by a delivery that completes
                self._record_plan = first
                self._deliver_once(vector, code, software, ext)
                return
            except _Fault as fault:
                if software:
                    self._rewind_software_interrupt(vector)
                if fault.cr2 is not None:
                    self.cpu.q[(S.CR + 16) // 8] = fault.cr2
                if vector == 8:
                    raise TripleFault() from None
                if (vector in CONTRIBUTORY and fault.vector in CONTRIBUTORY) or (
                        vector == 14 and (fault.vector in CONTRIBUTORY or fault.vector == 14)):
                    vector, error_code = 8, 0
                else:
                    vector, error_code = fault.vector, fault.error_code
            except _NoRam:  # the delivery cannot complete: #DF, as KVM does (see the module docstring)
                if software:
                    self._rewind_software_interrupt(vector)
                if vector == 8:
                    raise TripleFault() from None
                vector, error_code = 8, 0
            software, external, ext = False, False, 1
            first = False

    def page_fault_error_code(self, error_code: int) -> int:
        """A #PF's error code as the CPU reports it: W/R = 1 when a read-modify-write instruction faults.

        QEMU (so Unicorn) raises such an instruction's #PF from its load, with W/R = 0; the CPU checks the
        access as a write (SDM vol. 3, 4.7: W/R is the access that caused the fault), and so does KVM.
        Decodes the instruction at RIP (:func:`reads_and_writes_memory`); a fetch fault (CR2 inside the
        instruction) or code that cannot be read keeps ``error_code``.
        """
        if error_code & 2:
            return error_code
        q = self.cpu.q
        hflags = self.cpu.u32[_HFLAGS]
        rip = q[_EIP] + q[(_CS_OFFSET + S.SEG_BASE) // 8]
        if not hflags & S.HF_CS64_MASK:
            rip &= 0xFFFF_FFFF
        if (q[(S.CR + 16) // 8] - rip) % (1 << 64) < 15:
            return error_code
        user = hflags & 3 == 3
        code = b""
        try:
            while len(code) < 15:
                physical = self._translate(rip + len(code), False, user)
                take = min(15 - len(code), 0x1000 - (physical & 0xFFF), self.ram_size - physical)
                if take <= 0:
                    break
                code += bytes(self.ram[physical:physical + take])
        except _Fault:
            pass
        return error_code | 2 if reads_and_writes_memory(code, bool(hflags & S.HF_CS64_MASK)) else error_code

    def _rewind_software_interrupt(self, vector: int) -> None:
        """Point EIP back at the ``int n``/``int3``/``into`` that failed its checks (a fault, not a trap)."""
        q = self.cpu.q
        eip = q[S.EIP // 8]
        cs_base = q[(S.SEGS + S.R_CS * S.SEGMENT_SIZE + S.SEG_BASE) // 8]
        try:
            two = self._read(cs_base + eip - 2, 2, False)
        except (_Fault, _NoRam):
            two = 0
        length = 2 if two == 0xCD | (vector << 8) else 1
        q[S.EIP // 8] = eip - length

    # --- modes ---------------------------------------------------------------------------------

    def _deliver_once(self, vector: int, error_code: int | None, software: bool, ext: int) -> None:
        q = self.cpu.q
        if not q[S.CR // 8] & 1:
            self._deliver_real(vector)
        elif self.cpu.u32[S.HFLAGS // 4] & S.HF_LMA_MASK:
            self._deliver_long(vector, error_code, software, ext)
        elif q[S.EFLAGS // 8] & VM:
            raise DeliveryUnsupported("exception delivery in virtual-8086 mode is not modelled")
        else:
            self._deliver_protected(vector, error_code, software, ext)

    def _deliver_real(self, vector: int) -> None:
        cpu = self.cpu
        q, u32 = cpu.q, cpu.u32
        idt_base, idt_limit = q[(S.IDT + S.SEG_BASE) // 8], u32[(S.IDT + S.SEG_LIMIT) // 4]
        if vector * 4 + 3 > idt_limit:
            raise _Fault(13, vector * 8 + 2 + 1)
        entry = self._read(idt_base + vector * 4, 4, False)
        ip, cs = entry & 0xFFFF, entry >> 16
        flags = self.rflags() & 0xFFFF
        rsp = q[S.RSP_INDEX]
        ss_base = q[(S.SEGS + S.R_SS * S.SEGMENT_SIZE + S.SEG_BASE) // 8]
        old_cs = u32[(S.SEGS + S.R_CS * S.SEGMENT_SIZE) // 4]
        sp = rsp & 0xFFFF
        for value in (flags, old_cs, q[S.EIP // 8] & 0xFFFF):
            sp = (sp - 2) & 0xFFFF
            self._write(ss_base + sp, 2, value, False)
        q[S.RSP_INDEX] = (rsp & ~0xFFFF) | sp
        cs_offset = S.SEGS + S.R_CS * S.SEGMENT_SIZE
        u32[cs_offset // 4] = cs
        q[(cs_offset + S.SEG_BASE) // 8] = cs << 4
        q[S.EIP // 8] = ip
        q[S.EFLAGS // 8] &= ~(IF | TF | AC | RF)

    def _gate_checks(self, vector: int, dpl: int, present: bool, software: bool, ext: int) -> None:
        cpl = self.cpu.u32[S.HFLAGS // 4] & 3
        if software and dpl < cpl:
            raise _Fault(13, vector * 8 + 2)
        if not present:
            raise _Fault(11, vector * 8 + 2 + ext)

    def _code_segment(self, selector: int, ext: int) -> tuple[int, int, int]:
        """(e1, e2, new CPL) of a gate's target code segment, checked as the CPU does."""
        if selector & 0xFFFC == 0:
            raise _Fault(13, ext)
        e1, e2 = self._descriptor(selector, ext)
        cpl = self.cpu.u32[S.HFLAGS // 4] & 3
        dpl = (e2 >> 13) & 3
        if not e2 & DESC_S or not e2 & DESC_CODE or dpl > cpl:
            raise _Fault(13, (selector & 0xFFFC) + ext)
        if not e2 & DESC_P:
            raise _Fault(11, (selector & 0xFFFC) + ext)
        new_cpl = cpl if e2 & DESC_CONFORMING else dpl
        return e1, e2, new_cpl

    def _deliver_long(self, vector: int, error_code: int | None, software: bool, ext: int) -> None:
        cpu = self.cpu
        q, u32 = cpu.q, cpu.u32
        hflags_before = u32[_HFLAGS]
        system = bytes(cpu.bytes[_SYSTEM])
        idt_base, idt_limit = q[(S.IDT + S.SEG_BASE) // 8], u32[(S.IDT + S.SEG_LIMIT) // 4]
        idt_error = vector * 8 + 2 + ext
        if vector * 16 + 15 > idt_limit:
            raise _Fault(13, idt_error)
        low = self._read(idt_base + vector * 16, 8, False)
        high = self._read(idt_base + vector * 16 + 8, 8, False)
        gate_type = (low >> 40) & 0x1F
        if gate_type not in (0xE, 0xF):
            raise _Fault(13, idt_error)
        self._gate_checks(vector, (low >> 45) & 3, bool(low >> 47 & 1), software, ext)
        selector = (low >> 16) & 0xFFFF
        target = (low & 0xFFFF) | ((low >> 32) & 0xFFFF0000) | ((high & 0xFFFFFFFF) << 32)
        ist = (low >> 32) & 7
        e1, e2, new_cpl = self._code_segment(selector, ext)
        if not e2 & DESC_L or e2 & DESC_B:
            raise _Fault(13, (selector & 0xFFFC) + ext)
        cpl = u32[S.HFLAGS // 4] & 3
        old_rsp = q[S.RSP_INDEX]
        stack_slot = -1
        if ist or new_cpl < cpl:
            offset = 0x24 + (ist - 1) * 8 if ist else 4 + 8 * new_cpl
            rsp = self._tss_read(offset, 8, ext)
            stack_slot = self._physical_if_aligned(q[(S.TR + S.SEG_BASE) // 8] + offset, 8)
        else:
            rsp = old_rsp
        rsp &= ~0xF
        frame = [u32[(S.SEGS + S.R_SS * S.SEGMENT_SIZE) // 4], old_rsp, self.rflags(),
                 u32[(S.SEGS + S.R_CS * S.SEGMENT_SIZE) // 4], q[S.EIP // 8]]
        if error_code is not None:
            frame.append(error_code)
        rsp = (rsp - 8 * len(frame)) & 0xFFFF_FFFF_FFFF_FFFF
        self._write_frame(rsp, frame[::-1], 8, new_cpl == 3)  # lowest address first
        q[S.RSP_INDEX] = rsp
        if new_cpl < cpl:
            cpu.load_segment(S.R_SS, new_cpl, 0, 0, new_cpl << 13)
        cpu.load_segment(S.R_CS, (selector & 0xFFFC) | new_cpl, segment_base(e1, e2), segment_limit(e1, e2), e2)
        q[S.EIP // 8] = target
        keep_mask = ~(TF | NT | RF | VM | (IF if gate_type == 0xE else 0))
        q[S.EFLAGS // 8] &= keep_mask
        if self._record_plan:
            self._keep_plan(hflags_before << 9 | int(software) << 8 | vector, system, idt_base + vector * 16,
                            selector, stack_slot if (ist or new_cpl < cpl) else None, new_cpl, target,
                            new_cpl < cpl, keep_mask, error_code is not None, rsp)

    def _keep_plan(self, key: int, system: bytes, gate_linear: int, selector: int, stack_slot: int | None,
                   new_cpl: int, target: int, switched_ss: bool, keep_mask: int, error: bool, frame_at: int) -> None:
        """Record what :meth:`deliver_fast` (and the C replay) need to replay the delivery just made, if they can."""
        q = self.cpu.q
        gate = self._physical_if_aligned(gate_linear, 16)
        table = S.LDT if selector & 4 else S.GDT
        descriptor = self._physical_if_aligned(q[(table + S.SEG_BASE) // 8] + (selector & ~7), 8)
        if gate < 0 or gate % 8 or descriptor < 0 or descriptor % 8:
            return
        if stack_slot is None:
            stack_view, stack_index = None, 0
        elif stack_slot >= 0 and stack_slot % 8 == 0:
            stack_view, stack_index = self._ram_q, stack_slot // 8
        elif stack_slot >= 4 and stack_slot % 8 == 4:
            stack_view, stack_index = self._ram_q4, (stack_slot - 4) // 8
        else:
            return
        ram_q = self._ram_q
        caches_end = _CS_OFFSET + S.SEGMENT_SIZE * (2 if switched_ss else 1)  # CS, or CS and SS (adjacent)
        caches = bytes(self.cpu.bytes[_CS_OFFSET:caches_end])
        frame_size = 48 if error else 40
        self._plans[key] = (
            system, gate // 8, ram_q[gate // 8], ram_q[gate // 8 + 1], descriptor // 8,
            ram_q[descriptor // 8], stack_view, stack_index, 2 | (new_cpl == 3), frame_size, target,
            caches, caches_end, self.cpu.u32[_HFLAGS], keep_mask, error)
        if self.native is None:
            return
        frame_page = self._physical_if_aligned(frame_at, frame_size, write=True, user=new_cpl == 3)
        if frame_page < 0:
            return
        self.native.keep(key, gate_at=gate, gate=(ram_q[gate // 8], ram_q[gate // 8 + 1]),
                         descriptor_at=descriptor, descriptor=ram_q[descriptor // 8], stack_at=stack_slot,
                         stack_page=frame_at >> 12, stack_frame=frame_page >> 12, target=target,
                         keep_mask=keep_mask, frame_size=frame_size, hflags_after=self.cpu.u32[_HFLAGS],
                         caches=caches, system=system, error=error)

    def _physical_if_aligned(self, linear: int, size: int, write: bool = False, user: bool = False) -> int:
        """Guest-physical address of ``size`` bytes at ``linear`` if they sit in one page of RAM, else -1."""
        if (linear & 0xFFF) + size > 0x1000:
            return -1
        try:
            physical = self._translate(linear, write, user)
        except _Fault:
            return -1
        return physical if physical + size <= self.ram_size else -1

    def _deliver_protected(self, vector: int, error_code: int | None, software: bool, ext: int) -> None:
        cpu = self.cpu
        q, u32 = cpu.q, cpu.u32
        idt_base, idt_limit = q[(S.IDT + S.SEG_BASE) // 8], u32[(S.IDT + S.SEG_LIMIT) // 4]
        idt_error = vector * 8 + 2 + ext
        if vector * 8 + 7 > idt_limit:
            raise _Fault(13, idt_error)
        gate = self._read(idt_base + vector * 8, 8, False)
        e1, e2 = gate & 0xFFFFFFFF, gate >> 32
        gate_type = (e2 >> 8) & 0x1F
        if gate_type == 0x5:
            raise DeliveryUnsupported(f"vector {vector} uses a task gate, which is not modelled")
        if gate_type not in (0x6, 0x7, 0xE, 0xF):
            raise _Fault(13, idt_error)
        self._gate_checks(vector, (e2 >> 13) & 3, bool(e2 & DESC_P), software, ext)
        size = 4 if gate_type & 8 else 2
        selector = e1 >> 16
        target = (e2 & 0xFFFF0000) | (e1 & 0xFFFF)
        if size == 2:
            target &= 0xFFFF
        c1, c2, new_cpl = self._code_segment(selector, ext)
        cpl = u32[S.HFLAGS // 4] & 3
        old_esp = q[S.RSP_INDEX]
        ss_offset = S.SEGS + S.R_SS * S.SEGMENT_SIZE
        old_ss = u32[ss_offset // 4]
        frame = [self.rflags() & 0xFFFFFFFF, u32[(S.SEGS + S.R_CS * S.SEGMENT_SIZE) // 4],
                 q[S.EIP // 8] & 0xFFFFFFFF]
        if new_cpl < cpl:
            tss_type = (u32[(S.TR + S.SEG_FLAGS) // 4] >> 8) & 0xF
            if tss_type in (9, 11):
                esp = self._tss_read(4 + 8 * new_cpl, 4, ext)
                ss = self._tss_read(8 + 8 * new_cpl, 2, ext)
            else:
                esp = self._tss_read(2 + 4 * new_cpl, 2, ext)
                ss = self._tss_read(4 + 4 * new_cpl, 2, ext)
            if ss & 0xFFFC == 0 or ss & 3 != new_cpl:
                raise _Fault(10, (ss & 0xFFFC) + ext)
            s1, s2 = self._descriptor(ss, ext, fault_vector=10)
            if (not s2 & DESC_S or s2 & DESC_CODE or not s2 & DESC_WRITABLE
                    or (s2 >> 13) & 3 != new_cpl):
                raise _Fault(10, (ss & 0xFFFC) + ext)
            if not s2 & DESC_P:
                raise _Fault(12, (ss & 0xFFFC) + ext)
            ss_base, ss_mask = segment_base(s1, s2), (0xFFFFFFFF if s2 & DESC_B else 0xFFFF)
            frame = [old_ss, old_esp & 0xFFFFFFFF] + frame
        else:
            ss_base = q[(ss_offset + S.SEG_BASE) // 8]
            ss_mask = 0xFFFFFFFF if u32[(ss_offset + S.SEG_FLAGS) // 4] & DESC_B else 0xFFFF
            esp = old_esp
        if error_code is not None:
            frame.append(error_code)
        sp = esp & ss_mask
        for value in frame:
            sp = (sp - size) & ss_mask
            self._write(ss_base + sp, size, value & ((1 << (8 * size)) - 1), new_cpl == 3)
        q[S.RSP_INDEX] = (esp & ~ss_mask) | sp if new_cpl == cpl else sp
        if new_cpl < cpl:
            cpu.load_segment(S.R_SS, ss, ss_base, segment_limit(s1, s2), s2)
        cpu.load_segment(S.R_CS, (selector & 0xFFFC) | new_cpl, segment_base(c1, c2), segment_limit(c1, c2), c2)
        q[S.EIP // 8] = target
        q[S.EFLAGS // 8] &= ~(TF | NT | RF | VM | (IF if gate_type in (0x6, 0xE) else 0))

    # --- tables ----------------------------------------------------------------------------------

    def io_permitted(self, port: int, size: int) -> bool:
        """IN/OUT permission: CPL <= IOPL, else the TSS I/O bitmap (SDM vol. 1, 19.5.2)."""
        q, u32 = self.cpu.q, self.cpu.u32
        if not q[S.CR // 8] & 1:
            return True
        eflags = q[S.EFLAGS // 8]
        if not eflags & VM and u32[S.HFLAGS // 4] & 3 <= (eflags >> 12) & 3:
            return True
        if (u32[(S.TR + S.SEG_FLAGS) // 4] >> 8) & 0xF not in (9, 11):
            return False
        base, limit = q[(S.TR + S.SEG_BASE) // 8], u32[(S.TR + S.SEG_LIMIT) // 4]
        try:
            if limit < 0x67:
                return False
            bitmap = self._read(base + 0x66, 2, False)
            where = bitmap + (port >> 3)
            if where + 1 > limit:
                return False
            bits = self._read(base + where, 2, False) >> (port & 7)
        except (_Fault, _NoRam):
            return False
        return not bits & ((1 << size) - 1)

    def _descriptor(self, selector: int, ext: int, fault_vector: int = 13) -> tuple[int, int]:
        q, u32 = self.cpu.q, self.cpu.u32
        table = S.LDT if selector & 4 else S.GDT
        base, limit = q[(table + S.SEG_BASE) // 8], u32[(table + S.SEG_LIMIT) // 4]
        index = selector & ~7
        if index + 7 > limit:
            raise _Fault(fault_vector, (selector & 0xFFFC) + ext)
        value = self._read(base + index, 8, False)
        return value & 0xFFFFFFFF, value >> 32

    def _tss_read(self, offset: int, size: int, ext: int) -> int:
        q, u32 = self.cpu.q, self.cpu.u32
        base, limit = q[(S.TR + S.SEG_BASE) // 8], u32[(S.TR + S.SEG_LIMIT) // 4]
        if offset + size - 1 > limit:
            raise _Fault(10, (u32[S.TR // 4] & 0xFFFC) + ext)
        return self._read(base + offset, size, False)

    # --- memory ----------------------------------------------------------------------------------

    def _write_frame(self, linear: int, values: list[int], size: int, user: bool) -> None:
        if (linear & 0xFFF) + size * len(values) <= 0x1000:
            physical = self._translate(linear, True, user)
            if physical + size * len(values) <= self.ram_size:
                self.ram[physical:physical + size * len(values)] = b"".join(
                    v.to_bytes(size, "little") for v in values)
                if self.written is not None:
                    self.written.add(physical >> 12)
                return
        # Across a page boundary or RAM's end: check every word's page first, so a failed push writes nothing.
        for i in range(len(values)):
            self._check_writable(linear + i * size, size, user)
        for i, value in enumerate(values):
            self._write(linear + i * size, size, value, user)

    def _check_writable(self, linear: int, size: int, user: bool) -> None:
        """_Fault or _NoRam if ``size`` bytes at ``linear`` could not be written by a delivery."""
        for start in {linear, linear + size - 1}:
            if self._translate(start, True, user) >= self.ram_size:
                raise _NoRam()

    def _read(self, linear: int, size: int, user: bool) -> int:
        if (linear & 0xFFF) + size > 0x1000:
            return int.from_bytes(bytes(self._read(linear + i, 1, user) for i in range(size)), "little")
        physical = self._translate(linear, False, user)
        if physical + size > self.ram_size:
            raise _NoRam()
        return int.from_bytes(self.ram[physical:physical + size], "little")

    def _write(self, linear: int, size: int, value: int, user: bool) -> None:
        if (linear & 0xFFF) + size > 0x1000:
            for i in range(size):
                self._write(linear + i, 1, (value >> (8 * i)) & 0xFF, user)
            return
        physical = self._translate(linear, True, user)
        if physical + size > self.ram_size:
            raise _NoRam()
        self.ram[physical:physical + size] = value.to_bytes(size, "little")
        if self.written is not None:
            self.written.add(physical >> 12)

    def _translate(self, linear: int, write: bool, user: bool) -> int:
        """Linear to guest-physical for an access of the delivery itself; #PF (via _Fault) if not mapped."""
        q = self.cpu.q
        cr0 = q[S.CR // 8]
        if not cr0 & 0x80000000:
            return linear & 0xFFFFFFFF if not self.cpu.u32[S.HFLAGS // 4] & S.HF_LMA_MASK else linear
        key = (cr0, q[(S.CR + 24) // 8], q[(S.CR + 32) // 8], self.cpu.u32[S.HFLAGS // 4] & S.HF_LMA_MASK)
        if key != self._tlb_key:
            self.flush()
            self._tlb_key = key
        tag = (linear >> 12) << 2 | write << 1 | user
        page = self._tlb.get(tag)
        if page is None:
            try:
                page = walk(self.ram, linear, write, user, cr0, key[1], key[2], bool(key[3]))
            except PageFault as fault:
                raise _Fault(14, fault.error_code, cr2=fault.address) from None
            except TableOutsideRam:  # read as not present, as KVM's guest page walker does
                raise _Fault(14, (2 if write else 0) | (4 if user else 0), cr2=linear) from None
            self._tlb[tag] = page
        return page | (linear & 0xFFF)
