"""``Datastore``: a folder with a capacity, shared by several VMs' disks and overlays (a LUN in vSphere).

Every image opened or created through a datastore grows its file only through
:meth:`Datastore.grow` (it is the images' :class:`~labkit.storage.hostfile.Space`). Under the
datastore's lock, that checks the bytes in use (the lengths of all files in the folder, as a
thick LUN counts them) plus the growth against the capacity, then reserves the blocks with
``posix_fallocate``. A write that does not fit raises :class:`~labkit.errors.DatastoreFull`
*before* anything of it is written or linked into the image (see the order in
:mod:`labkit.storage.qcow2`): no earlier write is lost, and the same write succeeds later.
A full file system (ENOSPC) raises the same error.

Space is freed by :meth:`commit` (the overlay is emptied and its file trimmed), :meth:`delete`,
a discard that frees the end of a file, and :meth:`set_capacity`; each wakes the writers
waiting in :meth:`when_space` / :meth:`wait_for_space`.

Several processes share one datastore, as several ESXi hosts share a LUN (VMFS keeps its locks on the
LUN itself): a VM on the emulator opens its disk in its worker process, through that process's copy
of the ``Datastore``.  So what all of them must agree on lives in the folder, not in one process's
memory, in two hidden files that :meth:`Datastore.names` and :meth:`Datastore.used` skip::

    .labkit-datastore        {"capacity": N}  (JSON; replaced atomically: temp file, fsync, rename)
    .labkit-datastore.lock   empty; flock(2)ed exclusively while a file grows or the capacity changes

Every process reads the capacity from the folder, so :meth:`set_capacity` in the notebook's process
reaches a VM whose disk grows in a worker, and the lock makes the check-then-grow of :meth:`grow`
atomic across processes (after a ``fork`` the child opens its own lock: a descriptor inherited from
the parent would share the parent's lock).  A space freed in another process (or by deleting a file
by hand) wakes nobody here: :meth:`wait_for_space` also looks again every :data:`POLL_S` seconds.

How a block device pauses its VM on a full datastore (QEMU's ``werror=enospc``, vSphere's
"no more space for virtual disk"; :mod:`labkit.virtio.blk`): it catches :class:`DatastoreFull` from
``image.write``, keeps the request unanswered (no status, nothing in the used ring), pauses the VM
(the run ends ``paused`` with a message naming the disk) and retries the same write when the VM is run
again (a retry refused again pauses again: another VM may have taken the space first).  Whoever runs
the VM decides when: after freeing space, or after :meth:`wait_for_space` (``error.needed`` bytes) in
the VM's own thread; :meth:`when_space`'s callback runs in the thread that freed the space (perhaps
inside another image's commit), so it should only signal.  Every VM whose writes need new space pauses
the same way; a VM that only overwrites its own clusters keeps running.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Callable, Iterator

from labkit.errors import ConfigError, DatastoreFull, StorageError
from labkit.storage import chain
from labkit.storage.hostfile import ImageFile, extend
from labkit.storage.image import DiskImage
from labkit.storage.qcow2 import Qcow2Image
from labkit.storage.raw import RawImage

DESCRIPTOR = ".labkit-datastore"
"""The datastore's own files start with this name (the capacity, its lock); :meth:`Datastore.used` skips them."""
POLL_S = 0.05
"""How often :meth:`Datastore.wait_for_space` looks at the folder again (for space freed by another process)."""


def _close_in(pid: int, fd: int) -> None:
    """Close a datastore's lock descriptor, in the process that opened it only (a fork's number may be reused)."""
    if os.getpid() == pid:
        try:
            os.close(fd)
        except OSError:
            pass


class Waiter:
    """A writer waiting for ``needed`` free bytes; :meth:`cancel` stops waiting."""

    def __init__(self, datastore: "Datastore", needed: int, callback: Callable[[], None]):
        self.datastore = datastore
        self.needed = needed
        self.callback = callback
        self.done = threading.Event()

    def cancel(self) -> None:
        self.datastore._forget(self)


