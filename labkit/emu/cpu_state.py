"""Direct access to Unicorn's CPU state (QEMU's ``CPUX86State``) in place.

Unicorn's API cannot do three things the emulation backend needs while a hook
runs: read the error code of the exception being raised, reset the CPU's
``old_exception`` field (unicorn#1883: without the reset, the second #GP after
a hooked #GP is raised as #DF and the third as a triple fault), and move RIP,
RSP, segments and the CPL without ``uc_reg_write(RIP)``, which forces Unicorn
out of its translated block and costs about 6 us per call.

So this module finds the ``CPUX86State`` structure in the process's memory and
exposes it as a writable memoryview.  Nothing is hard-coded without a check:

1. The structure's *address* is found by writing a random pattern into the 16
   general-purpose registers with ``uc_reg_write`` and searching the memory
   blocks that the ``uc_struct`` points to for it; the hit is verified by
   changing RAX through the API and seeing the byte change, and by comparing
   the whole block with ``uc_context_save``'s copy (which is a header followed
   by ``CPUX86State`` itself).
2. The *layout* of the first fields (``regs``, ``eip``, ``eflags``, ``hflags``,
   ``segs``, ``gdt``, ``idt``, ``cr``) is QEMU 5.0's; each offset is checked by
   writing a register through the API and reading it back in place.
3. ``efer`` is the one qword after ``cr[]`` that follows three WRMSRs to EFER.
4. The deep fields (``error_code``, ``exception_is_int``, ``old_exception``)
   are *found* by comparing the state before and after faults provoked in a
   scratch engine: ``old_exception`` is the one int32 that goes from -1 to 13
   on a #GP and from -1 to 0 on a #DE.  The fix is then verified: two hooked
   #GPs in a row arrive as 13 then 8 without the reset and as 13, 13 with it.

Any failed check raises :class:`labkit.errors.EmulatorError` naming the check;
Unicorn is pinned to 2.1.4 in pyproject.toml for this reason.
"""

from __future__ import annotations

import bisect
import ctypes
import os
import random
import struct
from dataclasses import dataclass

from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_32, UC_MODE_64, UC_PROT_ALL, Uc
from unicorn import x86_const as X

from labkit.errors import EmulatorError

# QEMU 5.0 CPUX86State layout (target/i386/cpu.h), x86_64 target.
REGS = 0
EIP = 128
EFLAGS = 136
CC_SRC = 152
CC_OP = 168  # uint32; CC_OP_EFLAGS = 1
DF = 172  # int32: +1 or -1
HFLAGS = 176
SEGS = 184
SEGMENT_SIZE = 24  # struct SegmentCache { u32 selector; u64 base; u32 limit; u32 flags; }
LDT = SEGS + 6 * SEGMENT_SIZE
TR = LDT + SEGMENT_SIZE
GDT = TR + SEGMENT_SIZE
IDT = GDT + SEGMENT_SIZE
CR = IDT + SEGMENT_SIZE  # target_ulong cr[5]

# Segment indexes in segs[] (QEMU's R_ES ... R_GS).
R_ES, R_CS, R_SS, R_DS, R_FS, R_GS = range(6)

# hflags bits (QEMU target/i386/cpu.h).
HF_CPL_MASK = 0x3
HF_INHIBIT_IRQ_MASK = 1 << 3
HF_CS32_MASK = 1 << 4
HF_SS32_MASK = 1 << 5
HF_ADDSEG_MASK = 1 << 6
HF_LMA_MASK = 1 << 14
HF_CS64_MASK = 1 << 15

DESC_B_MASK = 1 << 22
DESC_L_MASK = 1 << 21
HF_CS64_MASK = 1 << 15

