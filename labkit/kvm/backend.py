"""``KvmBackend``: one VM with one vCPU on ``/dev/kvm``, implementing :class:`labkit.backend.Backend`.

Guest RAM is an anonymous mmap registered as memory slot 0 at guest-physical 0;
:meth:`KvmBackend.add_memory_region` adds more slots above it.  :meth:`KvmBackend.run`
loops on ``KVM_RUN`` and hands port and MMIO exits to the dispatcher while the
guest waits; that loop is the hot path (one exit every ~9 µs under PVM), so it
builds no objects per absorbed exit, reads RIP from the sync-regs area of
``kvm_run`` (``KVM_CAP_SYNC_REGS``) instead of calling ``KVM_GET_REGS``, reads
the exit's fields with one precompiled ``struct`` unpack, and looks at
``dispatcher.interrupt_pending`` once per ``KVM_RUN``.

RIP given to the dispatcher is what KVM reports at the exit: after an ``out``
(the instruction has completed) but at an ``in`` (KVM finishes the ``in`` on
the next ``KVM_RUN``, with the value the dispatcher returned).  Whenever
:meth:`KvmBackend.run` returns, the vCPU is at an instruction boundary: a read
it stopped at is completed first (``KVM_RUN`` with ``immediate_exit`` set
finishes pending I/O and returns ``EINTR``, Documentation/virt/kvm/api.rst),
so ``get_regs()`` shows the value read and a later ``run()`` goes on from there.

Interrupts come from a userspace interrupt controller (the dispatcher): labkit
creates no in-kernel irqchip, so ``KVM_INTERRUPT`` and the interrupt-window exit
work (``KVM_EXIT_IRQ_WINDOW_OPEN``), and a ``hlt`` always exits to userspace.

Exit controls (:class:`labkit.kvm.controls.KvmExitControls`) are applied when the
VM is made; :meth:`KvmBackend.run_stats` puts the vCPU's own counters (binary
stats fd) beside the exits this loop saw.
"""

from __future__ import annotations

import ctypes
from ctypes import c_uint64
import errno as _errno
import math
import mmap
import os
import signal
import struct
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterable, Mapping

from labkit import exits
from labkit.exits import Dispatcher
from labkit.errors import ConfigError, KvmError
from labkit.kvm import bindings as kb
from labkit.kvm.controls import KvmExitControls, missing_capabilities, msr_filter_ranges
from labkit.kvm.ioctl import get_errno, kvm_run_ioctl
from labkit.kvm.stats import KvmRunStats
from labkit.kvm.system import Kvm, kvm_flavour
from labkit.kvm.vm import dirty_page_numbers
from labkit.watchdog import KICK_SIGNAL, WATCHDOG, ThreadTimer
from labkit.x86 import layout
from labkit.x86.state import DebugRegs, DescriptorTable, FpuState, Regs, Segment, SRegs

MODES = (16, 32, 64)
REGS_FIELDS = tuple(field[0] for field in kb.kvm_regs._fields_)
SEGMENT_FIELDS = tuple(name for name in Segment.__slots__)
DTABLE_FIELDS = ("base", "limit")
SREGS_SCALARS = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")

# VT-x without "unrestricted guest" needs three pages for a real-mode TSS and one
# for an identity page table, outside RAM and below 4 GiB (the addresses QEMU uses).
VMX_IDENTITY_MAP_ADDRESS = 0xFEFFC000
VMX_TSS_ADDRESS = VMX_IDENTITY_MAP_ADDRESS + 0x1000

_EXIT_OFFSET = kb.kvm_run.u.offset
_SYNC_RIP_OFFSET = kb.kvm_run.s.offset + kb.kvm_sync_regs.regs.offset + kb.kvm_regs.rip.offset
_EXIT_FIELDS = struct.Struct(
    f"<{kb.kvm_run.exit_reason.offset}xI{_EXIT_OFFSET - kb.kvm_run.exit_reason.offset - 4}x"
    f"BBHIQ{_SYNC_RIP_OFFSET - _EXIT_OFFSET - 16}xQ"
)
"""exit_reason; io.direction, io.size, io.port, io.count, io.data_offset; s.regs.regs.rip."""
_SYNC_REGS_OFFSET = kb.kvm_run.s.offset + kb.kvm_sync_regs.regs.offset
_SYNC_REGS = struct.Struct(f"<{len(kb.kvm_regs._fields_)}Q")
"""``kvm_run.s.regs.regs``: the ``kvm_regs`` KVM copies there at every return of ``KVM_RUN`` (sync regs)."""
_MMIO_FIELDS = struct.Struct("<Q8sIB")  # kvm_run.mmio: phys_addr, data, len, is_write
_VALUE_FORMATS = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I")}
_MASKS = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF}
_U64 = 0xFFFF_FFFF_FFFF_FFFF


def _sigset_bytes(signals: Iterable[int]) -> bytes:
    """The kernel's 64-bit ``sigset_t`` (bit n-1 for signal n) for ``KVM_SET_SIGNAL_MASK``."""
    bits = 0
    for signum in signals:
        if 1 <= int(signum) <= 64:
            bits |= 1 << (int(signum) - 1)
    return bits.to_bytes(8, "little")


def _kick(run: kb.kvm_run, thread_ident: int) -> None:
    """The watchdog's action at a run's deadline: make the next ``KVM_RUN`` return at once, and
    interrupt the current one with the kick signal (unblocked for ``KVM_RUN`` only)."""
    run.immediate_exit = 1
    try:
        signal.pthread_kill(thread_ident, KICK_SIGNAL)
    except ProcessLookupError:
        pass  # the thread is gone; nothing left to stop


class _NoInterrupts:
    """Stands in for a dispatcher without ``interrupt_pending`` (one written before interrupts existed)."""

    interrupt_pending = False


_NO_INTERRUPTS = _NoInterrupts()


