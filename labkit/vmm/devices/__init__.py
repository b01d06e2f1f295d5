"""Device models on labkit's buses; each module says what it models and what it leaves out."""

from labkit.vmm.devices.console import Console
from labkit.vmm.devices.debug_exit import DebugExit
from labkit.vmm.devices.hypercall import HypercallPort
from labkit.vmm.devices.uart import Uart16550

__all__ = ["Console", "DebugExit", "HypercallPort", "Uart16550"]
