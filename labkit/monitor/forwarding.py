"""The old home of trap forwarding, which now lives in :mod:`labkit.vmm.forwarding`.

The machine installs the forwarding stubs and the trap port, so they belong to
the VMM layer below the monitors; the names stay importable from here.
"""

from labkit.vmm.forwarding import (COMMON, FORWARDED_VECTORS, FRAME, FRAME_WORDS, PUSHED, STUB_SIZE, Monitor,
                                   MonitorContext, Trap, TrapPort, common_routine, install, stub)

__all__ = ["COMMON", "FORWARDED_VECTORS", "FRAME", "FRAME_WORDS", "PUSHED", "STUB_SIZE", "Monitor", "MonitorContext",
           "Trap", "TrapPort", "common_routine", "install", "stub"]
