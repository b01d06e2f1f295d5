"""Virtualization techniques run by a monitor on the host: trap-and-emulate, binary translation,
paravirtualization (the hypervisor of a kernel that makes hypercalls), a model of VMX.

A monitor sees the guest's exceptions through :mod:`labkit.vmm.forwarding`
and works the same on both backends.  The monitors themselves are imported on
first use.
"""

from __future__ import annotations

from labkit._lazy import lazy_exports
from labkit.vmm.forwarding import Monitor, MonitorContext, Trap

_LAZY = {
    "TrapAndEmulate": "labkit.monitor.trap_emulate",
    "run_deprivileged": "labkit.monitor.trap_emulate",
    "minikernel": "labkit.monitor.trap_emulate",
    "BinaryTranslator": "labkit.monitor.binary_translation",
    "run_translated": "labkit.monitor.binary_translation",
    "VirtualCpu": "labkit.monitor.vcpu",
    "VmxModel": "labkit.monitor.vmx.model",
    "run_vmx": "labkit.monitor.vmx.model",
    "Vmcs": "labkit.monitor.vmx.vmcs",
    "Paravirtual": "labkit.monitor.paravirt",
    "run_paravirtual": "labkit.monitor.paravirt",
    "compare_kernels": "labkit.monitor.paravirt",
    "ShadowPaging": "labkit.monitor.shadow",
    "run_shadowed": "labkit.monitor.shadow",
}

__all__ = sorted(["Monitor", "MonitorContext", "Trap", *_LAZY])
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