@dataclass(frozen=True)
class _VmCapabilities:
    """What every VM of one KVM device offers, asked of the first VM a process makes there (three
    ``KVM_CHECK_EXTENSION`` ioctls on each VM fd otherwise; the answers are the module's, not the VM's)."""

    sync_regs: bool
    readonly_memory: bool
    max_slots: int


_VM_CAPABILITIES: dict[str, _VmCapabilities] = {}


@dataclass(frozen=True)
class _Slot:
    """One KVM memory slot and the host mapping behind it (RAM is slot 0)."""

    slot: int
    guest_address: int
    size: int
    read_only: bool
    mapping: mmap.mmap
    host_address: int
    view: memoryview

    @property
    def end(self) -> int:
        return self.guest_address + self.size


def _anonymous_mapping(size: int) -> tuple[mmap.mmap, int]:
    """Zeroed host memory for a slot, and its address (a ctypes view pins an mmap, so none is kept)."""
    mapping = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, mmap.PROT_READ | mmap.PROT_WRITE)
    anchor = ctypes.c_char.from_buffer(mapping)
    address = ctypes.addressof(anchor)
    del anchor
    return mapping, address


XSTATE_X87 = 1 << 0
XSTATE_SSE = 1 << 1
FXSAVE = struct.Struct("<HHBxHQQII")
"""FCW, FSW, abridged FTW, FOP, FIP, FDP, MXCSR, MXCSR_MASK: bytes 0-31 of the FXSAVE area (64-bit format)."""


def _fpu_from_fxsave(area: bytes) -> FpuState:
    fcw, fsw, ftw, fop, fip, fdp, mxcsr, _ = FXSAVE.unpack_from(area)
    return FpuState(fcw=fcw, fsw=fsw, ftw=ftw, fop=fop, fip=fip, fdp=fdp, mxcsr=mxcsr,
                    st=tuple(int.from_bytes(area[32 + 16 * i:42 + 16 * i], "little") for i in range(8)),
                    xmm=tuple(int.from_bytes(area[160 + 16 * i:176 + 16 * i], "little") for i in range(16)))


def _fxsave_from_fpu(fpu: FpuState, old: bytes) -> bytes:
    area = bytearray(old)
    mxcsr_mask = struct.unpack_from("<I", old, 28)[0]
    FXSAVE.pack_into(area, 0, fpu.fcw, fpu.fsw, fpu.ftw, fpu.fop, fpu.fip, fpu.fdp, fpu.mxcsr, mxcsr_mask)
    for i, value in enumerate(fpu.st):
        area[32 + 16 * i:48 + 16 * i] = (value & ((1 << 80) - 1)).to_bytes(16, "little")
    for i, value in enumerate(fpu.xmm):
        area[160 + 16 * i:176 + 16 * i] = (value & ((1 << 128) - 1)).to_bytes(16, "little")
    return bytes(area)


