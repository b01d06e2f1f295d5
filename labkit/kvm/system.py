"""The system fd (``/dev/kvm``): :class:`Kvm` creates VMs; :func:`probe` says whether KVM works here."""

from __future__ import annotations

import ctypes
import errno as _errno
import functools
import os
import stat
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from labkit.errors import BackendUnavailable, KvmError, strerror
from labkit.kvm import bindings as kb
from labkit.kvm.ioctl import ioctl

if TYPE_CHECKING:  # vm.py imports this module
    from labkit.kvm.vm import VmFd

KVM_DEVICE = "/dev/kvm"


def kvm_device() -> str:
    """The KVM device to use: ``LABKIT_KVM_DEVICE`` if set (tests point it elsewhere to see a machine without KVM), else /dev/kvm."""
    return os.environ.get("LABKIT_KVM_DEVICE", KVM_DEVICE)
FLAVOURS = ("kvm_intel", "kvm_amd", "kvm_pvm")
"""Kernel modules that provide ``/dev/kvm`` on x86; which one is loaded is read from /sys/module/."""


@functools.lru_cache(maxsize=8)
def kvm_flavour(sys_module: str = "/sys/module") -> str:
    """``kvm_intel`` (VT-x), ``kvm_amd`` (AMD-V), ``kvm_pvm`` (PVM, no hardware extensions) or ``unknown``.

    Looked up once per process (every KVM machine asks): a loaded module is not swapped under running VMs.
    """
    for name in FLAVOURS:
        if os.path.isdir(os.path.join(sys_module, name)):
            return name
    return "unknown"


_VCPU_MMAP_SIZE: dict[str, int] = {}
"""``KVM_GET_VCPU_MMAP_SIZE`` per device path whose API version was found right (asked at its first open)."""
_SUPPORTED_CPUID: dict[str, tuple[int, bytes]] = {}
"""``KVM_GET_SUPPORTED_CPUID``'s answer per device path: (entries, the ``kvm_cpuid2``'s bytes)."""


class Kvm:
    """An open ``/dev/kvm``.  Use as a context manager, or call :meth:`close`."""

    def __init__(self, device: str | None = None):
        device = device or kvm_device()
        self.device = device
        try:
            self.fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            raise BackendUnavailable(f"cannot open {device}: {strerror(error.errno)}") from error
        self._finalizer = weakref.finalize(self, os.close, self.fd)
        mmap_size = _VCPU_MMAP_SIZE.get(device)
        if mmap_size is None:  # the first open of this device in this process: check the API, once
            version = self.api_version()
            if version != kb.KVM_API_VERSION:
                self.close()
                raise BackendUnavailable(f"{device} speaks KVM API {version}, labkit needs {kb.KVM_API_VERSION}")
            mmap_size = ioctl(self.fd, kb.KVM_GET_VCPU_MMAP_SIZE, None, "KVM_GET_VCPU_MMAP_SIZE")
            _VCPU_MMAP_SIZE[device] = mmap_size
        self.vcpu_mmap_size = mmap_size

    def api_version(self) -> int:
        """``KVM_GET_API_VERSION``: 12 on every kernel since 2.6.22."""
        return ioctl(self.fd, kb.KVM_GET_API_VERSION, None, "KVM_GET_API_VERSION")

    def check_extension(self, capability: int) -> int:
        """``KVM_CHECK_EXTENSION``: 0 if ``KVM_CAP_*`` is absent, else 1 or a capability-specific number."""
        return ioctl(self.fd, kb.KVM_CHECK_EXTENSION, capability, "KVM_CHECK_EXTENSION")

    def supported_cpuid(self, max_entries: int = 256) -> ctypes.Structure:
        """``KVM_GET_SUPPORTED_CPUID``: the CPUID leaves KVM can expose (a ``kvm_cpuid2`` with ``nent`` set).

        Grows the buffer and retries while the kernel answers ``E2BIG``.  The answer depends only on
        the host CPU and the KVM module, so it is asked once per process and device and each call gets
        its own copy: the kernel executes CPUID for every leaf, and on a cloud VM every CPUID traps to
        the cloud's hypervisor (~90 µs here, 3% of a hello64 VM's whole life, ``bench_fleet.py``).
        """
        cached = _SUPPORTED_CPUID.get(self.device)
        if cached is None:
            while True:
                cpuid = kb.kvm_cpuid2_with(max_entries)
                try:
                    ioctl(self.fd, kb.KVM_GET_SUPPORTED_CPUID, ctypes.byref(cpuid), "KVM_GET_SUPPORTED_CPUID")
                except KvmError as error:
                    if error.errno == _errno.E2BIG and max_entries < 4096:
                        max_entries *= 2
                        continue
                    raise
                break
            cached = _SUPPORTED_CPUID[self.device] = (cpuid.nent, bytes(cpuid))
        entries, raw = cached
        copy = kb.kvm_cpuid2_with(max(entries, 1))
        ctypes.memmove(ctypes.addressof(copy), raw, min(len(raw), ctypes.sizeof(copy)))
        copy.nent = entries
        return copy

    def create_vm(self) -> VmFd:
        """``KVM_CREATE_VM`` (machine type 0): a new :class:`labkit.kvm.vm.VmFd`."""
        from labkit.kvm.vm import VmFd

        return VmFd(self, ioctl(self.fd, kb.KVM_CREATE_VM, 0, "KVM_CREATE_VM"))

    def close(self) -> None:
        """Close ``/dev/kvm`` (VMs created from it stay valid)."""
        self._finalizer()

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(frozen=True)
class KvmStatus:
    """What :func:`probe` found out about KVM on this machine."""

    usable: bool
    problem: str | None
    """Why KVM cannot be used, with how to fix it; ``None`` when it can."""
    api_version: int | None
    flavour: str
    """``kvm_intel``, ``kvm_amd``, ``kvm_pvm`` or ``unknown`` (from /sys/module/)."""
    device: str
    permissions: str | None
    """E.g. ``crw-rw---- root:kvm``; ``None`` when the device is missing."""


