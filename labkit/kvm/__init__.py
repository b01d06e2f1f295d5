"""The KVM backend: ctypes bindings to ``/dev/kvm`` and :class:`KvmBackend`.

Layers, each wrapping one kind of fd (as in rust-vmm's kvm-ioctls)::

    bindings.py   structs, constants, ioctl numbers from linux/kvm.h
    ioctl.py      the one ioctl choke point (raises KvmError)
    system.py     Kvm (/dev/kvm) and probe()
    vm.py         VmFd: memory slots, dirty log, vCPU creation
    vcpu.py       VcpuFd: registers, MSRs, CPUID, KVM_RUN, kvm_run mmap
    stats.py      BinaryStats (KVM_GET_STATS_FD)
    backend.py    KvmBackend, the labkit.backend.Backend implementation
"""

from labkit.kvm.backend import KvmBackend

__all__ = ["KvmBackend"]
