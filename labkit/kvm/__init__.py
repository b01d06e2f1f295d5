"""The KVM backend: ctypes bindings to ``/dev/kvm`` and :class:`KvmBackend`.

Layers, each wrapping one kind of fd (as in rust-vmm's kvm-ioctls)::

    bindings.py   structs, constants, ioctl numbers from linux/kvm.h
    ioctl.py      the one ioctl choke point (raises KvmError)
    system.py     Kvm (/dev/kvm) and probe()
    vm.py         VmFd: memory slots, dirty log, vCPU creation
    vcpu.py       VcpuFd: registers, MSRs, CPUID, KVM_RUN, kvm_run mmap
    stats.py      BinaryStats (KVM_GET_STATS_FD), KvmRunStats (the kernel's counters beside labkit's exits)
    controls.py   KvmExitControls: DISABLE_EXITS, user-space MSRs, coalesced MMIO/PIO, ioeventfds
    backend.py    KvmBackend, the labkit.backend.Backend implementation
"""

from labkit.kvm.backend import KvmBackend
from labkit.kvm.controls import (
    CoalescedZone, IoEventFd, KvmExitControls, MsrHandler, MsrRegister, UserMsr, control_support,
)
from labkit.kvm.stats import CounterRow, KvmRunStats

__all__ = [
    "CoalescedZone", "CounterRow", "IoEventFd", "KvmBackend", "KvmExitControls", "KvmRunStats", "MsrHandler",
    "MsrRegister", "UserMsr", "control_support",
]