def _permissions(device: str) -> str | None:
    try:
        info = os.stat(device)
    except OSError:
        return None
    try:
        import grp
        import pwd

        owner = pwd.getpwuid(info.st_uid).pw_name
        group = grp.getgrgid(info.st_gid).gr_name
    except (ImportError, KeyError):
        owner, group = str(info.st_uid), str(info.st_gid)
    return f"{stat.filemode(info.st_mode)} {owner}:{group}"


def probe(device: str | None = None) -> KvmStatus:
    """Check whether KVM can run a guest here; never raises.

    Opens ``device``, asks ``KVM_GET_API_VERSION`` and creates (and closes) one
    VM with ``KVM_CREATE_VM`` to prove it works; about 1 ms, plus the kernel's
    teardown of that VM.
    """
    device = device or kvm_device()
    flavour = kvm_flavour()
    permissions = _permissions(device)

    def status(problem: str | None, version: int | None = None) -> KvmStatus:
        return KvmStatus(problem is None, problem, version, flavour, device, permissions)

    try:
        if permissions is None:
            if flavour == "unknown":
                return status(f"{device} does not exist: load kvm_intel or kvm_amd "
                              "(enable VT-x/AMD-V in the firmware) or use backend='emu'")
            return status(f"{device} does not exist although {flavour} is loaded: "
                          "check the device node (udev) or use backend='emu'")
        try:
            fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            if error.errno in (_errno.EACCES, _errno.EPERM):
                return status(f"no permission to open {device} ({permissions}): add yourself to the kvm "
                              "group: sudo usermod -aG kvm $USER (then log in again), or use backend='emu'")
            return status(f"cannot open {device}: {strerror(error.errno)}; use backend='emu'")
        try:
            version = ioctl(fd, kb.KVM_GET_API_VERSION, None, "KVM_GET_API_VERSION")
            if version != kb.KVM_API_VERSION:
                return status(f"{device} speaks KVM API {version}, labkit needs {kb.KVM_API_VERSION}; "
                              "use backend='emu'", version)
            try:
                vm = ioctl(fd, kb.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
            except KvmError as error:
                return status(f"{device} opens but cannot create a VM ({error}); "
                              "is another hypervisor using VT-x/AMD-V? Use backend='emu'", version)
            os.close(vm)
            return status(None, version)
        finally:
            os.close(fd)
    except Exception as error:  # probe() must never raise: report instead
        return status(f"probing {device} failed unexpectedly: {error!r}; use backend='emu'")
