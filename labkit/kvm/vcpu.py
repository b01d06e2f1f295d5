"""A vCPU fd: registers, MSRs, CPUID, ``KVM_RUN`` and its shared ``kvm_run`` page."""

from __future__ import annotations

import ctypes
import errno as _errno
import mmap
import os
import weakref
from typing import Iterable, Mapping

from labkit.errors import ConfigError, KvmError
from labkit.kvm import bindings as kb
from labkit.kvm.ioctl import get_errno, ioctl, raw_ioctl
from labkit.kvm.stats import BinaryStats


class VcpuFd:
    """One vCPU (``KVM_CREATE_VCPU``).  Made by :meth:`labkit.kvm.vm.VmFd.create_vcpu`.

    ``run`` is the ``struct kvm_run`` the kernel shares with us (a ctypes view
    of the mmap of the vCPU fd, read with ``from_buffer``): after ``KVM_RUN``
    returns it says why, and for I/O it holds the data.
    """

    def __init__(self, fd: int, mmap_size: int):
        self.fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)
        try:
            self._run_map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as error:
            self.close()
            raise KvmError("mmap of the vCPU fd", error.errno or 0) from error
        self.run = kb.kvm_run.from_buffer(self._run_map)
        self._stats: BinaryStats | None = None

    # --- registers ---------------------------------------------------------------

    def get_regs(self) -> kb.kvm_regs:
        """``KVM_GET_REGS``."""
        regs = kb.kvm_regs()
        ioctl(self.fd, kb.KVM_GET_REGS, ctypes.byref(regs), "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: kb.kvm_regs) -> None:
        """``KVM_SET_REGS``."""
        ioctl(self.fd, kb.KVM_SET_REGS, ctypes.byref(regs), "KVM_SET_REGS")

    def get_sregs(self) -> kb.kvm_sregs:
        """``KVM_GET_SREGS``."""
        sregs = kb.kvm_sregs()
        ioctl(self.fd, kb.KVM_GET_SREGS, ctypes.byref(sregs), "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: kb.kvm_sregs) -> None:
        """``KVM_SET_SREGS``: also flushes the vCPU's MMU context when CR0/CR3/CR4/EFER change."""
        ioctl(self.fd, kb.KVM_SET_SREGS, ctypes.byref(sregs), "KVM_SET_SREGS")

    def get_fpu(self) -> kb.kvm_fpu:
        """``KVM_GET_FPU``: x87 and SSE state in FXSAVE layout."""
        fpu = kb.kvm_fpu()
        ioctl(self.fd, kb.KVM_GET_FPU, ctypes.byref(fpu), "KVM_GET_FPU")
        return fpu

    def set_fpu(self, fpu: kb.kvm_fpu) -> None:
        """``KVM_SET_FPU``."""
        ioctl(self.fd, kb.KVM_SET_FPU, ctypes.byref(fpu), "KVM_SET_FPU")

    def get_xsave(self) -> kb.kvm_xsave:
        """``KVM_GET_XSAVE``: the x87/SSE/AVX state as an XSAVE area (needs ``KVM_CAP_XSAVE``)."""
        area = kb.kvm_xsave()
        ioctl(self.fd, kb.KVM_GET_XSAVE, ctypes.byref(area), "KVM_GET_XSAVE")
        return area

    def set_xsave(self, area: kb.kvm_xsave) -> None:
        """``KVM_SET_XSAVE``."""
        ioctl(self.fd, kb.KVM_SET_XSAVE, ctypes.byref(area), "KVM_SET_XSAVE")

    def get_debugregs(self) -> kb.kvm_debugregs:
        """``KVM_GET_DEBUGREGS``: DR0-DR3, DR6, DR7."""
        debug = kb.kvm_debugregs()
        ioctl(self.fd, kb.KVM_GET_DEBUGREGS, ctypes.byref(debug), "KVM_GET_DEBUGREGS")
        return debug

    def set_debugregs(self, debug: kb.kvm_debugregs) -> None:
        """``KVM_SET_DEBUGREGS`` (``flags`` must be 0)."""
        ioctl(self.fd, kb.KVM_SET_DEBUGREGS, ctypes.byref(debug), "KVM_SET_DEBUGREGS")

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """``KVM_GET_MSRS``; raises ``KvmError`` naming the first MSR KVM would not read."""
        indices = list(indices)
        msrs = kb.kvm_msrs_with(len(indices))
        for entry, index in zip(msrs.entries, indices):
            entry.index = index
        done = ioctl(self.fd, kb.KVM_GET_MSRS, ctypes.byref(msrs), "KVM_GET_MSRS")
        if done != len(indices):
            raise KvmError("KVM_GET_MSRS", _errno.EINVAL, f"MSR {indices[done]:#x} cannot be read")
        return {entry.index: entry.data for entry in msrs.entries}

    def set_msrs(self, values: Mapping[int, int]) -> None:
        """``KVM_SET_MSRS``; raises ``KvmError`` naming the first MSR KVM refused."""
        items = list(values.items())
        msrs = kb.kvm_msrs_with(len(items))
        for entry, (index, data) in zip(msrs.entries, items):
            entry.index = index
            entry.data = data
        done = ioctl(self.fd, kb.KVM_SET_MSRS, ctypes.byref(msrs), "KVM_SET_MSRS")
        if done != len(items):
            raise KvmError("KVM_SET_MSRS", _errno.EINVAL, f"MSR {items[done][0]:#x} was refused")

    def set_cpuid2(self, cpuid: ctypes.Structure) -> None:
        """``KVM_SET_CPUID2`` with a ``kvm_cpuid2`` (e.g. :meth:`Kvm.supported_cpuid`'s answer)."""
        ioctl(self.fd, kb.KVM_SET_CPUID2, ctypes.byref(cpuid), "KVM_SET_CPUID2")

    def set_signal_mask(self, sigset: bytes | None) -> None:
        """``KVM_SET_SIGNAL_MASK``: the signal mask in force while ``KVM_RUN`` runs (``None``: the thread's own).

        ``sigset`` is the kernel's 8-byte sigset (bit n-1 set blocks signal n).
        """
        if sigset is None:
            ioctl(self.fd, kb.KVM_SET_SIGNAL_MASK, None, "KVM_SET_SIGNAL_MASK")
        else:
            mask = kb.kvm_signal_mask_with(sigset)
            ioctl(self.fd, kb.KVM_SET_SIGNAL_MASK, ctypes.byref(mask), "KVM_SET_SIGNAL_MASK")

    # --- interrupts -----------------------------------------------------------------

    def interrupt(self, vector: int) -> None:
        """``KVM_INTERRUPT``: queue external interrupt ``vector`` for delivery at the next guest entry.

        Only without an in-kernel interrupt controller (labkit creates none).  KVM
        delivers it through the guest's IDT as an external interrupt whatever RFLAGS.IF
        says, so call it only when ``run.ready_for_interrupt_injection`` and
        ``run.if_flag`` are set.  Until the guest takes it the vector is held by KVM
        (``KVM_GET_SREGS``' ``interrupt_bitmap`` shows it); a second call before that
        replaces it (measured on this host's kernel), so call it once per ``KVM_RUN``.
        """
        if not 0 <= vector < kb.KVM_NR_INTERRUPTS:
            raise ConfigError(f"interrupt vector must be in [0, 255], not {vector!r}")
        ioctl(self.fd, kb.KVM_INTERRUPT, ctypes.byref(kb.kvm_interrupt(vector)), "KVM_INTERRUPT")

    # --- running -------------------------------------------------------------------

    def run_once(self) -> int:
        """``KVM_RUN`` once; returns ``run.exit_reason``.

        ``EINTR`` (a signal, or ``run.immediate_exit``) comes back as ``KVM_EXIT_INTR``
        rather than an error.  The backend's run loop calls the ioctl directly instead.
        """
        if raw_ioctl(self.fd, kb.KVM_RUN, None) < 0:
            error = get_errno()
            if error in (_errno.EINTR, _errno.EAGAIN):
                return kb.KVM_EXIT_INTR
            raise KvmError("KVM_RUN", error)
        return self.run.exit_reason

    def stats(self) -> BinaryStats:
        """``KVM_GET_STATS_FD`` on the vCPU (opened once, then cached)."""
        if self._stats is None:
            self._stats = BinaryStats(ioctl(self.fd, kb.KVM_GET_STATS_FD, None, "KVM_GET_STATS_FD"))
        return self._stats

    def close(self) -> None:
        """Unmap ``kvm_run`` and close the vCPU fd (and its stats fd)."""
        if self._stats is not None:
            self._stats.close()
            self._stats = None
        run_map = getattr(self, "_run_map", None)
        if run_map is not None:
            del self.run  # drop the ctypes view first: it pins the mmap's buffer
            try:
                run_map.close()
            except BufferError:
                pass  # someone still holds a view of kvm_run; the mmap goes with the last reference
            del self._run_map
        self._finalizer()

    def __enter__(self) -> "VcpuFd":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
