"""A VM fd: memory slots, the dirty log, vCPU creation."""

from __future__ import annotations

import ctypes
import os
import weakref
from typing import TYPE_CHECKING

from labkit.errors import ConfigError
from labkit.kvm import bindings as kb
from labkit.kvm.ioctl import ioctl

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
    value = int.from_bytes(bitmap, "little")
    pages = []
    while value:
        low = value & -value
        pages.append(low.bit_length() - 1)
        value ^= low
    return pages
