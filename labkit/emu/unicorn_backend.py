"""The emulation backend: one x86 vCPU in Unicorn 2.1.4, its hooks turned into labkit exits.

What maps to what:

- guest RAM: an anonymous private mmap owned here, given to Unicorn with
  ``uc_mem_map_ptr``; :attr:`EmuBackend.memory` is a memoryview of the same
  bytes (no copies).  After ``os.fork()`` the child has its own copy, as with
  any process memory.
- port I/O: ``UC_HOOK_INSN`` for IN and OUT calls ``dispatcher.pio`` while the
  guest waits (no emulation restart).  Unicorn skips the I/O permission check
  when IN/OUT are hooked, so the hook does it (CPL <= IOPL, else the TSS I/O
  bitmap) and a refused access becomes #GP(0) at the instruction, as on hardware.
- ``syscall``: Unicorn 2.1.4 only calls hooks and steps over it, so a hook does
  what the CPU does (RCX, R11, STAR, LSTAR/CSTAR, SFMASK).  ``sysret`` is QEMU's.
- MMIO: ``uc_mmio_map`` over ``[memory_size, MAPPED_LIMIT)`` calls
  ``dispatcher.mmio``.  ``[MAPPED_LIMIT, 4 GiB)`` behaves as an empty bus, as on
  a PC: reads return all ones, writes are dropped, nothing is reported.  An
  access above 4 GiB (only reachable through the guest's own page tables) ends
  the run with :class:`~labkit.exits.EmulatorFailure` (KVM's emulator stops
  with ``KVM_EXIT_INTERNAL_ERROR`` for an access it cannot complete).
- ``hlt``: Unicorn stops with RIP after the ``hlt`` (as KVM): :class:`~labkit.exits.Hlt`; the
  next run continues there.  ``uc_emu_start`` returns ``UC_ERR_OK`` after a ``hlt`` and after
  ``uc_emu_stop`` alike; QEMU's ``CPUState.halted`` tells them apart (:mod:`labkit.emu.halted`).
- ``kick()``: from any thread, through the stop gate (:class:`_StopGate`): the run ends before
  the next translated block with :class:`~labkit.exits.Interrupted` and goes on from there next time.
- external interrupts: before each ``uc_emu_start`` (and after an absorbed IN/OUT, with the same
  exact stop as for I/O) the backend reads ``dispatcher.interrupt_pending``; when RFLAGS.IF = 1
  and no interrupt shadow, it delivers ``pending_vector()`` through the guest's IVT/IDT as an
  external interrupt and calls ``acknowledge_interrupt``.  Otherwise a UC_HOOK_BLOCK, installed
  only while an interrupt waits, stops the guest at the first block boundary where it can take it.
  After an MMIO access that made an interrupt pending, it is taken at the end of that block.
- memory regions (``add_memory_region``) are carved out of the MMIO range; stores to a
  read-only region become MMIO writes and leave it unchanged.  The dirty log is a
  UC_HOOK_MEM_WRITE that logs each store's guest-physical page (:class:`_WriteLog`), plus the
  page of every exception frame the backend pushes itself (:mod:`labkit.emu.delivery`, the C
  trap replay), as KVM logs a stack page an exception frame dirties.
- ``mov cr0``/``mov cr4`` with refused bits and RDMSR/WRMSR of MSRs the emulated CPU does not
  have raise #GP(0), as on KVM, through QEMU's SVM intercept check (:mod:`labkit.emu.intercepts`).
- exceptions: ``UC_HOOK_INTR`` plus :mod:`labkit.emu.delivery`, which delivers
  them through the guest's IVT/IDT; #UD (which Unicorn reports as
  ``UC_ERR_INSN_INVALID`` after stopping) is delivered the same way as vector 6.
  A triple fault is :class:`~labkit.exits.Shutdown`.  After every exception the
  CPU's ``old_exception`` is reset to -1 in place (unicorn#1883, see
  :mod:`labkit.emu.cpu_state`).  Where labkit's C trap replay is built
  (:mod:`labkit.emu.native`), it is the hook: it replays recorded long-mode
  deliveries and passes the rest to the Python hook.
- a time budget: labkit's process-wide watchdog (``labkit.watchdog``) shuts the
  stop gate at the deadline.  Unicorn's own ``timeout`` argument would
  start and join a thread on every ``uc_emu_start`` (~160 µs), and the backend
  restarts emulation after every stop it makes (I/O stops, #UD, I/O #GP).

Stopping exactly.  Unicorn checks for a stop request at the start of each
translated block and after every guest memory access; at the latter it
restarts the current instruction, even when that instruction's store already
landed.  So a stop from outside the guest (a kick, a pause, the deadline)
never calls ``uc_emu_stop`` from another thread: it shuts the stop gate, a
UC_HOOK_BLOCK that stops the run before the next block, where no instruction
is half done (:class:`_StopGate`).  An IN/OUT hook's ``uc_emu_stop`` takes
effect at the end of the block: when the dispatcher sets ``stop`` during
IN/OUT, the backend copies the CPU state in the hook, makes guest RAM
read-only so later stores in the block fault instead of landing, ignores
further I/O, and after ``uc_emu_start`` returns puts the copy back and moves
RIP past the I/O instruction.  The guest then resumes exactly after it, as on
KVM.  A stop during MMIO leaves the instruction unfinished (RIP at it, as KVM
before it completes an MMIO exit); the next run runs it again and answers the
MMIO accesses it had made, in order, from the record instead of the dispatcher
(``add [mmio], 1`` stopped at its write reads and writes the device once).
For string I/O (``ins``/``outs``) the stop takes effect at the end of the
translated block.

The RIP handed to the dispatcher is KVM's: after an ``out`` (read back from
guest memory to find its length), at an ``in``, and at the instruction of an
MMIO access (a no-op memory hook over the MMIO range makes Unicorn restore RIP
before the MMIO callback; without one the callback sees the block's start).
String I/O reports the instruction's own RIP.

Modes: ``mode`` picks Unicorn's UC_MODE_16/32/64 (the start mode); registers are
read and written in QEMU's CPU state directly, so all 16 GPRs and RIP are
visible in every mode.  In mode 16 a run starts at CS.selector * 16 + IP, so a
16-bit-started guest that enters protected mode with EIP > 0xFFFF is not
resumable across ``run`` calls; 32- and 64-bit guests have no such limit below
4 GiB.  8-byte MMIO accesses reach the dispatcher as two 4-byte accesses
(Unicorn's MMIO regions are 4 bytes wide), unlike KVM's single 8-byte exit.

What the emulator cannot show: real exit latency.  Its timings are Python's.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import mmap
import threading
import time
import weakref
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Mapping

import capstone
import unicorn
from unicorn import unicorn_const as UC
from unicorn import x86_const as X

from labkit.emu import cpu_state as S
from labkit.emu.cpu_state import CpuStateView
from labkit.emu.delivery import DeliveryUnsupported, ExceptionDelivery, TripleFault
from labkit.emu.halted import HaltedFlag
from labkit.emu.intercepts import EXCP_VMEXIT, Intercepts
from labkit.emu.native import CFuncPtr, NativeTrapReplay, load as load_native
from labkit.emu.unicorn_capi import (HOOK_BLOCK, HOOK_IN, HOOK_INTR, HOOK_MEM, HOOK_OUT, HOOK_SYSCALL, HOOK_WRITE_PROT,
                                     MMIO_READ, MMIO_WRITE)
from labkit.emu.unicorn_capi import RegisterBatch
from labkit.emu.unicorn_capi import UC_CTL_TB_FLUSH as _UC_CTL_TB_FLUSH
from labkit.emu.unicorn_capi import UC_CTL_TLB_FLUSH as _UC_CTL_TLB_FLUSH
from labkit.emu.unicorn_capi import c_void_p as _c_void_p
from labkit.emu.unicorn_capi import check as _check
from labkit.emu.unicorn_capi import i32 as _i32
from labkit.emu.unicorn_capi import lib as _lib  # also what benchmarks/bench_emu.py imports from here
from labkit.emu.unicorn_capi import u64 as _u64
from labkit.errors import ConfigError, EmulatorError
from labkit.exits import Dispatcher, EmulatorFailure, Exit, Hlt, Interrupted, Io, Mmio, Shutdown, Timeout
from labkit.memory import bitmap_pages, page_runs
from labkit.watchdog import WATCHDOG
from labkit.x86 import layout
from labkit.x86.arch import (EFER_LMA, EFER_SCE, MSR_CSTAR, MSR_EFER, MSR_LSTAR, MSR_SFMASK, MSR_STAR, RFLAGS_IF,
                             RFLAGS_RF, RFLAGS_VM)
from labkit.x86.state import GPR_NAMES, DebugRegs, DescriptorTable, FpuState, Regs, Segment, SRegs

UNICORN_VERSION = "2.1.4"
_UC_MODES = {16: UC.UC_MODE_16, 32: UC.UC_MODE_32, 64: UC.UC_MODE_64}
_OPEN_BUS_END = 1 << 32
_NEVER = 1 << 63  # a non-canonical "until" address: emulation never stops there

# QEMU's regs[] order, as labkit's names.
_QEMU_GPR_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
                   "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_SEGMENTS = (("es", S.R_ES), ("cs", S.R_CS), ("ss", S.R_SS), ("ds", S.R_DS), ("fs", S.R_FS), ("gs", S.R_GS))

_READ_EXEC = UC.UC_PROT_READ | UC.UC_PROT_EXEC


_HOOK_MEM = ctypes.CFUNCTYPE(None, _c_void_p, _i32, _u64, _i32, ctypes.c_int64, _c_void_p)  # uc_cb_hookmem_t
_lib.uc_vmem_read.argtypes = (_c_void_p, _u64, ctypes.c_uint32, _c_void_p, ctypes.c_size_t)
_lib.uc_vmem_read.restype = _i32
_lib.uc_vmem_translate.argtypes = (_c_void_p, _u64, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint64))
_lib.uc_vmem_translate.restype = _i32


def _io_instruction_length(code: bytes) -> int | None:
    """Length of the IN/OUT at the start of ``code``; None for string I/O or anything else."""
    for i, byte in enumerate(code[:15]):
        if byte in (0x66, 0x67, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0xF0) or 0x40 <= byte <= 0x4F:
            continue
        if 0xE4 <= byte <= 0xE7:
            return i + 2
        if 0xEC <= byte <= 0xEF:
            return i + 1
        return None
    return None


class _Engine:
    """The Unicorn engine, guest RAM and hooks; what the finalizer tears down.

    Hooks close over this object, never over :class:`EmuBackend`, so dropping the
    backend runs its finalizer without waiting for the cycle collector.
    """

    def __init__(self, memory_size: int, mode: int, ram_fd: int | None = None):
        self.memory_size = memory_size
        if ram_fd is None:
            self.ram_map = mmap.mmap(-1, memory_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                     prot=mmap.PROT_READ | mmap.PROT_WRITE)
        else:  # the caller's memfd (a machine in a worker process): the caller maps the same pages
            self.ram_map = mmap.mmap(ram_fd, memory_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._anchor = ctypes.c_char.from_buffer(self.ram_map)
        self.ram_address = ctypes.addressof(self._anchor)
        self.ram = memoryview(self.ram_map)
        self.uc = unicorn.Uc(UC.UC_ARCH_X86, _UC_MODES[mode])
        self.handle = self.uc._uch
        self.uc.mem_map_ptr(0, memory_size, UC.UC_PROT_ALL, self.ram_address)
        self.cpu = CpuStateView(self.uc)
        self._eflags = _u64()
        self._eflags_ref = ctypes.byref(self._eflags)
        self._eflags_id = X.UC_X86_REG_RFLAGS if mode == 64 else X.UC_X86_REG_EFLAGS
        self.delivery = ExceptionDelivery(self.cpu, self.ram, self.read_eflags)
        self.dispatcher: Dispatcher = _NO_RUN
        self.hook_error: BaseException | None = None
        self.shutdown = False
        self.timed_out = False
        self.failure: str | None = None
        self.stop: Io | _MmioStop | None = None
        self.stop_state: bytes | None = None
        self.stop_rip = 0
        self.stop_value: int | None = None
        self.pending_fault: tuple[int, int] | None = None
        self.stopping = False
        self.stop_access: Io | None = None
        # Memory beyond RAM: regions (guest address order), the MMIO pieces between them, the dirty log.
        self.regions: list[_Region] = []
        self.mmio_pieces: list[tuple[int, int]] = []
        self.dirty: _WriteLog | None = None
        self.mmio_replay: list[tuple[int, int, int, bool, int]] | None = None
        """The MMIO accesses (rip, address, size, is_write, value) of the instruction an MMIO stop
        left unfinished, the stopping one last: Unicorn restarts an instruction whose memory access
        saw a stop request, so when it runs again these accesses are answered from here, in order,
        instead of reaching the dispatcher twice (``add [mmio], 1`` stopped at its write)."""
        self.mmio_done: list[tuple[int, int, int, bool, int]] = []
        self.mmio_key: tuple[int, int] = (-1, -1)
        """(blocks entered, RIP): the instruction execution whose MMIO accesses ``mmio_done`` holds."""
        self.rom_write = False
        self.rom_step = False
        self.rom_undo: list[tuple[_Region, int, bytes]] = []
        self.rom_writes: list[_MmioStop] = []
        self.replay: NativeTrapReplay | None = None
        self.halted = HaltedFlag(self.uc, self.cpu.address)
        # kick() and the deadline: set from any thread under kick_lock, taken through the stop gate.
        self.kick_lock = threading.Lock()
        self.alive = True
        self.kicked = False
        # External interrupts: whether this run's dispatcher has the interrupt members, and the
        # UC_HOOK_BLOCK that watches for IF = 1 while an interrupt waits (installed only then).
        self.irq = False
        self.window_hook: ctypes.c_size_t | None = None
        self.window_open = False
        self.intercepted: tuple[int, int] | None = None
        self.gate = _StopGate(self.handle, load_native(), self.cpu.address)
        self.callbacks = self._install_hooks()
        self.intercepts = Intercepts(self.uc, self.cpu)
        self.batches: dict[str, RegisterBatch] = {}

    def read_eflags(self) -> int:
        _lib.uc_reg_read(self.handle, self._eflags_id, self._eflags_ref)
        return self._eflags.value

    # --- hooks -------------------------------------------------------------------------------

    def _install_hooks(self) -> list[Any]:
        handle = self.handle
        q = self.cpu.q
        i32 = self.cpu.i32
        eip_index = S.EIP // 8
        old_exception_index = self.cpu.deep.old_exception // 4
        error_code_index = self.cpu.deep.error_code // 4
        is_int_index = self.cpu.deep.exception_is_int // 4
        deliver = self.delivery.deliver
        deliver_fast = self.delivery.deliver_fast
        page_fault_error_code = self.delivery.page_fault_error_code
        engine = self
        native: NativeTrapReplay | None = None  # the C trap replay, set below once the Python hook it passes on to exists

        def fail(error: BaseException) -> None:
            if engine.hook_error is None:
                engine.hook_error = error
            engine.begin_stop(None, None)

        io_permitted = self.delivery.io_permitted
        code = (ctypes.c_uint8 * 15)()
        code_address = ctypes.addressof(code)
        vmem_read, exec_ = _lib.uc_vmem_read, UC.UC_PROT_EXEC
        cs_base_index = (S.SEGS + S.R_CS * S.SEGMENT_SIZE + 8) // 8
        hflags_index = S.HFLAGS // 4
        u32 = self.cpu.u32

        def after_out_python() -> int:
            """RIP after the OUT being hooked (Unicorn gives it at the OUT), as KVM reports it.

            The instruction is read where the CPU fetched it, through the guest's
            page tables (``uc_vmem_read``); a string OUTS, which ends only after
            its last element, keeps RIP at the instruction.  Where the C library
            is built, its ``out_next_rip`` does the same (about 1.5 us cheaper).
            """
            rip = q[eip_index]
            linear = q[cs_base_index] + rip
            if not u32[hflags_index] & S.HF_CS64_MASK:
                linear &= 0xFFFF_FFFF
            first = min(15, 0x1000 - (linear & 0xFFF))  # uc_vmem_read reads within one page at a time
            if vmem_read(handle, linear, exec_, code_address, first) != 0:
                return rip
            opcode = code[0]
            if 0xEE <= opcode <= 0xEF:  # out dx, al/eax: the common case, no prefix
                return rip + 1
            if 0xE6 <= opcode <= 0xE7:  # out imm8, al/eax
                return rip + 2
            length = _io_instruction_length(bytes(code[:first]))
            if length is None and first < 15 and vmem_read(handle, linear + first, exec_, code_address + first,
                                                           15 - first) == 0:
                length = _io_instruction_length(bytes(code))
            return rip if length is None else rip + length

        after_out = self.gate.out_next_rip or after_out_python

        def on_out(_uc: object, port: int, size: int, value: int, _user: object) -> None:
            if engine.stopping:
                return
            try:
                if not io_permitted(port, size):
                    engine.begin_stop(None, None, fault=(13, 0))
                    return
                dispatcher = engine.dispatcher
                dispatcher.pio(port, size, True, value, after_out())
                if dispatcher.stop:
                    engine.begin_stop(Io(port, size, True, value), None)
                elif engine.irq and dispatcher.interrupt_pending and engine.interrupt_needs_stop():
                    engine.begin_stop(Io(port, size, True, value), None, resume=True)
            except BaseException as error:  # noqa: BLE001 - re-raised after uc_emu_start returns
                fail(error)

        def on_in(_uc: object, port: int, size: int, _user: object) -> int:
            if engine.stopping:
                return 0
            try:
                if not io_permitted(port, size):
                    engine.begin_stop(None, None, fault=(13, 0))
                    return 0
                dispatcher = engine.dispatcher
                value = dispatcher.pio(port, size, False, 0, q[eip_index]) & ((1 << (8 * size)) - 1)
                if dispatcher.stop:
                    engine.begin_stop(Io(port, size, False, value), value)
                elif engine.irq and dispatcher.interrupt_pending and engine.interrupt_needs_stop():
                    engine.begin_stop(Io(port, size, False, value), value, resume=True)
                return value
            except BaseException as error:  # noqa: BLE001
                fail(error)
                return 0

        def on_interrupt(_uc: object, vector: int, _user: object) -> None:
            i32[old_exception_index] = -1  # unicorn#1883
            if engine.stopping:
                _lib.uc_emu_stop(handle)
                return
            if vector >= EXCP_VMEXIT:  # an intercepted CR0/CR4 write or MSR access (labkit.emu.intercepts)
                engine.intercepted = (vector - EXCP_VMEXIT, i32[error_code_index])
                engine.stop_run()
                return
            try:
                if vector == 14 and not i32[error_code_index] & 2 and not i32[is_int_index]:
                    i32[error_code_index] = page_fault_error_code(i32[error_code_index])  # a write for RMW
                # Behind the C replay, a plan that did not apply is recorded afresh by deliver().
                if native is not None or not deliver_fast(vector):
                    deliver(vector, i32[error_code_index], i32[is_int_index] != 0)
            except TripleFault:
                engine.shutdown = True
                engine.stop_run()
            except DeliveryUnsupported as error:
                engine.failure = str(error)
                engine.stop_run()
            except BaseException as error:  # noqa: BLE001
                engine.hook_error = engine.hook_error or error
                engine.stop_run()

        gate_state = self.gate.state

        def replayed(access: tuple[int, int, int, bool, int]) -> int | None:
            """The recorded value if ``access`` is the next one of the instruction being run again."""
            replay = engine.mmio_replay
            if replay is None:
                return None
            expected = replay[0]
            if expected[:4] != access[:4] or (access[3] and expected[4] != access[4]):
                engine.mmio_replay = None
                return None
            del replay[0]
            if not replay:
                engine.mmio_replay = None
            return expected[4]

        def done(access: tuple[int, int, int, bool, int]) -> None:
            """Keep the accesses of this execution of this instruction, for a stop in a later one."""
            key = (gate_state.blocks, access[0])
            if key != engine.mmio_key:
                engine.mmio_key = key
                engine.mmio_done = []
            engine.mmio_done.append(access)

        def on_mmio_read(_uc: object, offset: int, size: int, base: int) -> int:  # base: the MMIO piece's start
            if engine.stopping:
                return 0
            rip = q[eip_index]
            mask = (1 << (8 * size)) - 1
            value = replayed((rip, base + offset, size, False, 0))
            if value is not None:
                done((rip, base + offset, size, False, value))
                return value & mask
            try:
                dispatcher = engine.dispatcher
                value = dispatcher.mmio(base + offset, size, False, 0, rip) & mask
                done((rip, base + offset, size, False, value))
                if dispatcher.stop:
                    engine.stop = _MmioStop(base + offset, size, False, value)
                    engine.stop_run()
                return value
            except BaseException as error:  # noqa: BLE001
                engine.hook_error = engine.hook_error or error
                engine.stop_run()
                return 0

        def on_mmio_write(_uc: object, offset: int, size: int, value: int, base: int) -> None:
            if engine.stopping:
                return
            rip = q[eip_index]
            access = (rip, base + offset, size, True, value)
            if replayed(access) is not None:
                done(access)
                return
            try:
                dispatcher = engine.dispatcher
                dispatcher.mmio(base + offset, size, True, value, rip)
                done(access)
                if dispatcher.stop:
                    engine.stop = _MmioStop(base + offset, size, True, value)
                    engine.stop_run()
            except BaseException as error:  # noqa: BLE001
                engine.hook_error = engine.hook_error or error
                engine.stop_run()

        def on_syscall(_uc: object, _user: object) -> None:
            try:
                engine.syscall()
            except BaseException as error:  # noqa: BLE001
                engine.hook_error = engine.hook_error or error
                engine.stop_run()

        def on_write_prot(_uc: object, _type: int, address: int, size: int, value: int, _user: object) -> bool:
            # A store to a page that is not writable for Unicorn.  Returning False makes Unicorn stop
            # exactly before the storing instruction (UC_ERR_WRITE_PROT); True lets the store land.
            # - RAM frozen by begin_stop: False.
            # - a read-only region: False, and the run loop steps that one instruction (rom_step) with
            #   its stores allowed, reported as MMIO writes and undone afterwards;
            if engine.stopping:
                return False
            try:
                if engine.read_only_at(address):
                    if not engine.rom_step:
                        engine.rom_write = True
                        return False
                    value &= (1 << (8 * size)) - 1
                    region = next(r for r in engine.regions if r.address <= address < r.end)
                    offset = address - region.address
                    engine.rom_undo.append((region, offset, bytes(region.view[offset:offset + size])))
                    engine.dispatcher.mmio(address, size, True, value, q[eip_index])
                    engine.rom_writes.append(_MmioStop(address, size, True, value))
                    return True
                return False
            except BaseException as error:  # noqa: BLE001
                engine.hook_error = engine.hook_error or error
                engine.stop_run()
                return False

        eflags_index, hflags_index = S.EFLAGS // 8, S.HFLAGS // 4
        u32 = self.cpu.u32
        inhibit = S.HF_INHIBIT_IRQ_MASK

        def on_block(_uc: object, _address: int, _size: int, _user: object) -> None:
            # Installed only while an interrupt waits: stop before the first block the guest can take it at.
            if q[eflags_index] & RFLAGS_IF and not u32[hflags_index] & inhibit:
                engine.window_open = True
                _lib.uc_emu_stop(handle)

        self.block_callback = HOOK_BLOCK(on_block)

        def open_bus_read(_uc: object, _offset: int, size: int, _user: object) -> int:
            return (1 << (8 * size)) - 1

        def open_bus_write(_uc: object, _offset: int, _size: int, _value: int, _user: object) -> None:
            return None

        callbacks = [HOOK_OUT(on_out), HOOK_IN(on_in), HOOK_INTR(on_interrupt),
                     MMIO_READ(on_mmio_read), MMIO_WRITE(on_mmio_write),
                     MMIO_READ(open_bus_read), MMIO_WRITE(open_bus_write), HOOK_SYSCALL(on_syscall),
                     HOOK_WRITE_PROT(on_write_prot)]
        out_cb, in_cb, intr_cb, mmio_read, mmio_write, bus_read, bus_write, syscall_cb, write_prot_cb = callbacks
        self.mmio_callbacks = (ctypes.cast(mmio_read, _c_void_p), ctypes.cast(mmio_write, _c_void_p))
        native = self.replay = self._native_replay(intr_cb)
        self.delivery.native = native
        # (hook type, callback, its user data, instruction): the C replay, where built, takes UC_HOOK_INTR.
        intr = (intr_cb, None) if native is None else (_c_void_p(native.hook_address), native.user_data)
        for hook_type, callback, data, extra in ((UC.UC_HOOK_INSN, out_cb, None, X.UC_X86_INS_OUT),
                                                 (UC.UC_HOOK_INSN, in_cb, None, X.UC_X86_INS_IN),
                                                 (UC.UC_HOOK_INSN, syscall_cb, None, X.UC_X86_INS_SYSCALL),
                                                 (UC.UC_HOOK_INTR, *intr, None),
                                                 (UC.UC_HOOK_MEM_WRITE_PROT, write_prot_cb, None, None)):
            hook = ctypes.c_size_t()
            args = [handle, ctypes.byref(hook), _i32(hook_type), ctypes.cast(callback, _c_void_p), _c_void_p(data),
                    _u64(1), _u64(0)]
            if extra is not None:
                args.append(_i32(extra))
            _check(_lib.uc_hook_add(*args), "uc_hook_add")
        if self.memory_size < layout.MAPPED_LIMIT:
            self.map_mmio(self.memory_size, layout.MAPPED_LIMIT)
            # MMIO callbacks see the accessing instruction's RIP only when a memory hook covers the
            # address (Unicorn restores RIP before calling memory hooks): a no-op one, in C where built.
            library = load_native()
            if library is not None:
                sync_pc: Any = ctypes.cast(library.sync_pc_hook, _c_void_p)
            else:
                self.sync_pc_callback = _HOOK_MEM(lambda *_: None)
                sync_pc = ctypes.cast(self.sync_pc_callback, _c_void_p)
            hook = ctypes.c_size_t()
            _check(_lib.uc_hook_add(handle, ctypes.byref(hook), _i32(UC.UC_HOOK_MEM_READ | UC.UC_HOOK_MEM_WRITE),
                                    sync_pc, None, _u64(self.memory_size), _u64(layout.MAPPED_LIMIT - 1)),
                   "uc_hook_add (UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE over MMIO)")
        _check(_lib.uc_mmio_map(handle, layout.MAPPED_LIMIT, _OPEN_BUS_END - layout.MAPPED_LIMIT,
                                ctypes.cast(bus_read, _c_void_p), None, ctypes.cast(bus_write, _c_void_p), None),
               "uc_mmio_map (empty bus)")
        return callbacks

    def _native_replay(self, slow: CFuncPtr) -> NativeTrapReplay | None:
        """The C trap replay for this engine, passing on to ``slow``; None where it is not built."""
        library = load_native()
        if library is None:
            return None
        cpu, deep = self.cpu, self.cpu.deep
        return NativeTrapReplay(
            library, cpu_address=cpu.address, ram_address=self.ram_address, ram_size=self.memory_size,
            reg_read_address=ctypes.cast(_lib.uc_reg_read, _c_void_p).value or 0, rflags_reg=self._eflags_id, slow=slow,
            offsets={"eip": S.EIP, "eflags": S.EFLAGS, "hflags": S.HFLAGS, "rsp": S.REGS + 8 * 4,
                     "cs": S.SEGS + S.R_CS * S.SEGMENT_SIZE, "ss": S.SEGS + S.R_SS * S.SEGMENT_SIZE,
                     "system": S.LDT, "cr2_in_system": S.CR + 16 - S.LDT, "old_exception": deep.old_exception,
                     "error_code": deep.error_code, "exception_is_int": deep.exception_is_int,
                     "cs_base": S.SEGS + S.R_CS * S.SEGMENT_SIZE + S.SEG_BASE, "cs64_mask": S.HF_CS64_MASK},
            vmem_read_address=ctypes.cast(_lib.uc_vmem_read, _c_void_p).value)

    def stop_run(self) -> None:
        """From a hook: end uc_emu_start; hooks do nothing more until then (exceptions are not delivered)."""
        self.stopping = True
        if self.replay is not None:
            self.replay.set_stopping(True)
        _lib.uc_emu_stop(self.handle)

    def clear_stop(self) -> None:
        self.stopping = False
        if self.replay is not None:
            self.replay.set_stopping(False)

    def syscall(self) -> None:
        """SYSCALL as the CPU does it (SDM vol. 2B); Unicorn 2.1.4 only calls hooks and skips it.

        Called from Unicorn's helper with EIP at the ``syscall``; Unicorn adds the
        instruction's 2 bytes to EIP after the hook, so the target is written minus 2.
        EFER.SCE clear gives #UD.
        """
        cpu = self.cpu
        q = cpu.q
        efer = q[cpu.deep.efer // 8]

        def msr(index: int) -> int:
            with self.intercepts.suspended():
                return self.uc.msr_read(index)

        rip = q[S.EIP // 8]
        if not efer & EFER_SCE:
            self.delivery.deliver(6, 0, False)
            q[S.EIP // 8] -= 2
            return
        star = msr(MSR_STAR)
        selector = (star >> 32) & 0xFFFC
        rflags = self.delivery.rflags()
        long_mode = bool(cpu.u32[S.HFLAGS // 4] & S.HF_LMA_MASK)
        code_flags = 0x00809B00 | (S.DESC_L if long_mode else S.DESC_B)  # G P S code R A, L or D
        data_flags = 0x00C09300  # G B P S data W A
        if long_mode:
            q[1] = rip + 2  # RCX
            q[11] = rflags  # R11
            target = msr(MSR_LSTAR if cpu.u32[S.HFLAGS // 4] & S.HF_CS64_MASK else MSR_CSTAR)
            cpu.set_rflags(rflags & ~msr(MSR_SFMASK) & ~RFLAGS_RF)
        else:
            q[1] = (rip + 2) & 0xFFFFFFFF
            target = star & 0xFFFFFFFF
            cpu.set_rflags(rflags & ~(RFLAGS_IF | RFLAGS_VM | RFLAGS_RF))
        cpu.load_segment(S.R_SS, (selector + 8) & 0xFFFC, 0, 0xFFFFFFFF, data_flags)
        cpu.load_segment(S.R_CS, selector, 0, 0xFFFFFFFF, code_flags)
        q[S.EIP // 8] = (target - 2) & 0xFFFF_FFFF_FFFF_FFFF

    def begin_stop(self, exit_: Io | None, in_value: int | None, fault: tuple[int, int] | None = None,
                   resume: bool = False) -> None:
        """Called in an IN/OUT hook: freeze the state for an exact stop after this instruction.

        With ``fault`` the instruction is not allowed (CPL > IOPL and the TSS bitmap
        says no): the state is put back to before it and the fault delivered after the stop.
        With ``resume`` the access was absorbed and the run goes on after the stop
        (an interrupt became pending during it).
        """
        self.pending_fault = fault
        self.stop = None if resume else exit_
        self.stop_access = exit_
        self.stop_state = bytes(self.cpu.bytes)
        self.stop_rip = self.cpu.q[S.EIP // 8]
        self.stop_value = in_value
        for start, size in self.writable_ranges():
            _lib.uc_mem_protect(self.handle, start, size, _READ_EXEC)
        if self.dirty is not None:
            self.dirty.state.frozen = 1
        self.stop_run()

    def finish_stop(self, read_code: Callable[[int, int], bytes]) -> None:
        """After uc_emu_start: undo what the rest of the translated block did; RIP after the I/O."""
        if self.stop_state is None:
            return
        state, self.stop_state = self.stop_state, None
        self.protect_writable()
        if self.dirty is not None:
            self.dirty.state.frozen = 0
        if self.pending_fault is not None:
            self.cpu.bytes[:] = state
            _lib.uc_ctl(self.handle, _i32(_UC_CTL_TLB_FLUSH))
            return
        length = _io_instruction_length(read_code(self.stop_rip, 15))
        if length is None:
            return  # string I/O: the stop takes effect at the end of the block
        self.cpu.bytes[:] = state
        _lib.uc_ctl(self.handle, _i32(_UC_CTL_TLB_FLUSH))
        self.cpu.q[S.EIP // 8] = self.stop_rip + length
        # The I/O instruction completed: an interrupt shadow it sat in (after sti, mov ss) is over.
        self.cpu.u32[S.HFLAGS // 4] &= ~S.HF_INHIBIT_IRQ_MASK
        if self.stop_value is not None and self.stop_access is not None:
            size = self.stop_access.size
            rax = self.cpu.q[0]
            if size == 4:
                rax = self.stop_value  # writing EAX zero-extends into RAX
            else:
                mask = (1 << (8 * size)) - 1
                rax = (rax & ~mask) | self.stop_value
            self.cpu.q[0] = rax

    # --- memory regions and the dirty log ----------------------------------------------------------

    def map_mmio(self, start: int, end: int) -> None:
        """Map [start, end) as MMIO reaching the dispatcher (the piece's start is the callbacks' user data)."""
        read, write = self.mmio_callbacks
        _check(_lib.uc_mmio_map(self.handle, start, end - start, read, _c_void_p(start), write, _c_void_p(start)),
               "uc_mmio_map (MMIO)")
        self.mmio_pieces.append((start, end))

    def read_only_at(self, address: int) -> bool:
        for region in self.regions:
            if region.address <= address < region.end:
                return region.read_only
        return False

    def writable_at(self, address: int) -> bool:
        if address < self.memory_size:
            return True
        return any(region.address <= address < region.end and not region.read_only for region in self.regions)

    def writable_ranges(self) -> list[tuple[int, int]]:
        """(start, size) of RAM and every writable region."""
        return [(0, self.memory_size)] + [(r.address, r.size) for r in self.regions if not r.read_only]

    def protect_pages(self, pages: Iterable[int], prot: int) -> None:
        """uc_mem_protect over runs of consecutive page frame numbers (never from inside a store: see on_write_prot)."""
        for first, count in page_runs(sorted(pages)):
            _check(_lib.uc_mem_protect(self.handle, first << 12, count << 12, prot), "uc_mem_protect")

    def protect_writable(self) -> None:
        """Writable memory as it should be between runs: all of it writable."""
        for start, size in self.writable_ranges():
            _check(_lib.uc_mem_protect(self.handle, start, size, UC.UC_PROT_ALL), "uc_mem_protect")

    # --- kicks and external interrupts --------------------------------------------------------------

    def take_kick(self) -> bool:
        """In the run loop: whether a kick is pending; consumes it (the gate stays shut for a deadline)."""
        if not self.kicked:
            return False
        with self.kick_lock:
            self.kicked = False
            self.gate.request(self.timed_out)
        return True

    def can_take_interrupt(self) -> bool:
        """RFLAGS.IF = 1 and no interrupt shadow (QEMU's HF_INHIBIT_IRQ_MASK after sti, mov ss, pop ss)."""
        return bool(self.cpu.q[S.EFLAGS // 8] & RFLAGS_IF) and not self.cpu.u32[S.HFLAGS // 4] & S.HF_INHIBIT_IRQ_MASK

    def interrupt_needs_stop(self) -> bool:
        """In a hook, with an interrupt pending: stop now (it can be taken, or the IF watch is not on yet)."""
        return self.window_hook is None or self.can_take_interrupt()

    def set_window_watch(self, on: bool) -> None:
        """Install or remove the UC_HOOK_BLOCK that stops the run once IF = 1 and no shadow.

        Unicorn decides at translation time whether a block calls a hook, so the
        translated blocks are dropped both ways (UC_CTL_TB_FLUSH): with the hook,
        every block calls it; without, the guest runs at full speed again.  Every
        instruction that can set IF (sti, popf, iret, sysret) ends its block in
        QEMU, and the one instruction in an interrupt shadow is a block of its
        own, so a block boundary is where the guest first can take the interrupt.
        """
        if on == (self.window_hook is not None):
            return
        if on:
            hook = ctypes.c_size_t()
            _check(_lib.uc_hook_add(self.handle, ctypes.byref(hook), _i32(UC.UC_HOOK_BLOCK),
                                    ctypes.cast(self.block_callback, _c_void_p), None, _u64(1), _u64(0)),
                   "uc_hook_add (UC_HOOK_BLOCK)")
            self.window_hook = hook
        elif self.window_hook is not None:
            hook, self.window_hook = self.window_hook, None
            _check(_lib.uc_hook_del(self.handle, hook.value), "uc_hook_del (UC_HOOK_BLOCK)")
        _lib.uc_ctl(self.handle, _i32(_UC_CTL_TB_FLUSH))

    def inject_interrupt(self, dispatcher: Dispatcher) -> Exit | None:
        """Between runs, with ``dispatcher.interrupt_pending``: deliver the vector, or watch for IF.

        The vector goes through the guest's IVT/IDT as an external interrupt (no
        error code, no DPL check, the frame's RIP is the next instruction, IF
        cleared by an interrupt gate), then ``acknowledge_interrupt`` is called.
        """
        if not self.can_take_interrupt():
            self.set_window_watch(True)
            return None
        self.set_window_watch(False)
        vector = dispatcher.pending_vector()
        if vector is None:
            return None
        try:
            self.delivery.deliver(vector, 0, False, external=True)
        except TripleFault:
            self.shutdown = True
            return Shutdown()
        except DeliveryUnsupported as error:
            return EmulatorFailure(str(error))
        finally:
            dispatcher.acknowledge_interrupt(vector)
        return None

    def close(self) -> None:
        if self.uc is None:
            return
        with self.kick_lock:
            self.alive = False
        self.delivery.release()
        self.cpu.release()
        release = getattr(self.uc, "_Uc__finalizer")  # the binding's weakref.finalize: uc_close, exactly once
        self.uc = None  # type: ignore[assignment]  # "closed": _live() checks it
        release()  # the engine goes before the RAM it points into
        for region in self.regions:
            region.release()
        self.ram.release()
        del self._anchor
        try:
            self.ram_map.close()
        except BufferError:
            pass  # someone still holds backend.memory; the mapping goes when they let go


class _Region:
    """A memory region beyond RAM: an anonymous mmap given to Unicorn with uc_mem_map_ptr."""

    def __init__(self, address: int, size: int, read_only: bool):
        self.address, self.size, self.end, self.read_only = address, size, address + size, read_only
        self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._anchor = ctypes.c_char.from_buffer(self.map)
        self.host_address = ctypes.addressof(self._anchor)
        self.view = memoryview(self.map)

    def release(self) -> None:
        self.view.release()
        del self._anchor
        try:
            self.map.close()
        except BufferError:
            pass  # a caller still holds the view; the mapping goes when they let go


class _MmioStop(tuple):
    """(address, size, is_write, value) of an MMIO access that asked to stop."""

    def __new__(cls, address: int, size: int, is_write: bool, value: int) -> _MmioStop:
        return super().__new__(cls, (address, size, is_write, value))


class _NoRun:
    """The engine's dispatcher between runs: Unicorn calls the hooks only inside ``uc_emu_start``."""

    stop = True
    interrupt_pending = False

    def pio(self, port: int, size: int, is_write: bool, value: int, rip: int) -> int:
        raise EmulatorError(f"port {port:#x} accessed with no run in progress")

    def mmio(self, address: int, size: int, is_write: bool, value: int, rip: int) -> int:
        raise EmulatorError(f"MMIO address {address:#x} accessed with no run in progress")

    def pending_vector(self) -> int | None:
        return None

    def acknowledge_interrupt(self, vector: int) -> None:
        raise EmulatorError(f"interrupt {vector:#x} acknowledged with no run in progress")


_NO_RUN = _NoRun()

def _time_out(engine: _Engine) -> None:
    """The watchdog's action at a run's deadline (from its own thread): stop at the next block boundary."""
    with engine.kick_lock:
        if engine.alive:
            engine.timed_out = True
            engine.gate.request(True)


class _StopGateState(ctypes.Structure):
    """``struct stop_gate`` of trap_replay.c."""

    _fields_ = [("requested", ctypes.c_int32), ("held", ctypes.c_int32), ("emu_stop", _c_void_p),
                ("stops", ctypes.c_uint64), ("blocks", ctypes.c_uint64), ("cpu", _c_void_p), ("vmem_read", _c_void_p),
                ("eip", ctypes.c_uint32), ("cs_base", ctypes.c_uint32), ("hflags", ctypes.c_uint32),
                ("cs64_mask", ctypes.c_uint32)]


class _StopGate:
    """Where stops from outside the guest (kick, pause, the deadline) are taken: block boundaries only.

    Unicorn 2.1.4 honours ``uc_emu_stop`` (QEMU's ``cpu_exit``) at the start of
    each translated block and also after every guest load and store
    (``check_exit_request``, qemu/tcg/tcg-op.c), where ``cpu_loop_exit_restore``
    puts RIP back to the start of the instruction even when its store has
    landed: a stop from another thread between the store of ``inc [m]`` and
    that check ran it twice.  So no other thread calls ``uc_emu_stop``.  It
    sets ``requested``; a UC_HOOK_BLOCK installed for the engine's whole life,
    which Unicorn calls before the block's own exit check (the block hook is
    generated before ``gen_tb_start``, qemu/accel/tcg/translator.c), calls
    ``uc_emu_stop`` there, and the block-start check takes the stop before the
    block's first instruction.  ``rep`` string instructions loop through their
    block, so they stop between iterations, as an interrupt on hardware.
    ``requested`` stays set until the run loop clears it, so a request that
    lands before ``uc_emu_start`` (which clears Unicorn's own stop request) is
    not lost.  The hook is ``stop_gate_hook`` of the C library
    (:mod:`labkit.emu.native`); where that is not built, the same check in
    Python (same stops, every block slower).
    """

    def __init__(self, handle: Any, library: ctypes.CDLL | None, cpu_address: int) -> None:
        self.state = _StopGateState(emu_stop=ctypes.cast(_lib.uc_emu_stop, _c_void_p).value, cpu=cpu_address,
                                    vmem_read=ctypes.cast(_lib.uc_vmem_read, _c_void_p).value, eip=S.EIP,
                                    cs_base=S.SEGS + S.R_CS * S.SEGMENT_SIZE + S.SEG_BASE, hflags=S.HFLAGS,
                                    cs64_mask=S.HF_CS64_MASK)
        self.handle = handle
        self.native = library is not None
        self.out_next_rip: Any = None
        """``out_next_rip()`` of trap_replay.c bound to this engine (None without the C library)."""
        if library is not None:
            out = (ctypes.c_uint64 * 2)()
            library.stop_gate_layout(ctypes.byref(out))
            if tuple(out) != (ctypes.sizeof(_StopGateState), _StopGateState.stops.offset):
                raise EmulatorError("labkit's C library and labkit.emu.unicorn_backend disagree on struct "
                                    "stop_gate's layout (a stale build?)")
            self.callback: Any = ctypes.cast(library.stop_gate_hook, _c_void_p)
            user_data = _c_void_p(ctypes.addressof(self.state))
            library.out_next_rip.argtypes = (_c_void_p, _c_void_p)
            library.out_next_rip.restype = _u64
            self.out_next_rip = partial(library.out_next_rip, ctypes.addressof(self.state), handle)
        else:
            state = self.state

            def on_block(uc: int, _address: int, _size: int, _user: object) -> None:
                state.blocks += 1
                if state.requested and not state.held:
                    state.stops += 1
                    _lib.uc_emu_stop(uc)

            self.python_callback = HOOK_BLOCK(on_block)
            self.callback = ctypes.cast(self.python_callback, _c_void_p)
            user_data = _c_void_p(None)
        hook = ctypes.c_size_t()
        _check(_lib.uc_hook_add(handle, ctypes.byref(hook), _i32(UC.UC_HOOK_BLOCK), self.callback, user_data,
                                _u64(1), _u64(0)), "uc_hook_add (UC_HOOK_BLOCK, the stop gate)")

    def request(self, on: bool) -> None:
        """Ask for (or withdraw) a stop at the next block boundary; any thread (callers hold kick_lock)."""
        self.state.requested = int(on)

    @property
    def stops(self) -> int:
        """Stops the gate has taken."""
        return self.state.stops

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """While the run loop runs one instruction alone (``count`` = 1): no stop before it."""
        self.state.held = 1
        try:
            yield
        finally:
            self.state.held = 0


def _ended(engine: _Engine) -> Exit | None:
    """After ``uc_emu_start``: re-raise a hook's exception, or the exit a hook decided (triple fault,
    an emulator failure); ``None`` when the run goes on."""
    if engine.hook_error is not None:
        error, engine.hook_error = engine.hook_error, None
        raise error
    if engine.shutdown:
        return Shutdown()
    if engine.failure is not None:
        message, engine.failure = engine.failure, None
        return EmulatorFailure(message)
    return None


class _DirtyLogState(ctypes.Structure):
    """``struct dirty_log`` of trap_replay.c."""

    _fields_ = [("bitmap", _c_void_p), ("pages", ctypes.c_uint64), ("translate", _c_void_p),
                ("untranslated", ctypes.c_uint64), ("frozen", ctypes.c_int32), ("unused", ctypes.c_int32)]


class _WriteLog:
    """The emulator's dirty log: a UC_HOOK_MEM_WRITE that sets one bit per guest-physical page stored to.

    Each store's linear address goes through ``uc_vmem_translate`` (the guest's page tables),
    so the log holds physical pages as KVM's does, whatever the mapping.  The hook is
    ``dirty_write_hook`` of the C library (:mod:`labkit.emu.native`), or the same in Python
    where that is not built (same pages, every store slower).  A store the instruction then
    abandons (a fault after it, an exact stop that undoes its block) may be logged though it
    did not land: the log can hold more pages than were written, never fewer.  While an exact
    stop has RAM frozen (:meth:`_Engine.begin_stop`) nothing is logged: those stores do not land.  The first
    version write-protected watched pages and logged the protection faults; Unicorn splits
    its memory region at every ``uc_mem_protect``, which cost 1.3 ms per first-written page
    with 2 MiB of RAM and 9 ms with 64 MiB (measured here), so that was dropped.
    """

    def __init__(self, handle: Any, pages: int) -> None:
        self.handle = handle
        self.bitmap = (ctypes.c_uint8 * ((pages + 7) // 8))()
        self.state = _DirtyLogState(bitmap=ctypes.addressof(self.bitmap), pages=pages,
                                    translate=ctypes.cast(_lib.uc_vmem_translate, _c_void_p).value)
        library = load_native()
        if library is not None:
            self.callback: Any = ctypes.cast(library.dirty_write_hook, _c_void_p)
            user_data = _c_void_p(ctypes.addressof(self.state))
        else:
            bitmap, translate, physical = self.bitmap, _lib.uc_vmem_translate, ctypes.c_uint64()

            def mark(uc: int, linear: int) -> None:
                if translate(uc, linear, UC.UC_PROT_WRITE, ctypes.byref(physical)) != 0:
                    self.state.untranslated += 1
                    return
                page = physical.value >> 12
                if page < pages:
                    bitmap[page >> 3] |= 1 << (page & 7)

            def on_write(uc: int, _type: int, address: int, size: int, _value: int, _user: object) -> None:
                if self.state.frozen:
                    return
                mark(uc, address)
                if size > 1 and (address ^ (address + size - 1)) >> 12:
                    mark(uc, address + size - 1)

            self.python_callback = HOOK_MEM(on_write)
            self.callback = ctypes.cast(self.python_callback, _c_void_p)
            user_data = _c_void_p(None)
        self.hook = ctypes.c_size_t()
        _check(_lib.uc_hook_add(handle, ctypes.byref(self.hook), _i32(UC.UC_HOOK_MEM_WRITE), self.callback,
                                user_data, _u64(1), _u64(0)), "uc_hook_add (UC_HOOK_MEM_WRITE, the dirty log)")

    def take(self) -> list[int]:
        """The pages logged since the last take, ascending; clears the log."""
        data = bytes(self.bitmap)
        ctypes.memset(self.bitmap, 0, len(data))
        return bitmap_pages(data)

    def close(self) -> None:
        _check(_lib.uc_hook_del(self.handle, self.hook.value), "uc_hook_del (the dirty log)")


_DEBUG_REGISTERS = (X.UC_X86_REG_DR0, X.UC_X86_REG_DR1, X.UC_X86_REG_DR2, X.UC_X86_REG_DR3, X.UC_X86_REG_DR6,
                    X.UC_X86_REG_DR7)
# get_fpu's registers and the bytes of each value: FPSW, FPCW, FPTAG, FOP, FIP, FDP, MXCSR, the eight physical
# x87 registers (a 64-bit significand, then sign and exponent: 80 bits), XMM0-15.
_FPU_REGISTERS = ([(X.UC_X86_REG_FPSW, 2), (X.UC_X86_REG_FPCW, 2), (X.UC_X86_REG_FPTAG, 2), (X.UC_X86_REG_FOP, 2),
                   (X.UC_X86_REG_FIP, 8), (X.UC_X86_REG_FDP, 8), (X.UC_X86_REG_MXCSR, 4)]
                  + [(X.UC_X86_REG_FP0 + i, 10) for i in range(8)] + [(X.UC_X86_REG_XMM0 + i, 16) for i in range(16)])


class EmuBackend:
    """One VM with one vCPU emulated by Unicorn; see the module docstring for what maps to what."""

    kind = "emu"

    def __init__(self, memory_size: int = layout.DEFAULT_MEMORY, mode: int = 64, *, ram_fd: int | None = None):
        if mode not in _UC_MODES:
            raise ConfigError(f"mode must be 16, 32 or 64, not {mode!r}")
        layout.check_memory_size(memory_size)
        self.mode = mode
        self._engine = _Engine(memory_size, mode, ram_fd)
        self.memory = self._engine.ram
        self._finalizer = weakref.finalize(self, self._engine.close)
        # Unicorn starts with FCW = 0 and MXCSR = 0 (every x87 and SIMD exception unmasked); KVM's vCPU
        # starts as after FNINIT with MXCSR's reset value (FCW 0x37F, MXCSR 0x1F80; SDM vol. 3, table 10-1).
        self.set_fpu(FpuState())

    # --- description ---------------------------------------------------------------------------

    def describe(self) -> dict[str, str]:
        return {
            "backend": "emu",
            "engine": f"unicorn {unicorn.__version__}",
            "disassembler": f"capstone {capstone.__version__}",
            "mode": f"{self.mode}-bit start",
            "note": "instruction-level emulation (QEMU TCG inside Unicorn); timings are not hardware timings",
        }

    # --- registers -----------------------------------------------------------------------------

    def _live(self) -> _Engine:
        if self._engine.uc is None:
            raise EmulatorError("this emulation backend is closed")
        return self._engine

    def get_regs(self) -> Regs:
        engine = self._live()
        q = engine.cpu.q
        values = {name: q[i] for i, name in enumerate(_QEMU_GPR_ORDER)}
        return Regs(rip=q[S.EIP // 8], rflags=engine.read_eflags(), **values)

    def set_regs(self, regs: Regs) -> None:
        """General registers, RIP and RFLAGS, with RFLAGS.RF cleared.

        RF only suppresses an instruction breakpoint on the next instruction, and the CPU clears it
        when that instruction completes (SDM vol. 3, 18.3.1.1).  Unicorn models neither the
        breakpoints nor the clearing, so an RF set here would stay set for good (a later
        ``syscall`` would save it in R11); the run continues as after that next instruction.
        """
        engine = self._live()
        q = engine.cpu.q
        for i, name in enumerate(_QEMU_GPR_ORDER):
            q[i] = getattr(regs, name) & 0xFFFF_FFFF_FFFF_FFFF
        q[S.EIP // 8] = regs.rip & 0xFFFF_FFFF_FFFF_FFFF
        engine.uc.reg_write(engine._eflags_id, (regs.rflags | 0x2) & ~RFLAGS_RF & 0xFFFF_FFFF)
        engine.shutdown = False

    def get_sregs(self) -> SRegs:
        engine = self._live()
        cpu = engine.cpu
        q = cpu.q
        segments: dict[str, Any] = {name: self._segment(cpu.segment(S.SEGS + index * S.SEGMENT_SIZE)) for name, index in _SEGMENTS}
        gdt = cpu.segment(S.GDT)
        idt = cpu.segment(S.IDT)
        return SRegs(
            tr=self._segment(cpu.segment(S.TR)), ldt=self._segment(cpu.segment(S.LDT)),
            gdt=DescriptorTable(base=gdt[1], limit=gdt[2]), idt=DescriptorTable(base=idt[1], limit=idt[2]),
            cr0=q[S.CR // 8], cr2=q[(S.CR + 16) // 8], cr3=q[(S.CR + 24) // 8], cr4=q[(S.CR + 32) // 8],
            cr8=engine.uc.reg_read(X.UC_X86_REG_CR8) if self.mode == 64 else 0, efer=q[cpu.deep.efer // 8], **segments)

    @staticmethod
    def _segment(cache: tuple[int, int, int, int]) -> Segment:
        selector, base, limit, flags = cache
        present = (flags >> 15) & 1
        return Segment(base=base, limit=limit, selector=selector, type=(flags >> 8) & 0xF, present=present,
                       dpl=(flags >> 13) & 3, db=(flags >> 22) & 1, s=(flags >> 12) & 1, l=(flags >> 21) & 1,
                       g=(flags >> 23) & 1, avl=(flags >> 20) & 1, unusable=0 if present else 1)

    @staticmethod
    def _flags(segment: Segment) -> int:
        return ((segment.type & 0xF) << 8 | (segment.s & 1) << 12 | (segment.dpl & 3) << 13
                | (0 if segment.unusable else (segment.present & 1)) << 15 | (segment.avl & 1) << 20
                | (segment.l & 1) << 21 | (segment.db & 1) << 22 | (segment.g & 1) << 23)

    def set_sregs(self, sregs: SRegs) -> None:
        """Set control registers, descriptor tables and segments, hidden caches included.

        CR0/CR3/CR4 go through Unicorn (QEMU updates its derived flags and flushes
        its TLB); EFER goes through Unicorn for everything but LMA, which is set in
        place from ``sregs.efer`` (Unicorn cannot otherwise set LMA without a
        CR0.PG 0->1 transition).  Segment caches are written in place as the
        descriptors would load them, so a cache that differs from the GDT, or a
        CPL 3 start (SS.DPL = 3), is honoured as on KVM.  ``cr8`` and
        ``apic_base`` are ignored: Unicorn models no local APIC.
        """
        engine = self._live()
        uc, cpu = engine.uc, engine.cpu
        uc.reg_write(X.UC_X86_REG_CR4, sregs.cr4)
        uc.reg_write(X.UC_X86_REG_CR3, sregs.cr3)
        uc.reg_write(X.UC_X86_REG_CR0, sregs.cr0)
        with engine.intercepts.suspended():
            uc.msr_write(MSR_EFER, sregs.efer & ~EFER_LMA)
        uc.reg_write(X.UC_X86_REG_CR2, sregs.cr2)
        cpu.q[cpu.deep.efer // 8] = sregs.efer
        hflags = cpu.u32[S.HFLAGS // 4] & ~S.HF_LMA_MASK
        cpu.u32[S.HFLAGS // 4] = hflags | (S.HF_LMA_MASK if sregs.efer & EFER_LMA else 0)
        for table, value in ((S.GDT, sregs.gdt), (S.IDT, sregs.idt)):
            cpu.q[(table + 8) // 8] = value.base
            cpu.u32[(table + 16) // 4] = value.limit
        for offset, segment in ((S.TR, sregs.tr), (S.LDT, sregs.ldt)):
            cpu.u32[offset // 4] = segment.selector
            cpu.q[(offset + 8) // 8] = segment.base
            cpu.u32[(offset + 16) // 4] = segment.limit
            cpu.u32[(offset + 20) // 4] = self._flags(segment)
        for name, index in sorted(_SEGMENTS, key=lambda item: item[1] == S.R_CS):
            segment = getattr(sregs, name)
            cpu.load_segment(index, segment.selector, segment.base, segment.limit, self._flags(segment))
        _lib.uc_ctl(engine.handle, _i32(_UC_CTL_TLB_FLUSH))
        engine.shutdown = False

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """RDMSR through Unicorn (QEMU's helper_rdmsr); MSRs QEMU does not model read as 0."""
        indices = tuple(indices)
        batch = self._batch("msrs", [], indices)
        with self._live().intercepts.suspended():
            return dict(zip(indices, batch.read()))

    def set_msrs(self, msrs: Mapping[int, int]) -> None:
        """WRMSR through Unicorn (QEMU's helper_wrmsr); writes QEMU does not model are dropped."""
        engine = self._live()
        with engine.intercepts.suspended():
            for index, value in msrs.items():
                engine.uc.msr_write(index, value)

    def get_fpu(self) -> FpuState:
        """x87/SSE state through Unicorn's registers, in FXSAVE's terms (ST(i) in stack order, abridged tags)."""
        fsw, fcw, tags, fop, fip, fdp, mxcsr, *rest = self._batch("fpu", _FPU_REGISTERS).read()
        top = (fsw >> 11) & 7
        physical, xmm = rest[:8], rest[8:]  # physical: significand | sign and exponent << 64
        return FpuState(
            fcw=fcw, fsw=fsw, ftw=sum(1 << i for i in range(8) if not (tags >> (2 * i)) & 3),  # tags: 0 holds a value
            fop=fop, fip=fip, fdp=fdp, mxcsr=mxcsr, st=tuple(physical[(top + i) & 7] for i in range(8)), xmm=tuple(xmm))

    def _batch(self, name: str, registers: list[tuple[int, int]], msrs: tuple[int, ...] = ()) -> RegisterBatch:
        """The engine's :class:`RegisterBatch` for ``name``: one per name, made again when other MSRs are asked
        for (so a caller asking for ever different MSRs cannot grow the engine)."""
        engine = self._live()
        batch = engine.batches.get(name)
        if batch is None or batch.msrs != msrs:
            batch = engine.batches[name] = RegisterBatch(engine.handle, registers, msrs)
        return batch

    def set_fpu(self, fpu: FpuState) -> None:
        uc = self._live().uc
        top = (fpu.fsw >> 11) & 7
        uc.reg_write(X.UC_X86_REG_FPCW, fpu.fcw)
        uc.reg_write(X.UC_X86_REG_FPSW, fpu.fsw)
        uc.reg_write(X.UC_X86_REG_FPTAG, sum((0 if fpu.ftw >> i & 1 else 1) << (2 * i) for i in range(8)))
        for i, value in enumerate(fpu.st):
            uc.reg_write(X.UC_X86_REG_FP0 + ((top + i) & 7), (value & (1 << 64) - 1, value >> 64 & 0xFFFF))
        uc.reg_write(X.UC_X86_REG_FOP, fpu.fop)
        uc.reg_write(X.UC_X86_REG_FIP, fpu.fip)
        uc.reg_write(X.UC_X86_REG_FDP, fpu.fdp)
        uc.reg_write(X.UC_X86_REG_MXCSR, fpu.mxcsr)
        for i, value in enumerate(fpu.xmm):
            uc.reg_write(X.UC_X86_REG_XMM0 + i, value)

    def get_debug_regs(self) -> DebugRegs:
        return DebugRegs(*self._batch("debug", [(register, 8) for register in _DEBUG_REGISTERS]).read())

    def set_debug_regs(self, debug: DebugRegs) -> None:
        """DR0-DR3, DR6, DR7 as values only: Unicorn does not raise #DB for breakpoints set in them."""
        uc = self._live().uc
        for register, value in zip(_DEBUG_REGISTERS, (debug.dr0, debug.dr1, debug.dr2, debug.dr3, debug.dr6, debug.dr7)):
            uc.reg_write(register, value)

    def pending_interrupt(self) -> int | None:
        """Always ``None``: the emulator delivers an acknowledged interrupt at once (:meth:`_Engine.inject_interrupt`)."""
        return None

    # --- running -------------------------------------------------------------------------------

    def read_linear(self, address: int, size: int) -> bytes:
        """Bytes at a linear address, through the guest's page tables (b"" where unmapped)."""
        engine = self._live()
        out = bytearray()
        for i in range(size):
            try:
                physical = engine.delivery._translate(address + i, False, False)
            except Exception:  # noqa: BLE001 - an unmapped byte ends the read
                break
            if physical >= engine.memory_size:
                break
            out.append(engine.ram[physical])
        return bytes(out)

    def kick(self) -> None:
        """End the run in progress at the next instruction boundary with :class:`~labkit.exits.Interrupted`.

        Thread-safe.  The kick goes through the stop gate (:class:`_StopGate`):
        the run stops before the next translated block, so every instruction
        up to there completes exactly once (its port and MMIO accesses reach the
        dispatcher as usual), the vCPU state is consistent and the next ``run``
        continues there.  A kick while no run is in progress makes the next
        ``run`` return ``Interrupted`` at once without running guest code.
        """
        engine = self._engine
        with engine.kick_lock:
            if not engine.alive:
                return
            engine.kicked = True
            engine.gate.request(True)

    def run(self, dispatcher: Dispatcher, timeout: float) -> Exit:
        engine = self._live()
        if timeout <= 0:
            raise ConfigError(f"timeout must be positive, not {timeout!r}")
        return self._run(engine, dispatcher, timeout)

    def _run(self, engine: _Engine, dispatcher: Dispatcher, timeout: float) -> Exit:
        if engine.take_kick():
            return Interrupted()
        if engine.shutdown:
            return Shutdown()
        engine.dispatcher = dispatcher
        engine.irq = hasattr(dispatcher, "interrupt_pending")
        engine.delivery.flush()
        cpu = engine.cpu
        deadline = time.monotonic() + timeout
        with engine.kick_lock:
            engine.timed_out = False
            engine.gate.request(engine.kicked)
        token = WATCHDOG.arm(deadline, partial(_time_out, engine))
        try:
            while True:
                if engine.take_kick():
                    return Interrupted()
                if engine.timed_out or time.monotonic() >= deadline:
                    return Timeout(budget_s=timeout)
                if engine.irq and dispatcher.interrupt_pending:
                    outcome = engine.inject_interrupt(dispatcher)
                    if outcome is not None:
                        return outcome
                elif engine.window_hook is not None:
                    engine.set_window_watch(False)
                engine.clear_stop()
                engine.stop = None
                begin = self._start_address()
                status = _lib.uc_emu_start(engine.handle, begin, _NEVER, 0, 0)
                exact_stop = engine.stop_state is not None
                engine.finish_stop(self.read_linear)
                cpu.i32[cpu.deep.old_exception // 4] = -1
                rom_write, engine.rom_write = engine.rom_write, False
                ended = _ended(engine)
                if ended is not None:
                    return ended
                if engine.pending_fault is not None:
                    (vector, error_code), engine.pending_fault = engine.pending_fault, None
                    outcome = self._deliver_outside(vector, error_code)
                    if outcome is not None:
                        return outcome
                    continue
                if engine.intercepted is not None:
                    outcome = self._intercepted()
                    if outcome is not None:
                        return outcome
                    continue
                if engine.stop is not None:
                    stop = engine.stop
                    if isinstance(stop, _MmioStop):
                        engine.mmio_replay = list(engine.mmio_done)
                        return Mmio(*stop)
                    return stop
                if exact_stop:
                    continue  # an absorbed I/O with an interrupt pending
                if status == UC.UC_ERR_WRITE_PROT and rom_write:
                    outcome = self._step_one(dispatcher)
                    if outcome is not None:
                        return outcome
                    continue
                if status == UC.UC_ERR_OK:
                    if engine.halted.value:
                        return Hlt()  # RIP is after the hlt, as on KVM; a kick or deadline now waits for the next run
                    if engine.window_open:
                        engine.window_open = False
                    continue  # stopped by a kick, the deadline, an interrupt or an absorbed I/O: checked at the top
                if status == UC.UC_ERR_INSN_INVALID:
                    outcome = self._deliver_outside(6)
                    if outcome is not None:
                        return outcome
                    continue
                if status in (UC.UC_ERR_FETCH_UNMAPPED, UC.UC_ERR_READ_UNMAPPED, UC.UC_ERR_WRITE_UNMAPPED,
                              UC.UC_ERR_FETCH_PROT):
                    what = {UC.UC_ERR_FETCH_UNMAPPED: "fetched code from", UC.UC_ERR_FETCH_PROT: "fetched code from",
                            UC.UC_ERR_READ_UNMAPPED: "read", UC.UC_ERR_WRITE_UNMAPPED: "wrote"}[status]
                    return EmulatorFailure(f"the guest {what} guest-physical memory with no RAM behind it, which "
                                           "the emulator cannot complete (KVM stops such a guest with "
                                           "KVM_EXIT_INTERNAL_ERROR)")
                return EmulatorFailure(f"Unicorn stopped at rip={cpu.q[S.EIP // 8]:#x}: "
                                       f"{_lib.uc_strerror(status).decode()}")
        finally:
            WATCHDOG.disarm(token)
            engine.dispatcher = _NO_RUN
            engine.window_open = False
            engine.clear_stop()

    # --- memory beyond RAM and the dirty log ---------------------------------------------------------

    def add_memory_region(self, guest_address: int, size: int, *, read_only: bool = False) -> memoryview:
        """Map ``size`` bytes of new memory at ``guest_address``; returns the host's view of it.

        The region is carved out of the MMIO range above RAM (``uc_mem_unmap`` of
        that MMIO piece, ``uc_mmio_map`` of what remains on either side,
        ``uc_mem_map_ptr`` of an anonymous mmap).  A read-only region (KVM's
        KVM_MEM_READONLY) reads and executes as memory; a guest store to it is
        dropped and reaches the dispatcher as an MMIO write (address, size,
        value), through UC_HOOK_MEM_WRITE_PROT.  The run goes on after it;
        when the dispatcher sets ``stop``, the run ends with that
        :class:`~labkit.exits.Mmio` at the end of the translated block, as for
        other MMIO.  Exception delivery (stack frames, descriptor tables) only
        reaches RAM: a handler stack in a region is an
        :class:`~labkit.exits.EmulatorFailure`.
        """
        engine = self._live()
        for name, value in (("guest_address", guest_address), ("size", size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value % layout.PAGE_SIZE:
                raise ConfigError(f"{name} must be a whole number of 4 KiB pages, not {value!r}")
        if size == 0:
            raise ConfigError("a memory region cannot be empty")
        end = guest_address + size
        if guest_address < engine.memory_size:
            raise ConfigError(f"memory region [{guest_address:#x}, {end:#x}) overlaps RAM [0, {engine.memory_size:#x})")
        if end > layout.MAPPED_LIMIT:
            raise ConfigError(f"memory region [{guest_address:#x}, {end:#x}) ends above {layout.MAPPED_LIMIT:#x}, "
                              "the end of guest-physical memory labkit maps")
        for region in engine.regions:
            if guest_address < region.end and region.address < end:
                raise ConfigError(f"memory region [{guest_address:#x}, {end:#x}) overlaps the region "
                                  f"[{region.address:#x}, {region.end:#x})")
        piece = next(p for p in engine.mmio_pieces if p[0] <= guest_address and end <= p[1])
        region = _Region(guest_address, size, read_only)
        engine.uc.mem_unmap(piece[0], piece[1] - piece[0])
        engine.mmio_pieces.remove(piece)
        for start, stop in ((piece[0], guest_address), (end, piece[1])):
            if start < stop:
                engine.map_mmio(start, stop)
        prot = _READ_EXEC if read_only else UC.UC_PROT_ALL
        _check(_lib.uc_mem_map_ptr(engine.handle, guest_address, size, prot, _c_void_p(region.host_address)),
               "uc_mem_map_ptr (memory region)")
        engine.regions.append(region)
        engine.regions.sort(key=lambda r: r.address)
        return region.view

    def regions(self) -> list[tuple[int, memoryview, bool]]:
        """(guest_address, view, read_only) of RAM and every region, RAM first."""
        engine = self._live()
        return [(0, self.memory, False)] + [(r.address, r.view, r.read_only) for r in engine.regions]

    def dirty_log_start(self) -> None:
        """Log the guest-physical pages the guest writes from now on (a write hook; see :class:`_WriteLog`).

        The exception and interrupt frames labkit's delivery pushes are logged too (on a real CPU,
        and so in KVM's log, the CPU writes them).  Stores by the host through the views are not
        logged.  Call between runs.
        """
        engine = self._live()
        if engine.dirty is None:
            engine.dirty = _WriteLog(engine.handle, layout.MAPPED_LIMIT >> 12)
            engine.delivery.written = set()
            if engine.replay is not None:
                engine.replay.set_dirty_log(ctypes.addressof(engine.dirty.bitmap), layout.MAPPED_LIMIT >> 12)

    def dirty_log_fetch(self) -> list[int]:
        """Sorted guest-physical page frame numbers written since the start or the last fetch; clears them.

        Only pages of RAM and writable regions: a store to a read-only region or to MMIO changes no memory.
        """
        engine = self._live()
        if engine.dirty is None:
            raise ConfigError("the dirty log is not started (call dirty_log_start first)")
        pushed = engine.delivery.written or set()
        engine.delivery.written = set()
        pages = engine.dirty.take()  # ascending
        if pushed:
            pages = sorted(set(pages) | pushed)
        kept: list[int] = []
        for start, size in sorted(engine.writable_ranges()):  # pages with start <= page << 12 < start + size
            first, end = -(-start >> 12), -(-(start + size) >> 12)
            kept.extend(pages[bisect.bisect_left(pages, first):bisect.bisect_left(pages, end)])
        return kept

    def dirty_log_stop(self) -> None:
        """Stop logging (the write hook is removed: stores cost nothing extra again)."""
        engine = self._live()
        if engine.dirty is not None:
            if engine.replay is not None:
                engine.replay.set_dirty_log(None, 0)
            engine.dirty.close()
            engine.dirty = None
            engine.delivery.written = None

    def _start_address(self) -> int:
        """The ``begin`` argument of uc_emu_start for the current RIP (mode 16: CS.selector * 16 + IP)."""
        cpu = self._engine.cpu
        begin = cpu.q[S.EIP // 8]
        if self.mode == 16:
            begin = (cpu.u32[(S.SEGS + S.R_CS * S.SEGMENT_SIZE) // 4] << 4) + (begin & 0xFFFF)
        return begin

    def _intercepted(self) -> Exit | None:
        """After an intercepted CR0/CR4 write or MSR access (Unicorn stopped before it): #GP(0) or run it."""
        engine = self._engine
        intercepted, engine.intercepted = engine.intercepted, None
        if intercepted is None:
            return None
        exit_code, is_write = intercepted
        cpu = engine.cpu
        hflags = cpu.u32[S.HFLAGS // 4]
        cs_base = cpu.q[(S.SEGS + S.R_CS * S.SEGMENT_SIZE + 8) // 8]
        instruction = self.read_linear(cs_base + cpu.q[S.EIP // 8], 15)
        if engine.intercepts.refuses(exit_code, is_write, instruction, bool(hflags & S.HF_LMA_MASK),
                                     bool(hflags & S.HF_CS64_MASK)):
            return self._deliver_outside(13, 0)
        return self._step_one(engine.dispatcher, intercepts_off=True)

    def _step_one(self, dispatcher: Dispatcher, *, intercepts_off: bool = False) -> Exit | None:
        """Run the one instruction Unicorn stopped before, alone, then go on with the run loop.

        For a store to a read-only region: each store to read-only memory reaches
        the dispatcher as an MMIO write and lands, and the bytes are put back
        afterwards, last store first.  For an intercepted instruction the CPU
        judged allowed: with the intercepts off (``intercepts_off``).  ``count`` =
        1 counts only in blocks translated with Unicorn's count hook, so the
        translated blocks are dropped first (and again by the next uncounted start).
        """
        engine = self._engine
        _lib.uc_ctl(engine.handle, _i32(_UC_CTL_TB_FLUSH))
        engine.rom_step = not intercepts_off
        if intercepts_off:
            engine.intercepts.off()
        try:
            with engine.gate.held():
                status = _lib.uc_emu_start(engine.handle, self._start_address(), _NEVER, 0, 1)
        finally:
            engine.rom_step = False
            if intercepts_off:
                engine.intercepts.on()
            for region, offset, old in reversed(engine.rom_undo):
                region.view[offset:offset + len(old)] = old
            engine.rom_undo.clear()
        writes, engine.rom_writes = engine.rom_writes, []
        engine.cpu.i32[engine.cpu.deep.old_exception // 4] = -1
        ended = _ended(engine)
        if ended is not None:
            return ended
        if status not in (UC.UC_ERR_OK, UC.UC_ERR_WRITE_PROT):
            return EmulatorFailure(f"Unicorn stopped at rip={engine.cpu.q[S.EIP // 8]:#x} while stepping one "
                                   f"instruction: {_lib.uc_strerror(status).decode()}")
        if writes and dispatcher.stop:
            return Mmio(*writes[-1])
        return None

    def _deliver_outside(self, vector: int, error_code: int = 0) -> Exit | None:
        """Deliver an exception after uc_emu_start returned (#UD, on which Unicorn stops; I/O #GP)."""
        engine = self._engine
        try:
            engine.delivery.deliver(vector, error_code, False)
        except TripleFault:
            engine.shutdown = True
            return Shutdown()
        except DeliveryUnsupported as error:
            return EmulatorFailure(str(error))
        return None

    def close(self) -> None:
        """Free the Unicorn engine and guest RAM (also done when the backend is garbage-collected)."""
        self._finalizer()

    def __enter__(self) -> "EmuBackend":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["EmuBackend", "GPR_NAMES"]
