"""``ImageFile``: the one way labkit's images touch their host file, and ``Space``: where files may grow.

Every image (raw or qcow2) reads and writes its file through :class:`ImageFile`: positioned
reads and writes of exact lengths (a short write is finished, never left half done), ``fdatasync``
for flushes, and growth only through :meth:`ImageFile.grow`, which asks the file's
:class:`Space` for the bytes first. Growth is the single point where a write can run out of
room, and it comes before anything of the write is written: ``posix_fallocate`` reserves the
blocks, so a full file system (ENOSPC) or a full :class:`~labkit.storage.datastore.Datastore`
raises :class:`~labkit.errors.DatastoreFull` while the image is unchanged. (On a file system
without ``fallocate`` the file is extended sparsely, and a late ENOSPC from a data write is
still raised before the image's metadata points at the new clusters.)

A read past the end of the file returns zeros, as reading a block device past the end of
what was written does; the image formats check their own offsets against :attr:`length`
before they trust a table entry.
"""

from __future__ import annotations

import errno
import fcntl
import os
import weakref
from typing import Protocol

from labkit.errors import DatastoreFull, StorageError, strerror


class Space(Protocol):
    """Where image files live and may grow: the plain file system, or a :class:`Datastore` with a capacity."""

    def grow(self, file: "ImageFile", new_length: int) -> None:
        """Extend ``file`` to ``new_length`` bytes, or raise :class:`DatastoreFull` leaving it as it was."""

    def released(self, file: "ImageFile") -> None:
        """``file`` became shorter or was deleted: space may be free for writers waiting on it."""


def extend(fd: int, old_length: int, new_length: int, path: str, datastore: object = None) -> None:
    """``posix_fallocate`` the bytes from ``old_length`` to ``new_length``; ENOSPC leaves the file as it was."""
    try:
        if not hasattr(os, "posix_fallocate"):  # not on macOS: extend sparsely
            raise OSError(errno.EOPNOTSUPP, "no posix_fallocate")
        os.posix_fallocate(fd, old_length, new_length - old_length)
    except OSError as error:
        if error.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            os.ftruncate(fd, new_length)  # no fallocate here: extend sparsely (ENOSPC may come at the write)
            return
        os.ftruncate(fd, old_length)  # a failed fallocate may have allocated part of the range
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DatastoreFull(f"{path}: the file system is full (ENOSPC) growing the file from {old_length} to "
                                f"{new_length} bytes; nothing was written", needed=new_length - old_length,
                                available=0, datastore=datastore) from None
        raise StorageError(f"{path}: cannot grow the file: {strerror(error.errno)}") from None


class FileSystemSpace:
    """The plain file system: no capacity of labkit's own, only the disk's (ENOSPC)."""

    def grow(self, file: "ImageFile", new_length: int) -> None:
        extend(file.fd, file.length, new_length, file.path)
        file.length = new_length

    def released(self, file: "ImageFile") -> None:
        pass


FILE_SYSTEM = FileSystemSpace()


class ImageFile:
    """An open image file: exact positioned reads and writes, growth through its :class:`Space`, ``fdatasync``.

    ``lock`` takes an ``flock`` on the file: exclusive for a writer, shared for a reader, so two labkit
    writers (or a writer and a reader, e.g. a commit into a base another VM's overlay reads) cannot
    open one image at once, as QEMU's image locking forbids. ``lock=False`` reads without one, as
    ``qemu-img check -U`` does.
    """

    def __init__(self, path: str | os.PathLike[str], writable: bool = False, space: Space | None = None,
                 create: bool = False, lock: bool = True):
        self.path = os.fspath(path)
        self.writable = writable or create
        self.space: Space = space if space is not None else FILE_SYSTEM
        flags = (os.O_RDWR if self.writable else os.O_RDONLY) | os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        try:
            self.fd = os.open(self.path, flags, 0o644)
        except OSError as error:
            raise StorageError(f"{self.path}: cannot open: {strerror(error.errno)}") from None
        self._finalizer = weakref.finalize(self, os.close, self.fd)
        if lock:
            try:
                fcntl.flock(self.fd, (fcntl.LOCK_EX if self.writable else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except OSError as error:
                self.close()
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise StorageError(f"{self.path} is in use: another labkit image has it open "
                                       f"{'(a writer may not share it)' if self.writable else 'for writing'}; "
                                       "close it first") from None
                raise StorageError(f"{self.path}: cannot lock: {strerror(error.errno)}") from None
        self.length = os.fstat(self.fd).st_size

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; bytes past the end of the file read as zeros."""
        try:
            data = os.pread(self.fd, length, offset)
            while len(data) < length:
                more = os.pread(self.fd, length - len(data), offset + len(data))
                if not more:
                    return data + bytes(length - len(data))
                data += more
        except OSError as error:
            raise StorageError(f"{self.path}: read of {length} bytes at {offset:#x} failed: "
                               f"{strerror(error.errno)}") from None
        return data

    def preadinto(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` from ``offset`` (``preadv``, no copy); bytes past the end of the file read as zeros."""
        done = 0
        try:
            while done < len(view):
                count = os.preadv(self.fd, [view[done:]], offset + done)
                if count == 0:
                    view[done:] = bytes(len(view) - done)
                    return
                done += count
        except OSError as error:
            raise StorageError(f"{self.path}: read of {len(view)} bytes at {offset:#x} failed: "
                               f"{strerror(error.errno)}") from None

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at ``offset``; ENOSPC becomes :class:`DatastoreFull`."""
        view = memoryview(data)
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], offset + done)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DatastoreFull(f"{self.path}: the file system is full (ENOSPC) writing {len(view)} bytes at "
                                    f"{offset:#x}", needed=len(view), available=0) from None
            raise StorageError(f"{self.path}: write of {len(view)} bytes at {offset:#x} failed: "
                               f"{strerror(error.errno)}") from None
        if offset + len(view) > self.length:
            self.length = offset + len(view)

    def grow(self, new_length: int) -> None:
        """Make the file ``new_length`` bytes long (reserving the blocks) through its space; no-op if it is longer."""
        if new_length > self.length:
            self.space.grow(self, new_length)

    def truncate(self, new_length: int) -> None:
        """Shorten the file (freed space is announced to its space)."""
        if new_length < self.length:
            os.ftruncate(self.fd, new_length)
            self.length = new_length
            self.space.released(self)

    def sync(self) -> None:
        """``fdatasync``: what was written is on the disk when this returns."""
        try:
            os.fdatasync(self.fd)
        except OSError as error:
            raise StorageError(f"{self.path}: fdatasync failed: {strerror(error.errno)}") from None

    def close(self) -> None:
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive
