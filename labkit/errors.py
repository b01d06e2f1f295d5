"""The one exception tree of labkit.

Lower-layer errors (``OSError`` from an ioctl, ``UcError`` from Unicorn, a
``CalledProcessError`` from GNU as) are translated into these at the boundary
where they happen, so callers catch labkit errors only::

    LabkitError
     ├── ConfigError            bad arguments: memory size, mode, backend name, device args
     ├── GuestError             a guest that cannot be loaded
     │    ├── AssemblyError     GNU as/ld rejected the source, or binutils is missing
     │    └── GuestFileError    a malformed guest file or metadata
     ├── BackendUnavailable     the asked-for backend cannot run here (no /dev/kvm, no permission, ...)
     ├── KvmError               an ioctl on /dev/kvm failed; carries the ioctl's name and errno
     ├── EmulatorError          Unicorn failed, crashed or hung (contained in a worker process)
     ├── DeviceError            a device model raised while handling the guest's access (names device, port, RIP)
     ├── NotModelled            the guest asked a device for a feature labkit does not model (ends the run, not raised)
     ├── GuestMemoryError       a host-side access to guest memory outside every memory region
     ├── VirtqueueError         a virtqueue in guest memory breaks the virtio rules (the device needs a reset)
     └── SnapshotError          a snapshot cannot be saved, or a snapshot file is corrupt, truncated or mismatched
"""

from __future__ import annotations

import errno as _errno
import os


class LabkitError(Exception):
    """Base of every error labkit raises on purpose."""


class ConfigError(LabkitError, ValueError):
    """An argument is out of range or inconsistent (memory size, mode, device arguments)."""


class ExerciseFailed(LabkitError, AssertionError):
    """An exercise's answer did not do what the exercise asks (:mod:`labkit.exercises`); the message says how."""


class GuestError(LabkitError):
    """A guest cannot be loaded."""


class AssemblyError(GuestError):
    """GNU as or ld rejected a guest's source, or binutils is not installed."""


class GuestFileError(GuestError):
    """A guest file or its metadata is malformed."""


class BackendUnavailable(LabkitError):
    """The requested backend cannot be used on this machine; the message says why and how to fix it."""


class KvmError(LabkitError, OSError):
    """An ioctl on a KVM file descriptor failed.

    ``str(e)`` reads like ``KVM_SET_USER_MEMORY_REGION failed: errno 22 (EINVAL)``.
    """

    def __init__(self, ioctl: str, errno: int, detail: str = ""):
        name = _errno.errorcode.get(errno, "?")
        message = f"{ioctl} failed: errno {errno} ({name})"
        if detail:
            message += f": {detail}"
        super().__init__(errno, message)
        self.ioctl = ioctl

    def __str__(self) -> str:
        return self.args[1]


class EmulatorError(LabkitError):
    """The Unicorn emulator failed, crashed or hung while running a guest."""


class DeviceError(LabkitError):
    """A device model failed while handling a guest access; the run ended with status ``error``.

    The message names the device, the port or address, and the guest's RIP, the same on every backend.
    """


class NotModelled(LabkitError, NotImplementedError):
    """The guest asked a device model for a feature it does not model (an 8254 channel 2, say).

    The guest's doing, not a bug in the device: the run ends with status ``error`` naming the
    device, the feature, the port and the RIP, and ``Machine.run`` returns it rather than raising.
    """


class GuestMemoryError(LabkitError, ValueError):
    """A guest-physical range the host was asked to read or write lies outside guest memory."""


class VirtqueueError(LabkitError):
    """A virtqueue the driver laid out in guest memory breaks the virtio 1.x rules (a loop, an index past the ring).

    The device model catches it, sets DEVICE_NEEDS_RESET and stops consuming; it never leaves a run.
    """


class SnapshotError(LabkitError):
    """A snapshot file is corrupt, truncated, of another version or kind, or cannot be written; the message says which."""


def strerror(errno: int | None) -> str:
    """``errno 13 (EACCES): Permission denied`` for messages (an ``OSError`` without an errno: "unknown error")."""
    if errno is None:
        return "unknown error (no errno)"
    return f"errno {errno} ({_errno.errorcode.get(errno, '?')}): {os.strerror(errno)}"
