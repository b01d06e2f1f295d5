"""A model of VMX (Intel VT-x) that runs on both of labkit's backends.

:class:`Vmcs` holds the VM-execution controls by their SDM names
(:mod:`~labkit.monitor.vmx.vmcs`), :mod:`~labkit.monitor.vmx.rules` decides
which of a kernel's instructions and exceptions cause a VM exit, with the SDM's
basic exit reason and exit qualification (:mod:`~labkit.monitor.vmx.exits`), and
:class:`VmxModel` runs an unmodified kernel under it (:mod:`~labkit.monitor.vmx.model`
says how: binary translation underneath, the decisions on top).  Everything here is
labelled a model: neither backend offers a VMCS to labkit.
"""

from __future__ import annotations

from labkit._lazy import lazy_exports
from labkit.monitor.vmx.exits import CrAccessType, ExitReason, VmExit, describe_qualification
from labkit.monitor.vmx.vmcs import PRESETS, PinBased, Primary, Secondary, Vmcs, io_bitmaps, msr_bitmap

_LAZY = {
    "VmxModel": "labkit.monitor.vmx.model",
    "VmxReport": "labkit.monitor.vmx.model",
    "run_vmx": "labkit.monitor.vmx.model",
    "exit_table": "labkit.monitor.vmx.model",
}

__all__ = sorted(["CrAccessType", "ExitReason", "PRESETS", "PinBased", "Primary", "Secondary", "Vmcs", "VmExit",
                  "describe_qualification", "io_bitmaps", "msr_bitmap", *_LAZY])
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