class Datastore:
    """A folder of images with ``capacity`` bytes (created if missing), shared by every process that opens it."""

    def __init__(self, path: str | os.PathLike[str], capacity: int | None = None):
        """Make the folder a datastore of ``capacity`` bytes, or open the one there (``capacity=None``)."""
        self.path = os.path.abspath(os.fspath(path))
        if capacity is not None:
            self._check_capacity(capacity)
            os.makedirs(self.path, exist_ok=True)
        elif not os.path.exists(self._descriptor):
            raise ConfigError(f"{self.path} is not a datastore (no {DESCRIPTOR} in it); give a capacity to make one")
        self._pid = -1
        self._lock = threading.RLock()
        self._lock_fd = -1
        self._lock_depth = 0
        self._waiters: list[Waiter] = []
        self.refusals = 0  # writes refused for want of space in this process (a counter for figures)
        if capacity is not None:
            self.set_capacity(capacity)
        else:
            _ = self.capacity  # a clear error now for a damaged descriptor

    # -- state shared by every process that opens the folder ---------------------------------------

    @property
    def _descriptor(self) -> str:
        return os.path.join(self.path, DESCRIPTOR)

    def _own(self) -> None:
        """Per-process state: a forked child (an emulator worker) gets a fresh thread lock, file lock and waiters."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._lock = threading.RLock()  # the parent's may have been held by a thread the child does not have
            self._lock_fd = -1  # the parent's descriptor (closed in a worker, or shared with the parent) is not ours
            self._lock_depth = 0
            self._waiters = []

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """This process's threads one at a time, and then every process's (``flock`` on the lock file)."""
        self._own()
        with self._lock:
            if self._lock_fd < 0:
                self._lock_fd = os.open(self._descriptor + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                weakref.finalize(self, _close_in, os.getpid(), self._lock_fd)
            if self._lock_depth == 0:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # -- space ----------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """The capacity in bytes, as the folder says now (another process may have changed it)."""
        try:
            with open(self._descriptor, "rb") as handle:
                capacity = json.loads(handle.read(4096))["capacity"]
        except FileNotFoundError:
            raise StorageError(f"{self.path}: its {DESCRIPTOR} is gone: the folder is no longer a datastore") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise StorageError(f"{self._descriptor}: not a datastore descriptor ({error})") from None
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0:
            raise StorageError(f"{self._descriptor}: the capacity {capacity!r} is not a positive number of bytes")
        return capacity

    def set_capacity(self, capacity: int) -> None:
        """Raise (or lower) the capacity, for every process using the folder; writers waiting here are woken if it
        now suffices (a VM paused on it resumes at its next run, on either backend)."""
        self._check_capacity(capacity)
        with self._locked():
            temporary = f"{self._descriptor}.{os.getpid()}.tmp"
            with open(temporary, "w") as handle:
                json.dump({"capacity": capacity}, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self._descriptor)
        self._wake()

    def used(self) -> int:
        """Bytes in use: the lengths of the regular files in the folder.  A file deleted while the folder is
        listed (another VM's delete or commit, in another thread) counts as gone."""
        total = 0
        with os.scandir(self.path) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False) and not entry.name.startswith(DESCRIPTOR):
                        total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue
        return total

    def free(self) -> int:
        """Bytes a write may still add: what the capacity leaves, at most what the file system has."""
        stat = os.statvfs(self.path)
        return max(0, min(self.capacity - self.used(), stat.f_bavail * stat.f_frsize))

    def grow(self, file: ImageFile, new_length: int) -> None:
        """Extend ``file`` (in this folder) to ``new_length`` if the capacity allows, else raise :class:`DatastoreFull`."""
        with self._locked():
            extra = new_length - file.length
            used = self.used()
            capacity = self.capacity
            if used + extra > capacity:
                self.refusals += 1
                raise DatastoreFull(
                    f"datastore {self.path} is full: {os.path.basename(file.path)} needs {extra} more bytes, "
                    f"{max(0, capacity - used)} of its {capacity} are free; free space (commit or "
                    "delete an overlay, or raise the capacity) and retry", needed=extra,
                    available=max(0, capacity - used), datastore=self)
            try:
                extend(file.fd, file.length, new_length, file.path, datastore=self)
            except DatastoreFull:
                self.refusals += 1
                raise
            file.length = new_length

    def released(self, file: ImageFile) -> None:
        self._wake()

    def when_space(self, needed: int, callback: Callable[[], None]) -> Waiter:
        """Call ``callback()`` once when ``needed`` bytes are free (now, if they are).

        It runs in the thread that freed the space (a commit, a delete, ``set_capacity``): it should only
        signal the waiting writer's own thread, not write itself.
        """
        waiter = Waiter(self, needed, callback)
        self._own()
        with self._lock:
            self._waiters.append(waiter)
        self._wake()
        return waiter

    def wait_for_space(self, needed: int, timeout: float | None = None) -> bool:
        """Block until ``needed`` bytes are free (True) or ``timeout`` seconds pass (False).

        Woken at once by a commit, delete or ``set_capacity`` of this process; space freed elsewhere (another
        process, a file deleted by hand) is seen within :data:`POLL_S` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        waiter = self.when_space(needed, lambda: None)
        while True:
            left = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
            if waiter.done.wait(max(0.0, left)) or self.free() >= needed:
                waiter.cancel()
                return True
            if deadline is not None and time.monotonic() >= deadline:
                waiter.cancel()
                return waiter.done.is_set()

    @property
    def waiting(self) -> int:
        """How many writers of this process wait for space."""
        self._own()
        with self._lock:
            return len(self._waiters)

    def _forget(self, waiter: Waiter) -> None:
        self._own()
        with self._lock:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _wake(self) -> None:
        self._own()
        with self._lock:
            if not self._waiters:
                return
            free = self.free()
            ready = [w for w in self._waiters if w.needed <= free]
            self._waiters = [w for w in self._waiters if w.needed > free]
        for waiter in ready:
            waiter.done.set()
            waiter.callback()

    @staticmethod
    def _check_capacity(capacity: object) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0:
            raise ConfigError(f"a datastore capacity is a positive number of bytes, not {capacity!r}")

    # -- images ---------------------------------------------------------------------------------

    def file(self, name: str) -> str:
        """The path of image ``name`` in this folder (a plain file name: no folders, not hidden)."""
        if not isinstance(name, str) or not name or name.startswith(".") or os.sep in name or \
                (os.altsep and os.altsep in name):
            raise ConfigError(f"{name!r} is not an image name in a datastore (a plain file name)")
        return os.path.join(self.path, name)

    def names(self) -> list[str]:
        return sorted(e.name for e in os.scandir(self.path) if e.is_file() and not e.name.startswith("."))

    def create_raw(self, name: str, size: int) -> str:
        """A thick raw base image of ``size`` bytes (its whole size is taken from the capacity)."""
        RawImage.create(self.file(name), size, space=self).close()
        return self.file(name)

    def create_qcow2(self, name: str, size: int, cluster_size: int = 65536) -> str:
        Qcow2Image.create(self.file(name), size, cluster_size=cluster_size, space=self)
        return self.file(name)

    def create_overlay(self, name: str, backing: str, cluster_size: int = 65536) -> str:
        """A qcow2 overlay (a "snapshot" in vSphere's words) over image ``backing`` of this datastore."""
        chain.create_overlay(self.file(name), self.file(backing), cluster_size=cluster_size, space=self)
        return self.file(name)

    def open(self, name: str, writable: bool = True, barriers: bool = True) -> DiskImage:
        """Open image ``name`` and its backing chain; its file grows through this datastore."""
        return chain.open_image(self.file(name), writable=writable, space=self, barriers=barriers)

    def delete(self, name: str) -> None:
        """Delete image ``name``; waiting writers are woken. An image that is open (its lock held) is refused."""
        held = ImageFile(self.file(name), writable=True)  # the writer's lock: nobody else has it open
        try:
            os.unlink(held.path)
        except OSError as error:
            raise StorageError(f"cannot delete {held.path}: {error.strerror}") from None
        finally:
            held.close()
        self._wake()

    def commit(self, name: str) -> int:
        """Commit overlay ``name`` into its parent and empty it (``qemu-img commit``); returns bytes copied.

        Both must be closed elsewhere (the parent's writer lock is taken): a base other open overlays read is
        refused, since the commit would change what they read.
        """
        copied = chain.commit(self.file(name), space=self)
        self._wake()
        return copied
