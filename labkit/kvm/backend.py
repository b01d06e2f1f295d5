"""``KvmBackend``: one VM with one vCPU on ``/dev/kvm``, implementing :class:`labkit.backend.Backend`.

Guest RAM is an anonymous mmap registered as memory slot 0 at guest-physical 0
with ``KVM_MEM_LOG_DIRTY_PAGES``.  :meth:`KvmBackend.run` loops on ``KVM_RUN``
and hands port and MMIO exits to the dispatcher while the guest waits; that
loop is the hot path (one exit every ~9 µs under PVM), so it builds no objects
per absorbed exit, reads RIP from the sync-regs area of ``kvm_run``
(``KVM_CAP_SYNC_REGS``) instead of calling ``KVM_GET_REGS``, and reads the
exit's fields with one precompiled ``struct`` unpack.

RIP given to the dispatcher is what KVM reports at the exit: after an ``out``
(the instruction has completed) but at an ``in`` (KVM finishes the ``in`` on
the next ``KVM_RUN``, with the value the dispatcher returned).
"""

from __future__ import annotations

import ctypes
import errno as _errno
import math
import mmap
import os
import signal
import struct
import threading
import time
from functools import partial
from typing import Iterable, Mapping

from labkit import exits
from labkit.errors import ConfigError, KvmError
from labkit.kvm import bindings as kb
from labkit.kvm.ioctl import get_errno, kvm_run_ioctl
from labkit.kvm.system import Kvm, kvm_flavour
from labkit.kvm.vm import dirty_page_numbers
from labkit.watchdog import KICK_SIGNAL, WATCHDOG
from labkit.x86 import layout
from labkit.x86.state import DescriptorTable, Regs, Segment, SRegs

MODES = (16, 32, 64)
REGS_FIELDS = tuple(name for name, _ in kb.kvm_regs._fields_)
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


def _kick(run, thread_ident: int) -> None:
    """The watchdog's action at a run's deadline: make the next ``KVM_RUN`` return at once, and
    interrupt the current one with the kick signal (unblocked for ``KVM_RUN`` only)."""
    run.immediate_exit = 1
    try:
        signal.pthread_kill(thread_ident, KICK_SIGNAL)
    except ProcessLookupError:
        pass  # the thread is gone; nothing left to stop


