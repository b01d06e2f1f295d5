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

Interrupt gates clear IF, trap gates do not.  Software ``int n`` (and ``int3``,
``into``) checks the gate's DPL against the CPL (#GP(vector * 8 + 2) when it is
lower) and pushes no error code.  A fault raised while delivering combines with
the first one as in SDM table 6-5: two contributory faults, or a page fault
followed by a contributory fault or page fault, become #DF (error code 0); a
fault while delivering #DF is a triple fault (:class:`TripleFault`).  Task
gates and virtual-8086 mode are not modelled (:class:`DeliveryUnsupported`).

Linear addresses (IDT, GDT, TSS, stack) are translated by a page walk over
guest RAM (no paging, 32-bit, PAE and 4-level paging), which sets the accessed
and dirty bits like the CPU.  Translations are cached like a TLB: the cache is
dropped at each run and whenever CR0, CR3 or CR4 change; a guest that edits the
page-table entries of its IDT, GDT, TSS or stack pages in the middle of a run
and only uses ``invlpg`` keeps seeing the old mapping during delivery.

Fast path: after a successful long-mode delivery the outcome is kept as a plan
per (vector, software); the next time, :meth:`ExceptionDelivery.deliver_fast`
checks that hflags, TR/GDTR/IDTR, CR0/CR3/CR4, the IDT gate's 16 bytes and the
code descriptor's 8 bytes are unchanged and only pushes the frame and loads the
cached segment state (about 2 us here instead of about 12 us).
"""

from __future__ import annotations

import struct

from labkit.emu import cpu_state as S

HAS_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
CONTRIBUTORY = frozenset({0, 10, 11, 12, 13})

TF, IF, NT, RF, VM, AC = 0x100, 0x200, 0x4000, 0x10000, 0x20000, 0x40000
DESC_S = 1 << 12
DESC_P = 1 << 15
DESC_CODE = 1 << 11
DESC_CONFORMING = 1 << 10
DESC_WRITABLE = 1 << 9
DESC_L = 1 << 21
DESC_B = 1 << 22
DESC_G = 1 << 23


_HFLAGS = S.HFLAGS // 4
_CC_OP = S.CC_OP // 4
_DF = S.DF // 4
_EFLAGS = S.EFLAGS // 8
_CC_SRC = S.CC_SRC // 8
_EIP = S.EIP // 8
_RSP = S.REGS // 8 + 4
_CS_OFFSET = S.SEGS + S.R_CS * S.SEGMENT_SIZE
_SS_OFFSET = S.SEGS + S.R_SS * S.SEGMENT_SIZE
_CS_SELECTOR = _CS_OFFSET // 4
_SS_SELECTOR = _SS_OFFSET // 4
_FRAME5 = struct.Struct("<5Q")  # RIP, CS, RFLAGS, RSP, SS from the lowest address up
_FRAME6 = struct.Struct("<6Q")  # error code first


class TripleFault(Exception):
    """A fault while delivering #DF: the CPU shuts down."""


