"""A VM fd: memory slots, the dirty log, vCPU creation, and the VM-wide exit controls.

The exit controls (Documentation/virt/kvm/api.rst) decide what KVM handles in
the kernel and what reaches userspace: ``KVM_ENABLE_CAP`` for
``KVM_CAP_X86_DISABLE_EXITS`` and ``KVM_CAP_X86_USER_SPACE_MSR``,
``KVM_X86_SET_MSR_FILTER``, ``KVM_REGISTER_COALESCED_MMIO`` and ``KVM_IOEVENTFD``.
"""


from __future__ import annotations

import ctypes
import os
import weakref
from typing import TYPE_CHECKING

from labkit.errors import ConfigError
from labkit.kvm import bindings as kb
from labkit.kvm.ioctl import ioctl
from labkit.memory import bitmap_pages

if TYPE_CHECKING:  # both import this module
    from labkit.kvm.system import Kvm
    from labkit.kvm.vcpu import VcpuFd

PAGE_SIZE = 0x1000


class VmFd:
    """One VM (``KVM_CREATE_VM``).  Made by :meth:`labkit.kvm.system.Kvm.create_vm`; close with :meth:`close`."""

    def __init__(self, kvm: Kvm, fd: int):
        self.fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)
        self.vcpu_mmap_size = kvm.vcpu_mmap_size
        self._slot_sizes: dict[int, int] = {}
        self._slot_flags: dict[int, int] = {}

    def check_extension(self, capability: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd (the answer can differ from the system fd's)."""
        return ioctl(self.fd, kb.KVM_CHECK_EXTENSION, capability, "KVM_CHECK_EXTENSION")

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        """``KVM_SET_USER_MEMORY_REGION``: back ``[guest_phys_addr, +memory_size)`` with host memory.

        ``memory_size`` 0 deletes the slot.  ``flags`` may hold ``KVM_MEM_LOG_DIRTY_PAGES``
        and ``KVM_MEM_READONLY`` (which needs ``KVM_CAP_READONLY_MEM``).  The host memory
        must stay mapped while the slot exists.  Calling it again for an existing slot
        with the same address and size changes only its flags (how dirty logging is
        switched on and off); turning ``KVM_MEM_LOG_DIRTY_PAGES`` on starts from an
        empty dirty bitmap.
        """
        if guest_phys_addr % PAGE_SIZE or memory_size % PAGE_SIZE or userspace_addr % PAGE_SIZE:
            raise ConfigError("memory slot address, size and host address must be multiples of 4 KiB: "
                              f"gpa={guest_phys_addr:#x} size={memory_size:#x} host={userspace_addr:#x}")
        region = kb.kvm_userspace_memory_region(slot, flags, guest_phys_addr, memory_size, userspace_addr)
        ioctl(self.fd, kb.KVM_SET_USER_MEMORY_REGION, ctypes.byref(region), "KVM_SET_USER_MEMORY_REGION")
        if memory_size:
            self._slot_sizes[slot] = memory_size
            self._slot_flags[slot] = flags
        else:
            self._slot_sizes.pop(slot, None)
            self._slot_flags.pop(slot, None)

    def get_dirty_log(self, slot: int) -> bytes:
        """``KVM_GET_DIRTY_LOG``: one bit per 4 KiB page of ``slot`` written since the last call.

        Side effect: this also clears the kernel's dirty bitmap for the slot and
        write-protects its pages again, so the next call reports only newer writes.
        The slot must have been registered with ``KVM_MEM_LOG_DIRTY_PAGES``.  Writes
        the host makes through its own mapping of the slot are not logged.
        """
        size = self._slot_sizes.get(slot)
        if size is None:
            raise ConfigError(f"memory slot {slot} was not registered through this VmFd")
        if not self._slot_flags[slot] & kb.KVM_MEM_LOG_DIRTY_PAGES:
            raise ConfigError(f"memory slot {slot} does not log dirty pages (KVM_MEM_LOG_DIRTY_PAGES is off)")
        pages = size // PAGE_SIZE
        bitmap = ctypes.create_string_buffer(((pages + 63) // 64) * 8)  # the kernel writes whole longs
        log = kb.kvm_dirty_log(slot=slot)
        log.dirty_bitmap = ctypes.addressof(bitmap)
        ioctl(self.fd, kb.KVM_GET_DIRTY_LOG, ctypes.byref(log), "KVM_GET_DIRTY_LOG")
        return bitmap.raw

    def enable_cap(self, capability: int, *args: int, name: str = "KVM_ENABLE_CAP") -> None:
        """``KVM_ENABLE_CAP`` on the VM fd with up to four arguments (``args[0..3]``).

        ``name`` goes into the error: ``KVM_ENABLE_CAP(KVM_CAP_X86_DISABLE_EXITS) failed: errno 22 (EINVAL)``.
        """
        if len(args) > 4:
            raise ConfigError(f"KVM_ENABLE_CAP takes at most 4 arguments, not {len(args)}")
        cap = kb.kvm_enable_cap(cap=capability)
        for index, value in enumerate(args):
            cap.args[index] = value
        ioctl(self.fd, kb.KVM_ENABLE_CAP, ctypes.byref(cap), name)

    def disable_exits(self, flags: int) -> None:
        """``KVM_CAP_X86_DISABLE_EXITS`` with ``KVM_X86_DISABLE_EXITS_*`` ``flags``: those instructions
        (``hlt``, ``pause``, ``mwait``, C-states) no longer exit; only before the first vCPU is created."""
        self.enable_cap(kb.KVM_CAP_X86_DISABLE_EXITS, flags, name="KVM_ENABLE_CAP(KVM_CAP_X86_DISABLE_EXITS)")

    def enable_user_space_msr(self, reasons: int) -> None:
        """``KVM_CAP_X86_USER_SPACE_MSR``: an ``rdmsr``/``wrmsr`` KVM would fail for one of ``reasons``
        (``KVM_MSR_EXIT_REASON_FILTER``, ``_UNKNOWN``, ``_INVAL``) exits to userspace as
        ``KVM_EXIT_X86_RDMSR``/``KVM_EXIT_X86_WRMSR`` instead of raising #GP in the guest."""
        self.enable_cap(kb.KVM_CAP_X86_USER_SPACE_MSR, reasons, name="KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR)")

    def set_msr_filter(self, ranges: list[tuple[int, int, int, bytes]], default_deny: bool = False) -> None:
        """``KVM_X86_SET_MSR_FILTER``: ``(flags, base, nmsrs, bitmap)`` ranges (``flags``:
        ``KVM_MSR_FILTER_READ|WRITE``; bit ``i`` of ``bitmap`` allows MSR ``base + i``, a clear
        bit denies it, for the accesses in ``flags``).  MSRs no range covers follow the default.

        A denied access fails in KVM; with ``KVM_MSR_EXIT_REASON_FILTER`` enabled it exits
        to userspace.  KVM copies the bitmaps, so they need not outlive the call.
        """
        if len(ranges) > kb.KVM_MSR_FILTER_MAX_RANGES:
            raise ConfigError(f"an MSR filter has at most {kb.KVM_MSR_FILTER_MAX_RANGES} ranges, not {len(ranges)}")
        flags = kb.KVM_MSR_FILTER_DEFAULT_DENY if default_deny else kb.KVM_MSR_FILTER_DEFAULT_ALLOW
        value = kb.kvm_msr_filter(flags=flags)
        buffers = []  # kept alive until the ioctl has copied them
        for slot, (range_flags, base, nmsrs, bitmap) in zip(value.ranges, ranges):
            if not 0 < nmsrs <= 8 * min(len(bitmap), kb.KVM_MSR_FILTER_MAX_BITMAP_SIZE):
                raise ConfigError(f"an MSR filter range of {nmsrs} MSRs needs a bitmap of {(nmsrs + 7) // 8} "
                                  f"to {kb.KVM_MSR_FILTER_MAX_BITMAP_SIZE} bytes, not {len(bitmap)}")
            buffer = ctypes.create_string_buffer(bytes(bitmap), len(bitmap))
            buffers.append(buffer)
            slot.flags, slot.base, slot.nmsrs = range_flags, base, nmsrs
            slot.bitmap = ctypes.addressof(buffer)
        ioctl(self.fd, kb.KVM_X86_SET_MSR_FILTER, ctypes.byref(value), "KVM_X86_SET_MSR_FILTER")

    def register_coalesced_mmio(self, address: int, size: int, pio: bool = False) -> None:
        """``KVM_REGISTER_COALESCED_MMIO``: guest writes into ``[address, +size)`` (ports with ``pio``)
        go into the ring page at ``KVM_COALESCED_MMIO_PAGE_OFFSET`` of the vCPU mmap instead of
        exiting; reads still exit.  A write finding the ring full exits as usual."""
        zone = kb.kvm_coalesced_mmio_zone(addr=address, size=size, pio=1 if pio else 0)
        ioctl(self.fd, kb.KVM_REGISTER_COALESCED_MMIO, ctypes.byref(zone), "KVM_REGISTER_COALESCED_MMIO")

    def unregister_coalesced_mmio(self, address: int, size: int, pio: bool = False) -> None:
        """``KVM_UNREGISTER_COALESCED_MMIO`` of a zone registered with the same arguments."""
        zone = kb.kvm_coalesced_mmio_zone(addr=address, size=size, pio=1 if pio else 0)
        ioctl(self.fd, kb.KVM_UNREGISTER_COALESCED_MMIO, ctypes.byref(zone), "KVM_UNREGISTER_COALESCED_MMIO")

    def ioeventfd(self, fd: int, address: int, length: int, *, pio: bool, datamatch: int | None = None,
                  deassign: bool = False) -> None:
        """``KVM_IOEVENTFD``: a guest write of ``length`` bytes to ``address`` (a port with ``pio``),
        of the value ``datamatch`` if given, signals eventfd ``fd`` in the kernel instead of exiting
        (the eventfd's counter goes up by one).  ``deassign`` removes a registration made with the
        same arguments."""
        flags = (kb.KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (kb.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        if datamatch is not None:
            flags |= kb.KVM_IOEVENTFD_FLAG_DATAMATCH
        request = kb.kvm_ioeventfd(datamatch=datamatch or 0, addr=address, len=length, fd=fd, flags=flags)
        ioctl(self.fd, kb.KVM_IOEVENTFD, ctypes.byref(request), "KVM_IOEVENTFD")

    def set_tss_addr(self, address: int) -> None:
        """``KVM_SET_TSS_ADDR``: three pages of guest-physical space for VT-x's real-mode TSS (Intel only)."""
        ioctl(self.fd, kb.KVM_SET_TSS_ADDR, address, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, address: int) -> None:
        """``KVM_SET_IDENTITY_MAP_ADDR``: one page for VT-x's real-mode identity page table (Intel only)."""
        value = ctypes.c_uint64(address)
        ioctl(self.fd, kb.KVM_SET_IDENTITY_MAP_ADDR, ctypes.byref(value), "KVM_SET_IDENTITY_MAP_ADDR")

    def create_vcpu(self, vcpu_id: int = 0) -> VcpuFd:
        """``KVM_CREATE_VCPU``: a :class:`labkit.kvm.vcpu.VcpuFd` with its ``kvm_run`` page mapped."""
        from labkit.kvm.vcpu import VcpuFd

        return VcpuFd(ioctl(self.fd, kb.KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU"), self.vcpu_mmap_size)

    def close(self) -> None:
        """Close the VM fd; the kernel frees the VM once its vCPU fds are closed too."""
        self._finalizer()

    def __enter__(self) -> "VmFd":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def dirty_page_numbers(bitmap: bytes) -> list[int]:
    """The page frame numbers whose bits are set in a ``KVM_GET_DIRTY_LOG`` bitmap, ascending."""
    return bitmap_pages(bitmap)