GPR_IDS = (
    X.UC_X86_REG_RAX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX, X.UC_X86_REG_RBX,
    X.UC_X86_REG_RSP, X.UC_X86_REG_RBP, X.UC_X86_REG_RSI, X.UC_X86_REG_RDI,
    X.UC_X86_REG_R8, X.UC_X86_REG_R9, X.UC_X86_REG_R10, X.UC_X86_REG_R11,
    X.UC_X86_REG_R12, X.UC_X86_REG_R13, X.UC_X86_REG_R14, X.UC_X86_REG_R15,
)
"""Unicorn ids in QEMU's regs[] order (RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15)."""
GPR_IDS32 = (
    X.UC_X86_REG_EAX, X.UC_X86_REG_ECX, X.UC_X86_REG_EDX, X.UC_X86_REG_EBX,
    X.UC_X86_REG_ESP, X.UC_X86_REG_EBP, X.UC_X86_REG_ESI, X.UC_X86_REG_EDI,
)


@dataclass(frozen=True)
class DeepFields:
    """Offsets in CPUX86State found by provoking faults (see the module docstring)."""

    error_code: int
    exception_is_int: int
    old_exception: int
    efer: int
    state_size: int
    """Bytes of CPUX86State that uc_context_save copies (everything this module touches lies below)."""


_deep_fields: DeepFields | None = None


def _writable_regions() -> tuple[list[int], list[int]]:
    """Start and end addresses of this process's readable+writable mappings (/proc/self/maps)."""
    starts, ends = [], []
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split()[:2]
            if perms.startswith("rw"):
                low, high = (int(x, 16) for x in span.split("-"))
                starts.append(low)
                ends.append(high)
    return starts, ends


def _handle_address(uc: Uc) -> int:
    return ctypes.cast(uc._uch, ctypes.c_void_p).value  # the uc_struct pointer


def locate_state(uc: Uc) -> int:
    """Address of the engine's CPUX86State; verified, or EmulatorError."""
    rng = random.Random(os.getpid() ^ id(uc))
    wide = uc._mode == UC_MODE_64  # in 16/32-bit mode Unicorn only accepts the 32-bit register ids
    ids = GPR_IDS if wide else GPR_IDS32
    pattern_values = [rng.getrandbits(63 if wide else 32) | (1 << (62 if wide else 31)) for _ in ids]
    for reg, value in zip(ids, pattern_values):
        uc.reg_write(reg, value)
    pattern = struct.pack(f"<{len(ids)}Q", *pattern_values)
    accumulator = ids[0]
    starts, ends = _writable_regions()

    def region_end(address: int) -> int | None:
        i = bisect.bisect_right(starts, address) - 1
        return ends[i] if i >= 0 and address < ends[i] else None

    # Memory is read through /proc/self/mem: a mapping that went away since /proc/self/maps
    # was read gives an error there, where a raw pointer read would crash the process.
    with open("/proc/self/mem", "rb", buffering=0) as mem:

        def read(address: int, size: int) -> bytes:
            try:
                return os.pread(mem.fileno(), size, address)
            except (OSError, OverflowError):
                return b""

        return _search(uc, read, region_end, pattern, accumulator, rng,
                       [(low, high - low) for low, high in zip(starts, ends) if high - low <= 1 << 28])


def _search(uc: Uc, read, region_end, pattern: bytes, accumulator: int, rng: random.Random,
            regions: list[tuple[int, int]]) -> int:
    handle = _handle_address(uc)
    end = region_end(handle)
    if end is None:
        raise EmulatorError("cannot read Unicorn's engine structure (not in a writable mapping)")
    data = read(handle, min(end - handle, 1 << 16) & ~7)
    words = memoryview(data[: len(data) & ~7]).cast("Q")
    # First the blocks uc_struct points to (one of them is the CPU object), then, should
    # the CPU object lie elsewhere, every writable mapping of the process.
    pointed = sorted({word for word in words if region_end(word) is not None})
    blocks = [(word, min(region_end(word) - word, 1 << 17)) for word in pointed]
    for candidates in (blocks, regions):
        hits: set[int] = set()
        for start, size in candidates:
            block = read(start, size)
            at = block.find(pattern)
            while at >= 0:
                hits.add(start + at)
                at = block.find(pattern, at + 1)
        for address in sorted(hits):
            probe = rng.getrandbits(31)
            uc.reg_write(accumulator, probe)
            if read(address, 8) == struct.pack("<Q", probe):
                uc.reg_write(accumulator, 0)
                return address
    raise EmulatorError("cannot find Unicorn's CPU state in memory (is unicorn 2.1.4 installed?)")


