"""The one exception tree of labkit.

Lower-layer errors (``OSError`` from an ioctl, ``UcError`` from Unicorn, a
``CalledProcessError`` from GNU as) are translated into these at the boundary
where they happen, so callers catch labkit errors only::

    LabkitError
     ├── ConfigError            bad arguments: memory size, mode, backend name, device args
     │    └── LimitError        over a resource limit (VMs, RAM per VM or in total); names it and how to raise it
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
     ├── SnapshotError          a snapshot cannot be saved, or a snapshot file is corrupt, truncated or mismatched
     └── StorageError           a disk image or datastore operation failed (labkit.storage)
          ├── ImageFormatError  a file is not a valid image: bad header, corrupt or truncated metadata
          ├── UnsupportedImage  a valid qcow2 using a feature labkit does not implement (named)
          ├── ImageRangeError   a read/write/discard outside the virtual disk (offset, length)
          ├── DatastoreFull     a write cannot be stored: the datastore's capacity or ENOSPC; nothing acknowledged
          └── FilesDamaged      a disk's files (labkit.backup's LKFS layout) fail their checks; names each one
"""

from __future__ import annotations

import errno as _errno
import os


class LabkitError(Exception):
    """Base of every error labkit raises on purpose."""


class ConfigError(LabkitError, ValueError):
    """An argument is out of range or inconsistent (memory size, mode, device arguments)."""


class LimitError(ConfigError):
    """A request is over one of labkit's resource limits (``labkit.fleet.FleetLimits``); the message names
    the limit and how to raise it."""


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


class StorageError(LabkitError):
    """A disk image or datastore operation failed (``labkit.storage``)."""


class ImageFormatError(StorageError):
    """A file is not a valid image: its header, tables or length contradict the format.

    The message names the file, the structure and the offset; the image is refused rather than read as wrong data.
    """


class UnsupportedImage(StorageError):
    """A valid qcow2 file uses a feature labkit does not implement (compression, encryption, ...); named in the message."""


class ImageRangeError(StorageError, ValueError):
    """A read, write or discard reaches outside the virtual disk (or has a negative offset or length)."""


class DatastoreFull(StorageError):
    """A write needs space the datastore (or the file system, ENOSPC) cannot give.

    Raised before anything of the write is acknowledged or linked into the image: every earlier
    write stays readable, and the same write succeeds once space is freed. ``needed`` and
    ``available`` are bytes; ``datastore`` is the :class:`labkit.storage.Datastore` (or ``None`` for
    a plain file system), whose ``when_space`` a caller uses to resume.
    """

    def __init__(self, message: str, needed: int, available: int, datastore: object = None):
        super().__init__(message)
        self.needed = needed
        self.available = available
        self.datastore = datastore


def strerror(errno: int | None) -> str:
    """``errno 13 (EACCES): Permission denied`` for messages (an ``OSError`` without an errno: "unknown error")."""
    if errno is None:
        return "unknown error (no errno)"
    return f"errno {errno} ({_errno.errorcode.get(errno, '?')}): {os.strerror(errno)}"


class FilesDamaged(StorageError):
    """A disk's files (:mod:`labkit.backup.files`, the LKFS layout) fail their checks: a bad superblock or
    directory, a file past the disk's end, or a file whose SHA-256 differs; the message names each one."""