class DeliveryUnsupported(Exception):
    """The guest needs something this delivery does not model (task gates, vm86, tables outside RAM)."""


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

    def __init__(self, cpu: S.CpuStateView, ram: memoryview, read_eflags):
        self.cpu = cpu
        self.ram = ram
        self.ram_size = len(ram)
        self.read_eflags = read_eflags
        self._tlb: dict[int, int] = {}
        self._tlb_key: tuple[int, int, int, int] = (-1, -1, -1, -1)
        self._plans: dict[tuple[int, bool], tuple] = {}
        self._recording: list | None = None

    def flush(self) -> None:
        """Forget cached translations and delivery plans (called at the start of every run)."""
        self._tlb.clear()
        self._plans.clear()
        self._tlb_key = (-1, -1, -1, -1)

    def deliver_fast(self, vector: int, error_code: int, software: bool) -> bool:
        """Replay a long-mode delivery made before for this vector, if nothing it read has changed.

        A plan is kept after each successful long-mode delivery.  It is used only
        when hflags (CPL, mode), TR/GDTR/IDTR, CR0/CR3/CR4, the 16 bytes of the
        IDT gate and the 8 bytes of the code-segment descriptor are all as they
        were; then only RFLAGS, the stack and RIP differ, and they are computed
        here.  Returns False when there is no valid plan (use :meth:`deliver`).
        """
        plan = self._plans.get((vector, software))
        if plan is None:
            return False
        (hflags, system, control, idt_phys, gate, gdt_phys, descriptor, stack_slot, user, target,
         cs_cache, ss_cache, hflags_after, keep_mask, error) = plan
        cpu, ram = self.cpu, self.ram
        raw, q, u32 = cpu.bytes, cpu.q, cpu.u32
        if (u32[_HFLAGS] != hflags or raw[S.TR:S.CR + 16] != system or raw[S.CR + 24:S.CR + 40] != control
                or ram[idt_phys:idt_phys + 16] != gate or ram[gdt_phys:gdt_phys + 8] != descriptor):
            return False
        if u32[_CC_OP] == 1:  # CC_OP_EFLAGS: the arithmetic flags are in CC_SRC, DF in df
            rflags = q[_EFLAGS] | (q[_CC_SRC] & 0x8D5) | (0x400 if cpu.i32[_DF] < 0 else 0)
        else:
            rflags = self.read_eflags()
        old_rsp = q[_RSP]
        rsp = (int.from_bytes(ram[stack_slot:stack_slot + 8], "little") if stack_slot >= 0 else old_rsp) & ~0xF
        if error:
            rsp -= 48
            frame = _FRAME6.pack(error_code, q[_EIP], u32[_CS_SELECTOR], rflags, old_rsp, u32[_SS_SELECTOR])
        else:
            rsp -= 40
            frame = _FRAME5.pack(q[_EIP], u32[_CS_SELECTOR], rflags, old_rsp, u32[_SS_SELECTOR])
        page = self._tlb.get((rsp >> 12) << 2 | 2 | user)
        end = (rsp & 0xFFF) + len(frame)
        if page is None or end > 0x1000 or page + end > self.ram_size:
            return False
        physical = page | (rsp & 0xFFF)
        ram[physical:physical + len(frame)] = frame
        q[_RSP] = rsp
        raw[_CS_OFFSET:_CS_OFFSET + S.SEGMENT_SIZE] = cs_cache
        if ss_cache is not None:
            raw[_SS_OFFSET:_SS_OFFSET + S.SEGMENT_SIZE] = ss_cache
        u32[_HFLAGS] = hflags_after
        q[_EIP] = target
        q[_EFLAGS] &= keep_mask
        return True

    # --- public entry point --------------------------------------------------------------------

    def deliver(self, vector: int, error_code: int, software: bool) -> None:
        """Deliver ``vector``; escalate faults during delivery to #DF and a triple fault.

        ``software`` is true for ``int n``/``int3``/``into``: the gate's DPL is checked
        and no error code is pushed.  RIP must already point where the frame's RIP
        should (the faulting instruction for faults, the next one for traps).
        """
        ext = 0 if software else 1
        first = True
        while True:
            try:
                code = error_code if (vector in HAS_ERROR_CODE and not software) else None
                self._recording = [] if first else None
                self._deliver_once(vector, code, software, ext)
                if self._recording:
                    self._plans[(vector, software)] = tuple(self._recording)
                self._recording = None
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
                software, ext = False, 1
                first = False

    def _rewind_software_interrupt(self, vector: int) -> None:
        """Point EIP back at the ``int n``/``int3``/``into`` that failed its checks (a fault, not a trap)."""
        q = self.cpu.q
        eip = q[S.EIP // 8]
        cs_base = q[(S.SEGS + S.R_CS * S.SEGMENT_SIZE + 8) // 8]
        try:
            two = self._read(cs_base + eip - 2, 2, False)
        except (_Fault, DeliveryUnsupported):
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
        idt_base, idt_limit = q[(S.IDT + 8) // 8], u32[(S.IDT + 16) // 4]
        if vector * 4 + 3 > idt_limit:
            raise _Fault(13, vector * 8 + 2 + 1)
        entry = self._read(idt_base + vector * 4, 4, False)
        ip, cs = entry & 0xFFFF, entry >> 16
        flags = self.read_eflags() & 0xFFFF
        rsp = q[S.REGS // 8 + 4]
        ss_base = q[(S.SEGS + S.R_SS * S.SEGMENT_SIZE + 8) // 8]
        old_cs = u32[(S.SEGS + S.R_CS * S.SEGMENT_SIZE) // 4]
        sp = rsp & 0xFFFF
        for value in (flags, old_cs, q[S.EIP // 8] & 0xFFFF):
            sp = (sp - 2) & 0xFFFF
            self._write(ss_base + sp, 2, value, False)
        q[S.REGS // 8 + 4] = (rsp & ~0xFFFF) | sp
        cs_offset = S.SEGS + S.R_CS * S.SEGMENT_SIZE
        u32[cs_offset // 4] = cs
        q[(cs_offset + 8) // 8] = cs << 4
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
        system, control = bytes(cpu.bytes[S.TR:S.CR + 16]), bytes(cpu.bytes[S.CR + 24:S.CR + 40])
        idt_base, idt_limit = q[(S.IDT + 8) // 8], u32[(S.IDT + 16) // 4]
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
        old_rsp = q[S.REGS // 8 + 4]
        stack_slot = -1
        if ist or new_cpl < cpl:
            offset = 0x24 + (ist - 1) * 8 if ist else 4 + 8 * new_cpl
            rsp = self._tss_read(offset, 8, ext)
            stack_slot = self._physical_if_aligned(q[(S.TR + 8) // 8] + offset, 8)
        else:
            rsp = old_rsp
        rsp &= ~0xF
        frame = [u32[(S.SEGS + S.R_SS * S.SEGMENT_SIZE) // 4], old_rsp, self.read_eflags(),
                 u32[(S.SEGS + S.R_CS * S.SEGMENT_SIZE) // 4], q[S.EIP // 8]]
        if error_code is not None:
            frame.append(error_code)
        rsp = (rsp - 8 * len(frame)) & 0xFFFF_FFFF_FFFF_FFFF
        self._write_frame(rsp, frame[::-1], 8, new_cpl == 3)  # lowest address first
        q[S.REGS // 8 + 4] = rsp
        if new_cpl < cpl:
            cpu.load_segment(S.R_SS, new_cpl, 0, 0, new_cpl << 13)
        cpu.load_segment(S.R_CS, (selector & 0xFFFC) | new_cpl, segment_base(e1, e2), segment_limit(e1, e2), e2)
        q[S.EIP // 8] = target
        keep_mask = ~(TF | NT | RF | VM | (IF if gate_type == 0xE else 0))
        q[S.EFLAGS // 8] &= keep_mask
        if self._recording is not None:
            idt_phys = self._physical_if_aligned(idt_base + vector * 16, 16)
            table = S.LDT if selector & 4 else S.GDT
            gdt_phys = self._physical_if_aligned(q[(table + 8) // 8] + (selector & ~7), 8)
            if idt_phys >= 0 and gdt_phys >= 0 and (stack_slot >= 0 or not (ist or new_cpl < cpl)):
                raw = cpu.bytes
                self._recording.extend((
                    hflags_before, system, control, idt_phys, bytes(self.ram[idt_phys:idt_phys + 16]),
                    gdt_phys, bytes(self.ram[gdt_phys:gdt_phys + 8]), stack_slot, int(new_cpl == 3), target,
                    bytes(raw[_CS_OFFSET:_CS_OFFSET + S.SEGMENT_SIZE]),
                    bytes(raw[_SS_OFFSET:_SS_OFFSET + S.SEGMENT_SIZE]) if new_cpl < cpl else None,
                    u32[_HFLAGS], keep_mask, error_code is not None))

    def _physical_if_aligned(self, linear: int, size: int) -> int:
        """Guest-physical address of ``size`` bytes at ``linear`` if they sit in one page of RAM, else -1."""
        if (linear & 0xFFF) + size > 0x1000:
            return -1
        try:
            physical = self._translate(linear, False, False)
        except (_Fault, DeliveryUnsupported):
            return -1
        return physical if physical + size <= self.ram_size else -1

    def _deliver_protected(self, vector: int, error_code: int | None, software: bool, ext: int) -> None:
        cpu = self.cpu
        q, u32 = cpu.q, cpu.u32
        idt_base, idt_limit = q[(S.IDT + 8) // 8], u32[(S.IDT + 16) // 4]
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
        old_esp = q[S.REGS // 8 + 4]
        ss_offset = S.SEGS + S.R_SS * S.SEGMENT_SIZE
        old_ss = u32[ss_offset // 4]
        frame = [self.read_eflags() & 0xFFFFFFFF, u32[(S.SEGS + S.R_CS * S.SEGMENT_SIZE) // 4],
                 q[S.EIP // 8] & 0xFFFFFFFF]
        if new_cpl < cpl:
            tss_type = (u32[(S.TR + 20) // 4] >> 8) & 0xF
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
            ss_base = q[(ss_offset + 8) // 8]
            ss_mask = 0xFFFFFFFF if u32[(ss_offset + 20) // 4] & DESC_B else 0xFFFF
            esp = old_esp
        if error_code is not None:
            frame.append(error_code)
        sp = esp & ss_mask
        for value in frame:
            sp = (sp - size) & ss_mask
            self._write(ss_base + sp, size, value & ((1 << (8 * size)) - 1), new_cpl == 3)
        q[S.REGS // 8 + 4] = (esp & ~ss_mask) | sp if new_cpl == cpl else sp
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
        if (u32[(S.TR + 20) // 4] >> 8) & 0xF not in (9, 11):
            return False
        base, limit = q[(S.TR + 8) // 8], u32[(S.TR + 16) // 4]
        try:
            if limit < 0x67:
                return False
            bitmap = self._read(base + 0x66, 2, False)
            where = bitmap + (port >> 3)
            if where + 1 > limit:
                return False
            bits = self._read(base + where, 2, False) >> (port & 7)
        except (_Fault, DeliveryUnsupported):
            return False
        return not bits & ((1 << size) - 1)

    def _descriptor(self, selector: int, ext: int, fault_vector: int = 13) -> tuple[int, int]:
        q, u32 = self.cpu.q, self.cpu.u32
        table = S.LDT if selector & 4 else S.GDT
        base, limit = q[(table + 8) // 8], u32[(table + 16) // 4]
        index = selector & ~7
        if index + 7 > limit:
            raise _Fault(fault_vector, (selector & 0xFFFC) + ext)
        value = self._read(base + index, 8, False)
        return value & 0xFFFFFFFF, value >> 32

    def _tss_read(self, offset: int, size: int, ext: int) -> int:
        q, u32 = self.cpu.q, self.cpu.u32
        base, limit = q[(S.TR + 8) // 8], u32[(S.TR + 16) // 4]
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
                return
        for i, value in enumerate(values):
            self._write(linear + i * size, size, value, user)

    def _read(self, linear: int, size: int, user: bool) -> int:
        if (linear & 0xFFF) + size > 0x1000:
            return int.from_bytes(bytes(self._read(linear + i, 1, user) for i in range(size)), "little")
        physical = self._translate(linear, False, user)
        if physical + size > self.ram_size:
            raise DeliveryUnsupported(f"a system table at guest-physical {physical:#x} lies outside RAM")
        return int.from_bytes(self.ram[physical:physical + size], "little")

    def _write(self, linear: int, size: int, value: int, user: bool) -> None:
        if (linear & 0xFFF) + size > 0x1000:
            for i in range(size):
                self._write(linear + i, 1, (value >> (8 * i)) & 0xFF, user)
            return
        physical = self._translate(linear, True, user)
        if physical + size > self.ram_size:
            raise DeliveryUnsupported(f"an exception stack at guest-physical {physical:#x} lies outside RAM")
        self.ram[physical:physical + size] = value.to_bytes(size, "little")

    def _translate(self, linear: int, write: bool, user: bool) -> int:
        """Linear to guest-physical for an access of the delivery itself; #PF (via _Fault) if not mapped."""
        q = self.cpu.q
        cr0 = q[S.CR // 8]
        if not cr0 & 0x80000000:
            return linear & 0xFFFFFFFF if not self.cpu.u32[S.HFLAGS // 4] & S.HF_LMA_MASK else linear
        key = (cr0, q[(S.CR + 24) // 8], q[(S.CR + 32) // 8], self.cpu.u32[S.HFLAGS // 4] & S.HF_LMA_MASK)
        if key != self._tlb_key:
            self._tlb.clear()
            self._plans.clear()
            self._tlb_key = key
        tag = (linear >> 12) << 2 | write << 1 | user
        page = self._tlb.get(tag)
        if page is None:
            page = self._walk(linear, write, user, cr0, key[1], key[2], bool(key[3]))
            self._tlb[tag] = page
        return page | (linear & 0xFFF)

    def _walk(self, linear: int, write: bool, user: bool, cr0: int, cr3: int, cr4: int, long_mode: bool) -> int:
        ram, size = self.ram, self.ram_size
        wp = bool(cr0 & 0x10000)

        def fail(present: bool) -> _Fault:
            code = (1 if present else 0) | (2 if write else 0) | (4 if user else 0)
            return _Fault(14, code, cr2=linear)

        def entry_at(address: int, width: int) -> int:
            if address + width > size:
                raise DeliveryUnsupported(f"a page table at guest-physical {address:#x} lies outside RAM")
            return int.from_bytes(ram[address:address + width], "little")

        def mark(address: int, width: int, value: int, bits: int) -> None:
            if value & bits != bits:
                ram[address:address + width] = (value | bits).to_bytes(width, "little")

        if long_mode or cr4 & 0x20:  # PAE or 4-level: 8-byte entries
            mask = 0x000F_FFFF_FFFF_F000
            if long_mode:
                table = cr3 & mask
                levels = [(39, 0), (30, 1), (21, 1), (12, 0)]
            else:
                pdpte_address = (cr3 & 0xFFFFFFE0) + ((linear >> 30) & 3) * 8
                pdpte = entry_at(pdpte_address, 8)
                if not pdpte & 1:
                    raise fail(False)
                table = pdpte & mask
                levels = [(21, 1), (12, 0)]
            allowed_user, allowed_write = True, True
            for shift, may_be_large in levels:
                address = table + ((linear >> shift) & 0x1FF) * 8
                entry = entry_at(address, 8)
                if not entry & 1:
                    raise fail(False)
                allowed_user &= bool(entry & 4)
                allowed_write &= bool(entry & 2)
                leaf = shift == 12 or (may_be_large and entry & 0x80)
                mark(address, 8, entry, 0x20 | (0x40 if (write and leaf) else 0))
                if leaf:
                    if (user and not allowed_user) or (write and not allowed_write and (user or wp)):
                        raise fail(True)
                    page_mask = (1 << shift) - 1
                    return (entry & mask & ~page_mask) | (linear & page_mask & ~0xFFF)
                table = entry & mask
        # 32-bit paging: 4-byte entries, 4 MiB pages with CR4.PSE
        pde_address = (cr3 & 0xFFFFF000) + ((linear >> 22) & 0x3FF) * 4
        pde = entry_at(pde_address, 4)
        if not pde & 1:
            raise fail(False)
        if pde & 0x80 and cr4 & 0x10:
            if (user and not pde & 4) or (write and not pde & 2 and (user or wp)):
                raise fail(True)
            mark(pde_address, 4, pde, 0x20 | (0x40 if write else 0))
            return (pde & 0xFFC00000) | (linear & 0x3FF000)
        mark(pde_address, 4, pde, 0x20)
        pte_address = (pde & 0xFFFFF000) + ((linear >> 12) & 0x3FF) * 4
        pte = entry_at(pte_address, 4)
        if not pte & 1:
            raise fail(False)
        if (user and not (pde & pte & 4)) or (write and not (pde & pte & 2) and (user or wp)):
            raise fail(True)
        mark(pte_address, 4, pte, 0x20 | (0x40 if write else 0))
        return pte & 0xFFFFF000
