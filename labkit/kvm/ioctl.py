"""The one ioctl choke point: libc ``ioctl(2)`` through ctypes, failures as :class:`KvmError`.

``fcntl.ioctl`` is not used because it retries on ``EINTR`` (PEP 475), and
``KVM_RUN`` must see ``EINTR``: it is how the watchdog stops a guest.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
from typing import Union

from labkit.errors import KvmError

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

raw_ioctl = libc.ioctl
"""``int ioctl(int fd, unsigned long request, void *arg)``; pass ``ctypes.byref(struct)``, an int or ``None``."""
raw_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
raw_ioctl.restype = ctypes.c_int

kvm_run_ioctl = libc["ioctl"]
"""The same function without ``argtypes``, for the hot ``KVM_RUN`` loop: call it as
``kvm_run_ioctl(fd, KVM_RUN, 0)`` with plain ints only.  Skipping ctypes' argument
conversion saves ~0.35 µs per call (measured: 0.94 vs 0.57 µs for a trivial ioctl);
libffi sign-extends the int arguments to 64 bits, which is right for these values."""
kvm_run_ioctl.restype = ctypes.c_int

get_errno = ctypes.get_errno

IoctlArgument = Union[int, None, "ctypes._CArgObject"]
"""An int (passed as the pointer-sized value), ``None`` (NULL) or ``ctypes.byref(struct)``."""


def ioctl(fd: int, request: int, arg: IoctlArgument = None, name: str = "ioctl") -> int:
    """Issue ``ioctl(fd, request, arg)`` and return its non-negative result.

    ``EINTR`` is retried (only ``KVM_RUN`` wants it, and it calls
    :data:`raw_ioctl` itself).  Any other failure raises
    ``KvmError(name, errno)``: "KVM_SET_USER_MEMORY_REGION failed: errno 22 (EINVAL)".
    """
    while True:
        result = raw_ioctl(fd, request, arg)
        if result >= 0:
            return result
        error = get_errno()
        if error != _errno.EINTR:
            raise KvmError(name, error)