class KvmBackend:
    """A guest on ``/dev/kvm``: ``memory_size`` bytes of RAM at 0, one vCPU, starting in ``mode`` (16/32/64).

    ``mode`` is recorded for :meth:`describe`; the caller loads the start state
    (``labkit.x86.boot.boot_state``) with :meth:`set_sregs`/:meth:`set_regs`/:meth:`set_msrs`.
    Use as a context manager, or call :meth:`close`.
    """

    kind = "kvm"

    def __init__(self, memory_size: int = layout.DEFAULT_MEMORY, mode: int = 64):
        if not isinstance(memory_size, int) or memory_size % layout.PAGE_SIZE \
                or not layout.MIN_MEMORY <= memory_size <= layout.MAX_MEMORY:
            raise ConfigError(f"memory_size must be a multiple of 4 KiB in [{layout.MIN_MEMORY:#x}, "
                              f"{layout.MAX_MEMORY:#x}], not {memory_size!r}")
        if mode not in MODES:
            raise ConfigError(f"mode must be 16, 32 or 64, not {mode!r}")
        self.memory_size = memory_size
        self.mode = mode
        self.flavour = kvm_flavour()
        self._closed = False
        self._kvm = Kvm()
        try:
            self._vm = self._kvm.create_vm()
            if self.flavour == "kvm_intel" and self._kvm.check_extension(kb.KVM_CAP_SET_TSS_ADDR):
                self._vm.set_identity_map_addr(VMX_IDENTITY_MAP_ADDRESS)
                self._vm.set_tss_addr(VMX_TSS_ADDRESS)
            self._ram = mmap.mmap(-1, memory_size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
            anchor = ctypes.c_char.from_buffer(self._ram)
            ram_address = ctypes.addressof(anchor)
            del anchor  # a ctypes view pins the mmap; the address is all we need
            self._vm.set_user_memory_region(0, 0, memory_size, ram_address, kb.KVM_MEM_LOG_DIRTY_PAGES)
            self.memory = memoryview(self._ram)
            self._vcpu = self._vm.create_vcpu(0)
            self._vcpu.set_cpuid2(self._kvm.supported_cpuid())
        except BaseException:
            self.close()
            raise
        run = self._vcpu.run
        self.sync_regs = bool(self._vm.check_extension(kb.KVM_CAP_SYNC_REGS) & kb.KVM_SYNC_X86_REGS)
        if self.sync_regs:
            run.kvm_valid_regs = kb.KVM_SYNC_X86_REGS  # KVM copies kvm_regs into run.s at every exit
        self._run = run
        self._sync = run.s.regs.regs  # a view into kvm_run: .rip is read per exit
        self._signal_mask: bytes | None = None

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
        """``KVM_GET_REGS`` as a :class:`Regs`."""
        raw = self._vcpu.get_regs()
        return Regs(*(getattr(raw, name) for name in REGS_FIELDS))

    def set_regs(self, regs: Regs) -> None:
        """``KVM_SET_REGS``.  Never goes through ``kvm_dirty_regs``, so the sync-regs copy cannot undo it."""
        self._vcpu.set_regs(kb.kvm_regs(*(getattr(regs, name) & _U64 for name in REGS_FIELDS)))

    def get_sregs(self) -> SRegs:
        """``KVM_GET_SREGS`` as an :class:`SRegs` (the interrupt bitmap is dropped)."""
        raw = self._vcpu.get_sregs()
        values = {}
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

    def get_fpu(self) -> kb.kvm_fpu:
        """``KVM_GET_FPU``: x87/SSE state as the raw ``struct kvm_fpu`` (FXSAVE layout)."""
        return self._vcpu.get_fpu()

    def set_fpu(self, fpu: kb.kvm_fpu) -> None:
        """``KVM_SET_FPU``."""
        self._vcpu.set_fpu(fpu)

    # --- KVM-only views ----------------------------------------------------------------

    def stats(self) -> dict[str, int | tuple[int, ...]]:
        """The vCPU's binary stats (``KVM_GET_STATS_FD``): ``exits``, ``insn_emulation``, ``halt_exits``, ..."""
        return self._vcpu.stats().read()

    def dirty_pages(self) -> list[int]:
        """Page frame numbers of RAM written since the last call (``KVM_GET_DIRTY_LOG`` on slot 0).

        Also clears the kernel's dirty bitmap: the next call reports only newer writes.
        Only the guest's writes are logged (including those KVM's instruction emulator
        makes for it); writes by the host through :attr:`memory` are not.
        """
        return dirty_page_numbers(self._vm.get_dirty_log(0))

    # --- running -------------------------------------------------------------------------

    def run(self, dispatcher, timeout: float) -> exits.Exit:
        """Run the guest until an exit the dispatcher does not absorb, or ``timeout`` seconds pass.

        ``KVM_EXIT_IO`` (each element of a string ``ins``/``outs`` separately) and
        ``KVM_EXIT_MMIO`` go to ``dispatcher.pio``/``dispatcher.mmio``; a read's
        return value is masked to the access size and written into ``kvm_run``
        for the next ``KVM_RUN``.  When ``dispatcher.stop`` is set after a call,
        that exit is returned as :class:`labkit.exits.Io` / :class:`labkit.exits.Mmio`.
        Any other exit is returned as its :mod:`labkit.exits` type.  Callable from
        any thread; Ctrl-C during the run raises ``KeyboardInterrupt`` and leaves
        the VM usable.
        """
        if self._closed:
            raise ConfigError("this KvmBackend is closed")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ConfigError(f"timeout must be a positive number of seconds, not {timeout!r}")
        signum = KICK_SIGNAL
        before = signal.pthread_sigmask(signal.SIG_BLOCK, (signum,))
        try:
            kvm_mask = _sigset_bytes(before - {signum})
            if kvm_mask != self._signal_mask:
                self._vcpu.set_signal_mask(kvm_mask)
                self._signal_mask = kvm_mask
            deadline = time.monotonic() + timeout
            token = None
            if math.isfinite(timeout):
                token = WATCHDOG.arm(deadline, partial(_kick, self._run, threading.get_ident()))
            try:
                return self._loop(dispatcher, deadline, timeout)
            finally:
                if token is not None and WATCHDOG.disarm(token):
                    while signal.sigtimedwait((signum,), 0) is not None:
                        pass  # consume the kick so it cannot fire once unblocked
                self._run.immediate_exit = 0
        finally:
            if signum not in before:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, (signum,))

    def _loop(self, dispatcher, deadline: float, timeout: float) -> exits.Exit:
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
        sync = self.sync_regs
        get_regs = self._vcpu.get_regs
        monotonic = time.monotonic
        EXIT_IO, EXIT_MMIO = kb.KVM_EXIT_IO, kb.KVM_EXIT_MMIO
        EINTR, EAGAIN = _errno.EINTR, _errno.EAGAIN

        while True:
            if ioctl(fd, kvm_run_request, 0) < 0:
                error = get_errno()
                if error == EINTR or error == EAGAIN:
                    if monotonic() >= deadline:
                        return exits.Timeout(budget_s=timeout)
                    continue  # another signal (Python runs its handler: SIGINT raises here)
                raise KvmError("KVM_RUN", error)
            reason, direction, size, port, count, offset, rip = exit_fields(page, 0)
            if reason == EXIT_IO:
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
                    for element in range(count):
                        value = pio(port, size, False, 0, rip) & mask
                        pack(page, offset + element * size, value)
                if dispatcher.stop:
                    return exits.Io(port, size, bool(direction), value)
            elif reason == EXIT_MMIO:
                address, data, size, is_write = mmio_fields(page, exit_offset)
                if not sync:
                    rip = get_regs().rip
                size = min(size, 8)
                if is_write:
                    value = int.from_bytes(data[:size], "little")
                    mmio(address, size, True, value, rip)
                else:
                    value = mmio(address, size, False, 0, rip) & ((1 << (8 * size)) - 1)
                    page[mmio_data_offset:mmio_data_offset + size] = value.to_bytes(size, "little")
                if dispatcher.stop:
                    return exits.Mmio(address, size, bool(is_write), value)
            else:
                return self._decode(reason)

    def _decode(self, reason: int) -> exits.Exit:
        """The :mod:`labkit.exits` object for a ``KVM_EXIT_*`` the dispatcher does not see."""
        run = self._run
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
        """Close the vCPU, the VM and ``/dev/kvm``, then unmap RAM (unless views of it are still held)."""
        if self._closed:
            return
        self._closed = True
        self._run = self._sync = None
        for name in ("_vcpu", "_vm", "_kvm"):
            part = getattr(self, name, None)
            if part is not None:
                part.close()
        memory = getattr(self, "memory", None)
        if memory is not None:
            try:
                memory.release()
            except BufferError:
                pass
        ram = getattr(self, "_ram", None)
        if ram is not None:
            try:
                ram.close()
            except BufferError:
                pass  # slices of .memory are still alive; the mapping goes with the last of them

    def __enter__(self) -> "KvmBackend":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.memory_size // 1024} KiB, {self.mode}-bit"
        return f"<KvmBackend {self.flavour} {state}>"
