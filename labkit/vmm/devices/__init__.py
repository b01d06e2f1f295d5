"""Device models on labkit's buses; each module says what it models and what it leaves out.

Devices are given to a machine as :class:`DeviceSpec` (a factory built inside
the core) and each has ``reset()``, ``save()`` and ``restore(state)``.
"""

from labkit.vmm.devices.console import Console
from labkit.vmm.devices.debug_exit import DebugExit
from labkit.vmm.devices.hypercall import HypercallPort
from labkit.vmm.devices.spec import DeviceContext, DeviceSpec, StatefulDevice
from labkit.vmm.devices.uart import Uart16550

__all__ = ["Console", "DebugExit", "DeviceContext", "DeviceSpec", "HypercallPort", "StatefulDevice", "Uart16550"]