class CpuStateView:
    """A writable view of one engine's CPUX86State, with the accessors the backend needs."""

    def __init__(self, uc: Uc):
        self.address = locate_state(uc)
        deep = find_deep_fields()
        self.deep = deep
        raw = (ctypes.c_char * deep.state_size).from_address(self.address)
        self.bytes = memoryview(raw).cast("B")
        self.q = self.bytes.cast("Q")  # 64-bit fields, index = offset // 8
        self.u32 = self.bytes.cast("I")  # 32-bit fields, index = offset // 4
        self.i32 = self.bytes.cast("i")
        self._verify_layout(uc)

    def _verify_layout(self, uc: Uc) -> None:
        """Check the expected offsets by writing through the API and reading in place."""
        checks = []
        pc, pc_value = {UC_MODE_64: (X.UC_X86_REG_RIP, 0x1234_5678_9ABC), UC_MODE_32: (X.UC_X86_REG_EIP, 0x1234_5678)}.get(
            uc._mode, (X.UC_X86_REG_IP, 0x1234))
        saved = {reg: uc.reg_read(reg) for reg in (pc, X.UC_X86_REG_CR3, X.UC_X86_REG_EFLAGS)}
        gdtr, idtr = uc.reg_read(X.UC_X86_REG_GDTR), uc.reg_read(X.UC_X86_REG_IDTR)
        uc.reg_write(pc, pc_value)
        checks.append(("eip", self.q[EIP // 8] & 0xFFFF_FFFF_FFFF == pc_value))
        uc.reg_write(X.UC_X86_REG_EFLAGS, 0x202)
        checks.append(("eflags", self.q[EFLAGS // 8] & 0x200 == 0x200))
        uc.reg_write(X.UC_X86_REG_EFLAGS, 0x2)
        checks.append(("eflags", self.q[EFLAGS // 8] & 0x200 == 0))
        uc.reg_write(X.UC_X86_REG_CR3, 0x7654_3000)
        checks.append(("cr3", self.q[(CR + 24) // 8] == 0x7654_3000))
        uc.reg_write(X.UC_X86_REG_GDTR, (0, 0x1122_3340, 0x57, 0))
        checks.append(("gdt", self.segment(GDT) == (0, 0x1122_3340, 0x57, self.u32[(GDT + 20) // 4])))
        uc.reg_write(X.UC_X86_REG_IDTR, (0, 0x5566_7780, 0xFFF, 0))
        checks.append(("idt", self.segment(IDT)[1:3] == (0x5566_7780, 0xFFF)))
        checks.append(("hflags", self.u32[HFLAGS // 4] & (HF_CS64_MASK | HF_LMA_MASK) == (HF_CS64_MASK | HF_LMA_MASK)
                       if uc._mode == UC_MODE_64 else True))
        uc.reg_write(X.UC_X86_REG_GDTR, gdtr)
        uc.reg_write(X.UC_X86_REG_IDTR, idtr)
        for reg, value in saved.items():
            uc.reg_write(reg, value)
        failed = [name for name, ok in checks if not ok]
        if failed:
            raise EmulatorError(f"Unicorn's CPU state layout is not the expected one (fields: {', '.join(failed)})")

    def segment(self, offset: int) -> tuple[int, int, int, int]:
        """(selector, base, limit, flags) of the SegmentCache at ``offset``."""
        return (self.u32[offset // 4], self.q[(offset + 8) // 8], self.u32[(offset + 16) // 4],
                self.u32[(offset + 20) // 4])

    def load_segment(self, index: int, selector: int, base: int, limit: int, flags: int) -> None:
        """Load segs[index]'s hidden cache and update hflags as QEMU's cpu_x86_load_seg_cache does.

        Loading SS sets the CPL to the descriptor's DPL; loading CS sets the
        CS32/CS64 bits.  No descriptor is read and no check is made: callers
        have done the checks the instruction or event requires.
        """
        offset = SEGS + index * SEGMENT_SIZE
        u32, q = self.u32, self.q
        u32[offset // 4] = selector
        q[(offset + 8) // 8] = base
        u32[(offset + 16) // 4] = limit
        u32[(offset + 20) // 4] = flags
        hflags = u32[HFLAGS // 4]
        if index == R_CS:
            if hflags & HF_LMA_MASK and flags & DESC_L_MASK:
                hflags |= HF_CS32_MASK | HF_SS32_MASK | HF_CS64_MASK
            else:
                hflags = (hflags & ~(HF_CS32_MASK | HF_CS64_MASK)) | ((flags & DESC_B_MASK) >> 18)
        elif index == R_SS:
            hflags = (hflags & ~HF_CPL_MASK) | ((flags >> 13) & 3)
        new = (u32[(SEGS + R_SS * SEGMENT_SIZE + 20) // 4] & DESC_B_MASK) >> 17  # SS32
        if hflags & HF_CS64_MASK:
            pass
        elif not (q[CR // 8] & 1) or q[EFLAGS // 8] & (1 << 17) or not hflags & HF_CS32_MASK:
            new |= HF_ADDSEG_MASK
        elif q[(SEGS + R_DS * SEGMENT_SIZE + 8) // 8] | q[(SEGS + R_ES * SEGMENT_SIZE + 8) // 8] | \
                q[(SEGS + R_SS * SEGMENT_SIZE + 8) // 8]:
            new |= HF_ADDSEG_MASK
        u32[HFLAGS // 4] = (hflags & ~(HF_SS32_MASK | HF_ADDSEG_MASK)) | new

    def set_rflags(self, rflags: int) -> None:
        """Set RFLAGS in place as QEMU keeps it inside a run: CC_SRC holds the arithmetic flags, df the DF."""
        arithmetic = 0x8D5  # OF SF ZF AF PF CF
        self.q[CC_SRC // 8] = rflags & arithmetic
        self.u32[CC_OP // 4] = 1  # CC_OP_EFLAGS
        self.i32[DF // 4] = -1 if rflags & 0x400 else 1
        self.q[EFLAGS // 8] = (rflags & ~(arithmetic | 0x400)) | 0x2

    def release(self) -> None:
        for view in (self.i32, self.u32, self.q, self.bytes):
            view.release()


# --- finding the deep fields -------------------------------------------------------------------

# 64-bit probe code at PROBE_CODE; each snippet faults once.
_MOV_DS_BAD = bytes.fromhex("66b83812" "8ed8")  # mov ax, 0x1238 ; mov ds, ax -> #GP(0x1238) (GDT limit 0)
_INT80 = bytes.fromhex("cd80")  # int 0x80
_DIV0 = bytes.fromhex("31c9" "f7f1")  # xor ecx, ecx ; div ecx -> #DE
_TWO_GP = bytes.fromhex("66b83812" "8ed8" "8ed8" "8ed8" "f4")
PROBE_CODE = 0x1000


def _probe(code: bytes, reset_offset: int | None = None, state_size: int = 0,
           max_faults: int = 1) -> list[tuple[int, bytes, bytes]]:
    """Run ``code`` in a scratch engine; return (vector, state before, state in the hook) per fault.

    After each fault the hook moves EIP past the 2-byte faulting instruction in place
    and, when ``reset_offset`` is given, writes -1 there (the candidate old_exception).
    """
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x10000, UC_PROT_ALL)
    uc.mem_write(PROBE_CODE, code + b"\xf4")
    uc.reg_write(X.UC_X86_REG_RSP, 0x8000)
    address = locate_state(uc)
    size = state_size or (len(bytes(uc.context_save())) - _context_header(uc, address))
    before = ctypes.string_at(address, size)
    faults: list[tuple[int, bytes, bytes]] = []

    def on_interrupt(uc: Uc, vector: int, _data: object) -> None:
        faults.append((vector, before, ctypes.string_at(address, size)))
        if len(faults) >= max_faults:
            uc.emu_stop()
            return
        eip = ctypes.c_uint64.from_address(address + EIP)
        eip.value += 2
        if reset_offset is not None:
            ctypes.c_int32.from_address(address + reset_offset).value = -1

    hook = uc.hook_add(UC_HOOK_INTR, on_interrupt)
    try:
        uc.emu_start(PROBE_CODE, PROBE_CODE + 0x100, count=100)
    except Exception:  # noqa: BLE001 - a probe that stops with an error still left its faults
        pass
    # Close the scratch engine now, while everything it refers to is alive: left to the
    # cycle collector (uc -> hook -> closure -> uc) it is closed at interpreter exit,
    # in an order that crashed the process about half the time.
    uc.hook_del(hook)
    del on_interrupt, uc
    return faults


def _context_header(uc: Uc, address: int) -> int:
    context = bytes(uc.context_save())
    at = context.find(ctypes.string_at(address, 256))
    if at < 0:
        raise EmulatorError("uc_context_save's copy does not contain the CPU state found in memory")
    return at


def _int32_offsets(before: bytes, after: bytes, old: int, new: int) -> set[int]:
    n = min(len(before), len(after)) // 4
    b = struct.unpack(f"<{n}i", before[: n * 4])
    a = struct.unpack(f"<{n}i", after[: n * 4])
    return {i * 4 for i in range(n) if b[i] == old and a[i] == new}


def _find_efer() -> int:
    """Offset of ``efer``: the qword after cr[] that follows EFER writes made through WRMSR."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    address = locate_state(uc)
    hits = None
    for value in (0x500, 0xD00, 0x501):  # LME|LMA, +NXE, +SCE
        uc.msr_write(0xC0000080, value)
        if uc.msr_read(0xC0000080) != value:
            raise EmulatorError(f"EFER does not hold {value:#x} after WRMSR")
        state = ctypes.string_at(address, 1024)
        found = {o for o in range(CR + 40, 1024, 8) if struct.unpack_from("<Q", state, o)[0] == value}
        hits = found if hits is None else hits & found
    if not hits or len(hits) != 1:
        raise EmulatorError(f"cannot find efer in Unicorn's CPU state: candidates {sorted(hits or ())}")
    return hits.pop()


def find_deep_fields() -> DeepFields:
    """Find (once per process) and verify the offsets of error_code, exception_is_int, old_exception."""
    global _deep_fields
    if _deep_fields is not None:
        return _deep_fields
    gp = _probe(_MOV_DS_BAD)
    de = _probe(_DIV0)
    sw = _probe(_INT80)
    if not (gp and gp[0][0] == 13 and de and de[0][0] == 0 and sw and sw[0][0] == 0x80):
        raise EmulatorError("probe faults did not arrive as #GP, #DE and int 0x80")
    size = len(gp[0][1])
    old_exception = _int32_offsets(gp[0][1], gp[0][2], -1, 13) & _int32_offsets(de[0][1], de[0][2], -1, 0)
    error_code = {o for o in range(0, size - 3, 4) if struct.unpack_from("<i", gp[0][2], o)[0] == 0x1238} \
        - old_exception
    is_int = {o for o in range(0, size - 3, 4)
              if struct.unpack_from("<i", sw[0][2], o)[0] == 1 and struct.unpack_from("<i", gp[0][2], o)[0] == 0}
    if len(old_exception) != 1:
        raise EmulatorError(f"cannot find old_exception: candidates {sorted(old_exception)}")
    (old,) = old_exception
    # error_code and exception_is_int sit together just before exception_next_eip in QEMU 5.0.
    error_code = {o for o in error_code if o + 4 in is_int}
    if len(error_code) != 1:
        raise EmulatorError(f"cannot find error_code/exception_is_int: candidates {sorted(error_code)}")
    (err,) = error_code
    # Verify: without the reset the second hooked #GP is a #DF (unicorn#1883); with it, 13 again.
    unpatched = [v for v, _, _ in _probe(_TWO_GP, None, size, max_faults=2)]
    patched = [v for v, _, _ in _probe(_TWO_GP, old, size, max_faults=3)]
    if patched != [13, 13, 13]:
        raise EmulatorError(f"resetting old_exception at {old} does not fix unicorn#1883 (saw {patched})")
    if unpatched[:2] not in ([13, 8], [13, 13]):
        raise EmulatorError(f"unexpected fault sequence without the reset: {unpatched}")
    _deep_fields = DeepFields(error_code=err, exception_is_int=err + 4, old_exception=old, efer=_find_efer(),
                              state_size=size)
    return _deep_fields