class KvmBackend:
    """A guest on ``/dev/kvm``: ``memory_size`` bytes of RAM at 0, one vCPU, starting in ``mode`` (16/32/64).

    ``mode`` is recorded for :meth:`describe`; the caller loads the start state
    (``labkit.x86.boot.boot_state``) with :meth:`set_sregs`/:meth:`set_regs`/:meth:`set_msrs`.
    ``controls`` sets KVM's exit controls (checked against the capabilities first:
    :class:`ConfigError` naming what this KVM does not offer).
    Use as a context manager, or call :meth:`close`.
    """

    kind = "kvm"

    def __init__(self, memory_size: int = layout.DEFAULT_MEMORY, mode: int = 64,
                 controls: KvmExitControls | None = None):
        layout.check_memory_size(memory_size)
        if mode not in MODES:
            raise ConfigError(f"mode must be 16, 32 or 64, not {mode!r}")
        if controls is not None and not isinstance(controls, KvmExitControls):
            raise ConfigError(f"controls must be a labkit.kvm.KvmExitControls, not {type(controls).__name__}")
        self.controls = controls or KvmExitControls()
        self._eventfds: list[tuple[bool, int, int, int, int]] = []  # (pio, address, length, datamatch, fd)
        self.memory_size = memory_size
        self.mode = mode
        self.flavour = kvm_flavour()
        self._closed = False
        self._kvm = Kvm()
        self._slots: list[_Slot] = []
        # kick(): a flag and immediate_exit under a lock, and the thread running KVM_RUN (to signal).
        self._kick_lock = threading.RLock()  # re-entrant: kick() may come from a signal handler in this thread
        self._kick_pending = False
        self._kick_signalled = False
        self._vcpu_thread: int | None = None
        try:
            self._vm = self._kvm.create_vm()
            if self.flavour == "kvm_intel" and self._kvm.check_extension(kb.KVM_CAP_SET_TSS_ADDR):
                self._vm.set_identity_map_addr(VMX_IDENTITY_MAP_ADDRESS)
                self._vm.set_tss_addr(VMX_TSS_ADDRESS)
            self._dirty_logging = False
            self._add_slot(0, memory_size, read_only=False)
            self.memory = self._slots[0].view
            self._apply_vm_controls(self.controls)  # DISABLE_EXITS only before the first vCPU
            self._vcpu = self._vm.create_vcpu(0)
            self._vcpu.set_cpuid2(self._kvm.supported_cpuid())
            self._stats_base = self._vcpu.stats().values()
        except BaseException:
            self.close()
            raise
        self.userspace_exits: dict[int, int] = {}
        """Returns of ``KVM_RUN`` this backend saw, by ``KVM_EXIT_*`` number (``KVM_EXIT_INTR`` for EINTR)."""
        self.delivered = {"coalesced_mmio": 0, "coalesced_pio": 0, "ioeventfd": 0}
        """Writes KVM kept in the kernel (coalesced ring, ioeventfds) that this backend handed to the dispatcher."""
        self._kernel_writes = bool(self.controls.coalesced or self._eventfds)
        run = self._vcpu.run
        capabilities = _VM_CAPABILITIES.get(self._kvm.device)
        if capabilities is None:
            capabilities = _VM_CAPABILITIES[self._kvm.device] = _VmCapabilities(
                bool(self._vm.check_extension(kb.KVM_CAP_SYNC_REGS) & kb.KVM_SYNC_X86_REGS),
                bool(self._vm.check_extension(kb.KVM_CAP_READONLY_MEM)),
                self._vm.check_extension(kb.KVM_CAP_NR_MEMSLOTS) or 32)
        self.sync_regs = capabilities.sync_regs
        if self.sync_regs:
            run.kvm_valid_regs = kb.KVM_SYNC_X86_REGS  # KVM copies kvm_regs into run.s at every exit
        self._regs_synced = False
        """Whether ``run.s.regs`` holds the vCPU's registers now: KVM wrote them at the last return of
        ``KVM_RUN`` and no ``KVM_SET_REGS`` came since (then :meth:`get_regs` reads them there)."""
        self._regs_set = 0
        """How many ``KVM_SET_REGS`` so far: one during a run (a device's handler) leaves the copy stale."""
        self._run: kb.kvm_run | None = run  # None once closed
        self._signal_mask: bytes | None = None
        # A read an exception cut short: (exit reason, port/address, size, rip, data offset, element, count).
        self._unanswered: tuple[int, int, int, int, int, int, int] | None = None
        self.readonly_memory = capabilities.readonly_memory
        self._max_slots = capabilities.max_slots

    # --- Backend protocol: description and state ----------------------------------

    def describe(self) -> dict[str, str]:
        """What runs the guest: backend, flavour (kvm_intel/kvm_amd/kvm_pvm), kernel, API, sync regs."""
        return {
            "backend": "kvm",
            "flavour": self.flavour,
            "kernel": os.uname().release,
            "api_version": str(kb.KVM_API_VERSION),
            "bindings": kb.HEADER_VERSION,
            "mode": str(self.mode),
            "memory": f"{self.memory_size // 1024} KiB",
            "sync_regs": "yes" if self.sync_regs else "no (KVM_GET_REGS per exit)",
        }

    def get_regs(self) -> Regs:
        """The vCPU's registers as a :class:`Regs`: ``KVM_GET_REGS``, or with sync regs after a run the copy
        KVM left in ``kvm_run.s.regs`` when ``KVM_RUN`` returned (the same values, without the ioctl)."""
        if self._regs_synced:
            return Regs(*_SYNC_REGS.unpack_from(self._vcpu._run_map, _SYNC_REGS_OFFSET))
        raw = self._vcpu.get_regs()
        return Regs(*(getattr(raw, name) for name in REGS_FIELDS))

    def set_regs(self, regs: Regs) -> None:
        """``KVM_SET_REGS``.  Never goes through ``kvm_dirty_regs``, so the sync-regs copy cannot undo it.

        RFLAGS.IF may have changed, so ``kvm_run.if_flag`` (KVM writes it at each
        exit) is cleared: a pending interrupt then waits for a fresh window.
        """
        run = self._live_run()
        self._regs_synced = False
        self._regs_set += 1
        self._vcpu.set_regs(kb.kvm_regs(*(getattr(regs, name) & _U64 for name in REGS_FIELDS)))
        run.if_flag = 0

    def get_sregs(self) -> SRegs:
        """``KVM_GET_SREGS`` as an :class:`SRegs` (the interrupt bitmap is dropped)."""
        raw = self._vcpu.get_sregs()
        values: dict[str, Any] = {}  # SRegs' fields by name: Segment, DescriptorTable or int
        for name in kb.SEGMENT_NAMES:
            segment = getattr(raw, name)
            values[name] = Segment(*(getattr(segment, field) for field in SEGMENT_FIELDS))
        for name in ("gdt", "idt"):
            table = getattr(raw, name)
            values[name] = DescriptorTable(table.base, table.limit)
        for name in SREGS_SCALARS:
            values[name] = getattr(raw, name)
        return SRegs(**values)

    def set_sregs(self, sregs: SRegs) -> None:
        """``KVM_SET_SREGS`` from an :class:`SRegs` (no pending interrupt)."""
        raw = kb.kvm_sregs()
        for name in kb.SEGMENT_NAMES:
            source, target = getattr(sregs, name), getattr(raw, name)
            for field in SEGMENT_FIELDS:
                setattr(target, field, getattr(source, field))
        for name in ("gdt", "idt"):
            source, target = getattr(sregs, name), getattr(raw, name)
            target.base, target.limit = source.base, source.limit
        for name in SREGS_SCALARS:
            setattr(raw, name, getattr(sregs, name))
        self._vcpu.set_sregs(raw)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """``KVM_GET_MSRS``."""
        return self._vcpu.get_msrs(indices)

    def set_msrs(self, msrs: Mapping[int, int]) -> None:
        """``KVM_SET_MSRS``."""
        self._vcpu.set_msrs(msrs)

    def get_fpu(self) -> FpuState:
        """x87/SSE state from ``KVM_GET_XSAVE``'s legacy area (FXSAVE layout, Intel SDM vol. 1, table 10-2).

        Not ``KVM_GET_FPU``: Linux's ``KVM_SET_FPU``/``KVM_GET_FPU`` leave MXCSR out (measured here:
        a set 0x1FA0 read back as 0).
        """
        return _fpu_from_fxsave(bytes(self._vcpu.get_xsave())[:512])

    def set_fpu(self, fpu: FpuState) -> None:
        """``KVM_SET_XSAVE`` with the legacy area from ``fpu`` (the AVX and later components kept as they are)."""
        area = self._vcpu.get_xsave()
        raw = bytearray(area)
        raw[:512] = _fxsave_from_fpu(fpu, bytes(raw[:512]))
        header = struct.unpack_from("<Q", raw, 512)[0]
        struct.pack_into("<Q", raw, 512, header | XSTATE_X87 | XSTATE_SSE)  # XSTATE_BV: these two components are set
        self._vcpu.set_xsave(kb.kvm_xsave.from_buffer_copy(raw))

    def get_debug_regs(self) -> DebugRegs:
        """``KVM_GET_DEBUGREGS``."""
        raw = self._vcpu.get_debugregs()
        return DebugRegs(raw.db[0], raw.db[1], raw.db[2], raw.db[3], dr6=raw.dr6, dr7=raw.dr7)

    def set_debug_regs(self, debug: DebugRegs) -> None:
        """``KVM_SET_DEBUGREGS``."""
        self._vcpu.set_debugregs(kb.kvm_debugregs(db=(c_uint64 * 4)(debug.dr0, debug.dr1, debug.dr2, debug.dr3),
                                                  dr6=debug.dr6, dr7=debug.dr7))

    def pending_interrupt(self) -> int | None:
        """The external interrupt queued with ``KVM_INTERRUPT`` and not yet delivered (``KVM_GET_SREGS``'
        ``interrupt_bitmap``), or ``None``.  KVM delivers it at the next guest entry; a run that ended
        before entering (a kick) leaves it queued."""
        bitmap = self._vcpu.get_sregs().interrupt_bitmap
        for word, bits in enumerate(bitmap):
            if bits:
                return word * 64 + (bits & -bits).bit_length() - 1
        return None

    # --- KVM-only views ----------------------------------------------------------------

    def stats(self) -> dict[str, int | tuple[int, ...]]:
        """The vCPU's binary stats (``KVM_GET_STATS_FD``): ``exits``, ``insn_emulation``, ``halt_exits``, ..."""
        return self._vcpu.stats().read()

    def run_stats(self) -> KvmRunStats:
        """The vCPU's cumulative counters since this backend was made, beside the exits its run loop saw
        (:class:`labkit.kvm.stats.KvmRunStats`); one ``pread`` of the stats fd."""
        self._check_open()
        counters = self._vcpu.stats().growth(self._stats_base)
        userspace = {exits.reason_name(reason): count for reason, count in sorted(self.userspace_exits.items())}
        return KvmRunStats(self.flavour, counters, userspace, dict(self.delivered), self.controls.describe())

    # --- exit controls -------------------------------------------------------------------

    def _apply_vm_controls(self, controls: KvmExitControls) -> None:
        """Apply ``controls`` to the new VM (before its vCPU exists), after checking the capabilities."""
        if not controls:
            return
        problems = missing_capabilities(self._vm.check_extension, controls)
        if problems:
            raise ConfigError(f"these KVM exit controls are not offered by this host's KVM ({self.flavour}): "
                              + "; ".join(problems))
        if controls.disable_exits:
            self._vm.disable_exits(controls.disable_exits_flags)
        if controls.msrs:
            self._vm.enable_user_space_msr(kb.KVM_MSR_EXIT_REASON_FILTER)
            self._vm.set_msr_filter(msr_filter_ranges(controls.msrs))
        for zone in controls.coalesced:
            self._vm.register_coalesced_mmio(zone.address, zone.length, pio=zone.pio)
        for event in controls.ioeventfds:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._eventfds.append((event.pio, event.address, event.length, event.datamatch, fd))
            self._vm.ioeventfd(fd, event.address, event.length, pio=event.pio, datamatch=event.datamatch)

    def _deliver_kernel_writes(self, dispatcher: Dispatcher) -> None:
        """Hand the writes KVM kept in the kernel to the dispatcher: the coalesced ring oldest first,
        then each eventfd's count of notifications (as writes of its ``datamatch``)."""
        kernel_write = dispatcher.kernel_write  # type: ignore[attr-defined]  # checked in run()
        delivered = self.delivered
        if self.controls.coalesced:
            for pio, address, length, data in self._vcpu.drain_coalesced():
                delivered["coalesced_pio" if pio else "coalesced_mmio"] += 1
                kernel_write(pio, address, length, int.from_bytes(data, "little"))
        for pio, address, length, datamatch, fd in self._eventfds:
            try:
                count = os.eventfd_read(fd)  # the notifications since the last read; resets it to 0
            except BlockingIOError:
                continue
            delivered["ioeventfd"] += count
            for _ in range(count):
                kernel_write(pio, address, length, datamatch)

    def _answer_msr(self, run: kb.kvm_run, dispatcher: Dispatcher, reason: int, rip: int) -> None:
        """``KVM_EXIT_X86_RDMSR``/``WRMSR``: ask the dispatcher; ``None``/``False`` sets ``msr.error``
        (KVM injects #GP on the next ``KVM_RUN``), a read's value goes into ``msr.data``."""
        msr = run.msr
        is_write = reason == kb.KVM_EXIT_X86_WRMSR
        answer = dispatcher.msr(msr.index, is_write, msr.data if is_write else 0, rip)  # type: ignore[attr-defined]
        if answer is None or answer is False:
            msr.error = 1
        else:
            msr.error = 0
            if not is_write:
                msr.data = int(answer) & _U64

    # --- Backend protocol: memory regions and the dirty log ---------------------------

    def add_memory_region(self, guest_address: int, size: int, *, read_only: bool = False) -> memoryview:
        """Back ``[guest_address, +size)`` with new host memory (one more ``KVM_SET_USER_MEMORY_REGION`` slot).

        Page-aligned, above RAM, not overlapping another region, and below
        ``layout.MAPPED_LIMIT`` (what the boot page tables map).  Returns the
        region's memory, zeroed and writable by the host.  ``read_only`` registers
        it with ``KVM_MEM_READONLY`` (needs ``KVM_CAP_READONLY_MEM``): the guest
        reads it as memory, and each guest write to it becomes a ``KVM_EXIT_MMIO``
        write handed to ``dispatcher.mmio`` (the memory is not changed).  Under
        PVM, CPL0 writes go through KVM's instruction emulator and CPL3 writes fault
        on the read-only shadow page; both end as that MMIO write.
        """
        if self._closed:
            raise ConfigError("this KvmBackend is closed")
        for name, value in (("guest_address", guest_address), ("size", size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"memory region {name} must be a non-negative int, not {value!r}")
        if size == 0 or guest_address % layout.PAGE_SIZE or size % layout.PAGE_SIZE:
            raise ConfigError(f"memory region [{guest_address:#x}, +{size:#x}) must be non-empty, "
                              "start and size multiples of 4 KiB")
        end = guest_address + size
        if end > layout.MAPPED_LIMIT:
            raise ConfigError(f"memory region [{guest_address:#x}, {end:#x}) ends beyond "
                              f"{layout.MAPPED_LIMIT:#x}, the end of what the guest's page tables map")
        for slot in self._slots:
            if guest_address < slot.end and slot.guest_address < end:
                what = "RAM" if slot.slot == 0 else "memory region"
                raise ConfigError(f"memory region [{guest_address:#x}, {end:#x}) overlaps {what} "
                                  f"[{slot.guest_address:#x}, {slot.end:#x})")
        if read_only and not self.readonly_memory:
            raise ConfigError("read-only memory regions need KVM_CAP_READONLY_MEM, which this kernel does not offer")
        if len(self._slots) >= self._max_slots:
            raise ConfigError(f"KVM offers {self._max_slots} memory slots (KVM_CAP_NR_MEMSLOTS); all are in use")
        return self._add_slot(guest_address, size, read_only=bool(read_only)).view

    def _add_slot(self, guest_address: int, size: int, *, read_only: bool) -> _Slot:
        mapping, host_address = _anonymous_mapping(size)
        number = max((slot.slot for slot in self._slots), default=-1) + 1
        slot = _Slot(number, guest_address, size, read_only, mapping, host_address, memoryview(mapping))
        try:
            self._vm.set_user_memory_region(number, guest_address, size, host_address, self._slot_flags(slot))
        except BaseException:
            slot.view.release()
            mapping.close()
            raise
        self._slots.append(slot)
        self._slots.sort(key=lambda each: each.guest_address)
        return slot

    def _slot_flags(self, slot: _Slot) -> int:
        if slot.read_only:
            return kb.KVM_MEM_READONLY
        return kb.KVM_MEM_LOG_DIRTY_PAGES if self._dirty_logging else 0

    def regions(self) -> list[tuple[int, memoryview, bool]]:
        """``(guest_address, memory, read_only)`` for RAM and then every added region, by address."""
        return [(slot.guest_address, slot.view, slot.read_only) for slot in self._slots]

    def dirty_log_start(self) -> None:
        """Log the guest's writes to every writable slot from now on (``KVM_MEM_LOG_DIRTY_PAGES``).

        The flag is on only between start and stop: free on PVM when not fetched
        (measured), but on VT-x/AMD-V it keeps KVM from mapping the slot with huge pages.

        Re-registers each writable slot with the flag (``KVM_SET_USER_MEMORY_REGION``
        with the same range: a flags-only change); the kernel starts each log empty.
        Regions added while logging log too.  Starting again clears the log.
        """
        self._check_open()
        if self._dirty_logging:
            self.dirty_log_fetch()
            return
        self._dirty_logging = True
        self._set_slot_flags()

    def dirty_log_fetch(self) -> list[int]:
        """Guest-physical page frame numbers (address >> 12) the guest wrote since the start or the last fetch.

        Sorted, over RAM and every writable region: one ``KVM_GET_DIRTY_LOG`` per
        slot, which also clears the kernel's bitmap and write-protects those pages
        again (labkit does not enable ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``, which
        would separate the two), so the next fetch reports only newer writes.  The
        guest's writes are logged, including those KVM's instruction emulator makes
        for it (all CPL0 code under PVM); the host's writes through the memoryviews
        are not.  With EPT/NPT (VT-x, AMD-V) and for emulated code the log is exact.
        Native CPL3 code under PVM runs on KVM's shadow page tables: the first touch
        after the start of a page whose guest PTE is writable and dirty (labkit's boot
        page tables set D) maps it writable at once, so it is logged even if only read;
        after a fetch only real writes are logged (tests/kvm/test_kvm_memory.py).

        Cost, measured on PVM (``benchmarks/bench_kvm_dirty_log.py``): logging that
        is on but not fetched costs a write-heavy CPL3 guest nothing measurable; each
        fetch makes the next write to every logged page fault once (~20 µs a page).
        """
        self._check_open()
        if not self._dirty_logging:
            raise ConfigError("the dirty log is not started: call dirty_log_start() first")
        pages: list[int] = []
        for slot in self._slots:
            if not slot.read_only:
                base = slot.guest_address // layout.PAGE_SIZE
                pages.extend(base + page for page in dirty_page_numbers(self._vm.get_dirty_log(slot.slot)))
        return pages  # slots are kept sorted by address and do not overlap

    def dirty_log_stop(self) -> None:
        """Stop logging: clear ``KVM_MEM_LOG_DIRTY_PAGES`` on every writable slot (unlogged writes take no fault)."""
        self._check_open()
        if self._dirty_logging:
            self._dirty_logging = False
            self._set_slot_flags()

    def _set_slot_flags(self) -> None:
        for slot in self._slots:
            if not slot.read_only:
                self._vm.set_user_memory_region(slot.slot, slot.guest_address, slot.size, slot.host_address,
                                                self._slot_flags(slot))

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("this KvmBackend is closed")

    def _live_run(self) -> kb.kvm_run:
        """The ``kvm_run`` page; :class:`ConfigError` once closed."""
        run = self._run
        if run is None:
            raise ConfigError("this KvmBackend is closed")
        return run

    # --- running -------------------------------------------------------------------------

    def kick(self) -> None:
        """Make the run in progress return :class:`labkit.exits.Interrupted` at the next instruction boundary.

        Thread-safe (any thread, also a device called from the run itself).  Sets
        ``kvm_run.immediate_exit`` and sends the vCPU thread :data:`KICK_SIGNAL`,
        which only ``KVM_RUN`` leaves unblocked: ``KVM_RUN`` returns ``EINTR``
        (after completing an ``in`` still pending, so the state is consistent).
        With no run in progress, the next :meth:`run` returns ``Interrupted()`` at
        once without running guest code.  A kick after a closed backend does nothing.
        """
        with self._kick_lock:
            run = self._run
            if run is None:
                return
            self._kick_pending = True
            run.immediate_exit = 1
            thread = self._vcpu_thread
            if thread is not None:
                self._kick_signalled = True
                try:
                    signal.pthread_kill(thread, KICK_SIGNAL)
                except ProcessLookupError:
                    pass

    def _take_kick(self, run: kb.kvm_run) -> None:
        with self._kick_lock:
            self._kick_pending = False
            run.immediate_exit = 0

    def run(self, dispatcher: Dispatcher, timeout: float) -> exits.Exit:
        """Run the guest until an exit the dispatcher does not absorb, a :meth:`kick`, or ``timeout`` seconds.

        ``KVM_EXIT_IO`` (each element of a string ``ins``/``outs`` separately) and
        ``KVM_EXIT_MMIO`` go to ``dispatcher.pio``/``dispatcher.mmio``; a read's
        return value is masked to the access size and written into ``kvm_run``
        for the next ``KVM_RUN``.  When ``dispatcher.stop`` is set after a call,
        that exit is returned as :class:`labkit.exits.Io` / :class:`labkit.exits.Mmio`
        (a read completed first).  Any other exit is returned as its
        :mod:`labkit.exits` type; a kick as ``Interrupted()``.

        Before each ``KVM_RUN`` it reads ``dispatcher.interrupt_pending`` (a
        dispatcher without it has no interrupts).  When set and the guest can take
        an external interrupt (``kvm_run.ready_for_interrupt_injection`` and
        ``if_flag``: IF = 1, no ``sti``/``mov ss`` shadow, none queued) it injects
        ``dispatcher.pending_vector()`` with ``KVM_INTERRUPT`` and calls
        ``dispatcher.acknowledge_interrupt(vector)``; otherwise it sets
        ``request_interrupt_window`` and injects at the ``KVM_EXIT_IRQ_WINDOW_OPEN``
        exit, or at any earlier exit that finds the window open.  On VT-x the
        window exit comes as soon as the guest can take the interrupt.  Under PVM it
        comes as well, but measured here some instructions late (0 to a dozen
        emulated CPL0 instructions after the ``sti``), and an exit to userspace that
        comes first (a port write) is where the interrupt goes in instead; PVM does
        honour the one-instruction ``sti`` shadow (``sti; hlt`` halts first).

        With exit controls (:class:`labkit.kvm.controls.KvmExitControls`) the dispatcher
        also needs ``kernel_write(pio, address, size, value)`` (coalesced zones, ioeventfds:
        the writes KVM kept, delivered at each return of ``KVM_RUN`` before that exit is
        handled) and ``msr(index, is_write, value, rip) -> int | None`` (user-space MSRs:
        ``KVM_EXIT_X86_RDMSR``/``WRMSR``; ``None`` raises #GP in the guest).

        ``hlt`` always ends the run as :class:`labkit.exits.Hlt` (no in-kernel
        irqchip, so KVM does not wait in the kernel), with RIP past the ``hlt``, even
        when an interrupt is pending: the caller decides whether to wait.  The next
        ``run()`` goes on after the ``hlt``, injecting first if IF = 1 (measured on
        PVM; the same KVM path on VT-x and AMD-V).

        Callable from any thread; Ctrl-C during the run raises ``KeyboardInterrupt``
        and leaves the VM usable.  An exception out of the dispatcher (or Ctrl-C
        landing in it) while it answers a read leaves that read unanswered: the next
        ``run()`` asks its dispatcher for it first, so the guest still reads the value
        the device gives (until then ``get_regs()`` shows RIP at the read).
        """
        run = self._live_run()
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ConfigError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if self._kernel_writes and not hasattr(dispatcher, "kernel_write"):
            raise ConfigError("coalesced zones and ioeventfds need a dispatcher with kernel_write(pio, address, "
                              f"size, value) to deliver the writes KVM kept; {type(dispatcher).__name__} has none")
        if self.controls.msrs and not hasattr(dispatcher, "msr"):
            raise ConfigError("MSRs sent to userspace need a dispatcher with msr(index, is_write, value, rip); "
                              f"{type(dispatcher).__name__} has none")
        if self._unanswered is not None:
            self._answer_unanswered_read(dispatcher, self._unanswered)
        if self._kick_pending:  # kicked while no run was in progress
            self._take_kick(run)
            return exits.Interrupted()
        signum = KICK_SIGNAL
        before = signal.pthread_sigmask(signal.SIG_BLOCK, (signum,))
        try:
            kvm_mask = _sigset_bytes(before - {signum})
            if kvm_mask != self._signal_mask:
                self._vcpu.set_signal_mask(kvm_mask)
                self._signal_mask = kvm_mask
            with self._kick_lock:
                self._vcpu_thread = threading.get_ident()
            deadline = time.monotonic() + timeout
            token = None
            timer = None
            if math.isfinite(timeout):
                timer = ThreadTimer(deadline, threading.get_native_id(), signum)  # the kick without the GIL
                if not timer.ok:  # the kernel refused a timer: the watchdog thread kicks instead
                    token = WATCHDOG.arm(deadline, partial(_kick, run, threading.get_ident()))
            self._regs_synced = False  # until the loop has returned: then KVM_RUN has written run.s.regs
            regs_set = self._regs_set
            try:
                exit = self._loop(run, dispatcher, deadline, timeout)
                self._regs_synced = self.sync_regs and self._regs_set == regs_set  # no handler set them since
                return exit
            finally:
                fired = token is not None and WATCHDOG.disarm(token)  # after this the watchdog cannot fire
                if timer is not None:
                    timer.close()  # after this the kernel's timer cannot fire either
                    fired = True  # drain its signal if it was sent
                with self._kick_lock:
                    self._vcpu_thread = None
                    signalled, self._kick_signalled = self._kick_signalled or fired, False
                    run.immediate_exit = 1 if self._kick_pending else 0
                run.request_interrupt_window = 0
                if signalled:
                    while signal.sigtimedwait((signum,), 0) is not None:
                        pass  # consume the kick so it cannot fire once unblocked
        finally:
            if signum not in before:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, (signum,))

    def _answer_unanswered_read(self, dispatcher: Dispatcher,
                                unanswered: tuple[int, int, int, int, int, int, int]) -> None:
        """Ask the dispatcher again for a read whose answer an exception cut short in the last run.

        KVM completes the ``in`` (or MMIO read) with whatever ``kvm_run`` holds at the
        next ``KVM_RUN``, so it must hold the value: the elements not yet answered are
        read now (a string ``ins`` goes on from the element it stopped at).
        """
        kind, where, size, rip, offset, element, count = unanswered
        page = self._vcpu._run_map
        if kind == kb.KVM_EXIT_IO:
            pack = _VALUE_FORMATS[size].pack_into
            while element < count:
                pack(page, offset + element * size, dispatcher.pio(where, size, False, 0, rip) & _MASKS[size])
                element += 1
                self._unanswered = (kind, where, size, rip, offset, element, count)
        else:
            value = dispatcher.mmio(where, size, False, 0, rip) & ((1 << (8 * size)) - 1)
            page[offset:offset + size] = value.to_bytes(size, "little")
        self._unanswered = None

    def _offer_interrupt(self, run: kb.kvm_run, dispatcher: Dispatcher) -> None:
        """Inject the dispatcher's pending interrupt if the guest can take it now, else ask for the window."""
        if run.ready_for_interrupt_injection and run.if_flag:
            vector = dispatcher.pending_vector()
            if vector is not None:
                self._vcpu.interrupt(vector)
                dispatcher.acknowledge_interrupt(vector)
                # Stale until KVM_RUN returns; KVM refuses a second vector before this one is delivered.
                run.ready_for_interrupt_injection = 0
            run.request_interrupt_window = 1 if dispatcher.interrupt_pending else 0
        else:
            run.request_interrupt_window = 1

    def _loop(self, run: kb.kvm_run, dispatcher: Dispatcher, deadline: float, timeout: float) -> exits.Exit:
        # Everything the hot path touches is bound to a local first, and one
        # struct unpack reads exit_reason, the io fields and the synced RIP.
        fd = self._vcpu.fd
        ioctl = kvm_run_ioctl
        kvm_run_request = kb.KVM_RUN
        page = self._vcpu._run_map  # kvm_run plus the PIO data page (at io.data_offset)
        exit_fields = _EXIT_FIELDS.unpack_from
        mmio_fields = _MMIO_FIELDS.unpack_from
        exit_offset = _EXIT_OFFSET
        mmio_data_offset = _EXIT_OFFSET + 8
        unpack_value = {size: fmt.unpack_from for size, fmt in _VALUE_FORMATS.items()}
        pack_value = {size: fmt.pack_into for size, fmt in _VALUE_FORMATS.items()}
        masks = _MASKS
        pio = dispatcher.pio
        mmio = dispatcher.mmio
        interrupts: Dispatcher | _NoInterrupts = \
            dispatcher if hasattr(dispatcher, "interrupt_pending") else _NO_INTERRUPTS
        sync = self.sync_regs
        get_regs = self._vcpu.get_regs
        monotonic = time.monotonic
        EXIT_IO, EXIT_MMIO, EXIT_IRQ_WINDOW_OPEN = kb.KVM_EXIT_IO, kb.KVM_EXIT_MMIO, kb.KVM_EXIT_IRQ_WINDOW_OPEN
        EXIT_RDMSR, EXIT_WRMSR = kb.KVM_EXIT_X86_RDMSR, kb.KVM_EXIT_X86_WRMSR
        EINTR, EAGAIN = _errno.EINTR, _errno.EAGAIN
        seen = self.userspace_exits
        deliver = self._deliver_kernel_writes if self._kernel_writes else None
        # A read the dispatcher stopped at, returned once KVM_RUN has completed it.
        stopped: exits.Io | exits.Mmio | exits.Interrupted | None = None
        io_exits = mmio_exits = 0  # counted in locals on the hot path, added to `seen` when the loop ends
        try:
            while True:
                if interrupts.interrupt_pending and stopped is None and not self._kick_pending:
                    self._offer_interrupt(run, dispatcher)
                if ioctl(fd, kvm_run_request, 0) < 0:
                    error = get_errno()
                    if error == EINTR or error == EAGAIN:
                        seen[kb.KVM_EXIT_INTR] = seen.get(kb.KVM_EXIT_INTR, 0) + 1
                        if deliver is not None:
                            deliver(dispatcher)
                        if stopped is not None:
                            with self._kick_lock:
                                run.immediate_exit = 1 if self._kick_pending else 0
                            return stopped
                        if self._kick_pending:
                            self._take_kick(run)
                            return exits.Interrupted()
                        if monotonic() >= deadline:
                            return exits.Timeout(budget_s=timeout)
                        continue  # another signal (Python runs its handler: SIGINT raises here)
                    raise KvmError("KVM_RUN", error)
                if deliver is not None:  # writes KVM kept in the kernel come before this exit
                    deliver(dispatcher)
                reason, direction, size, port, count, offset, rip = exit_fields(page, 0)
                if reason == EXIT_IO:
                    io_exits += 1
                    if not sync:
                        rip = get_regs().rip
                    if direction and count == 1:  # the common case: one `out`
                        value = unpack_value[size](page, offset)[0]
                        pio(port, size, True, value, rip)
                    elif size not in masks:
                        return exits.Unsupported(reason)  # KVM only does 1-, 2- and 4-byte port I/O
                    elif direction:  # KVM_EXIT_IO_OUT, string form
                        for element in range(count):
                            value = unpack_value[size](page, offset + element * size)[0]
                            pio(port, size, True, value, rip)
                    else:  # KVM_EXIT_IO_IN: the value goes back into kvm_run for the next KVM_RUN
                        mask, pack = masks[size], pack_value[size]
                        element = 0
                        try:
                            while element < count:
                                value = pio(port, size, False, 0, rip) & mask
                                pack(page, offset + element * size, value)
                                element += 1
                        except BaseException:  # the dispatcher raised, or Ctrl-C landed in it
                            self._unanswered = (EXIT_IO, port, size, rip, offset, element, count)
                            raise
                    if dispatcher.stop:
                        if direction:  # an `out` has completed before its exit
                            return exits.Io(port, size, True, value)
                        stopped = exits.Io(port, size, False, value)
                        run.immediate_exit = 1  # complete the `in`, then return (the EINTR branch above)
                elif reason == EXIT_MMIO:
                    mmio_exits += 1
                    address, data, size, is_write = mmio_fields(page, exit_offset)
                    if not sync:
                        rip = get_regs().rip
                    size = min(size, 8)
                    if is_write:
                        value = int.from_bytes(data[:size], "little")
                        mmio(address, size, True, value, rip)
                    else:
                        try:
                            value = mmio(address, size, False, 0, rip) & ((1 << (8 * size)) - 1)
                        except BaseException:
                            self._unanswered = (EXIT_MMIO, address, size, rip, mmio_data_offset, 0, 1)
                            raise
                        page[mmio_data_offset:mmio_data_offset + size] = value.to_bytes(size, "little")
                    if dispatcher.stop:
                        if is_write:
                            return exits.Mmio(address, size, True, value)
                        stopped = exits.Mmio(address, size, False, value)
                        run.immediate_exit = 1
                else:
                    seen[reason] = seen.get(reason, 0) + 1
                    if reason == EXIT_IRQ_WINDOW_OPEN:
                        run.request_interrupt_window = 0  # asked again above while an interrupt is still pending
                    elif reason == EXIT_RDMSR or reason == EXIT_WRMSR:
                        if not sync:
                            rip = get_regs().rip
                        self._answer_msr(run, dispatcher, reason, rip)
                        if dispatcher.stop:  # KVM completes the access on the next KVM_RUN: do that, then return
                            stopped = exits.Interrupted()
                            run.immediate_exit = 1
                    else:
                        return self._decode(run, reason)
        finally:
            if io_exits:
                seen[EXIT_IO] = seen.get(EXIT_IO, 0) + io_exits
            if mmio_exits:
                seen[EXIT_MMIO] = seen.get(EXIT_MMIO, 0) + mmio_exits

    def _decode(self, run: kb.kvm_run, reason: int) -> exits.Exit:
        """The :mod:`labkit.exits` object for a ``KVM_EXIT_*`` the dispatcher does not see."""
        if reason == kb.KVM_EXIT_HLT:
            return exits.Hlt()
        if reason == kb.KVM_EXIT_SHUTDOWN:
            return exits.Shutdown()
        if reason == kb.KVM_EXIT_FAIL_ENTRY:
            return exits.FailEntry(run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu)
        if reason == kb.KVM_EXIT_INTERNAL_ERROR:
            internal = run.internal
            return exits.InternalError(internal.suberror, tuple(internal.data[:min(internal.ndata, 16)]))
        if reason == kb.KVM_EXIT_SYSTEM_EVENT:
            event = run.system_event
            return exits.SystemEvent(event.type, tuple(event.data[:min(event.ndata, 16)]))
        if reason == kb.KVM_EXIT_DEBUG:
            return exits.Debug(run.debug.arch.exception, run.debug.arch.pc)
        if reason == kb.KVM_EXIT_EXCEPTION:
            return exits.Exception_(run.ex.exception, run.ex.error_code)
        if reason == kb.KVM_EXIT_HYPERCALL:
            return exits.Hypercall(run.hypercall.nr, tuple(run.hypercall.args))
        if reason == kb.KVM_EXIT_INTR:
            return exits.Interrupted()
        return exits.Unsupported(reason)

    # --- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Close the vCPU, the VM and ``/dev/kvm``, then unmap RAM and the regions (unless views are still held)."""
        if self._closed:
            return
        self._closed = True
        with self._kick_lock:  # a kick() racing with close() sees either the run page or None
            self._run = None
        for name in ("_vcpu", "_vm", "_kvm"):
            part = getattr(self, name, None)
            if part is not None:
                part.close()
        for *_, eventfd in getattr(self, "_eventfds", ()):
            os.close(eventfd)  # after the VM: KVM holds its own reference to a registered eventfd
        self._eventfds = []
        for slot in self._slots:
            try:
                slot.view.release()
            except BufferError:
                pass
            try:
                slot.mapping.close()
            except BufferError:
                pass  # slices of the view are still alive; the mapping goes with the last of them
        self._slots = []

    def __enter__(self) -> "KvmBackend":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.memory_size // 1024} KiB, {self.mode}-bit"
        return f"<KvmBackend {self.flavour} {state}>"
