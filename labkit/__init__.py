"""labkit: see how virtualization works by running tiny x86 guests under KVM or under emulation.

    >>> import labkit
    >>> labkit.Machine("hello64").run().console
    'Hello from 64-bit mode!\\n'

The public names are imported on first use, so ``import labkit`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from labkit._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "Machine": "labkit.vmm.machine",
    "run_many": "labkit.fleet",
    "Fleet": "labkit.fleet",
    "VmSpec": "labkit.fleet",
    "LimitError": "labkit.errors",
    "RunResult": "labkit.vmm.status",
    "Status": "labkit.vmm.status",
    "Fault": "labkit.vmm.status",
    "Guest": "labkit.guest",
    "list_guests": "labkit.guest",
    "assemble": "labkit.assembler",
    "Snapshot": "labkit.snapshot",
    "SnapshotError": "labkit.errors",
    "ExitTrace": "labkit.trace",
    "ExitRecord": "labkit.trace",
    "ExitReason": "labkit.exits",
    "choose_backend": "labkit.backend",
    "LabkitError": "labkit.errors",
    "ConfigError": "labkit.errors",
    "GuestError": "labkit.errors",
    "AssemblyError": "labkit.errors",
    "GuestFileError": "labkit.errors",
    "BackendUnavailable": "labkit.errors",
    "KvmError": "labkit.errors",
    "EmulatorError": "labkit.errors",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from labkit.assembler import assemble
    from labkit.backend import choose_backend
    from labkit.errors import (AssemblyError, BackendUnavailable, ConfigError, EmulatorError, GuestError,
                               GuestFileError, KvmError, LabkitError)
    from labkit.errors import SnapshotError
    from labkit.exits import ExitReason
    from labkit.snapshot import Snapshot
    from labkit.guest import Guest, list_guests
    from labkit.trace import ExitRecord, ExitTrace
    from labkit.vmm.machine import Machine
    from labkit.vmm.status import Fault, RunResult, Status
    from labkit.errors import LimitError
