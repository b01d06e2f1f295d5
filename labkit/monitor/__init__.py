"""Software virtualization techniques run by a monitor on the host: trap-and-emulate, binary translation.

A monitor sees the guest's exceptions through :mod:`labkit.monitor.forwarding`
and works the same on both backends.
"""

from labkit.monitor.forwarding import Monitor, MonitorContext, Trap

__all__ = ["Monitor", "MonitorContext", "Trap"]
