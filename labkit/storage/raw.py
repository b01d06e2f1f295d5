"""Raw disk images: the virtual disk byte for byte in a file (``qemu-img create -f raw``).

labkit creates them *thick*: the file's blocks are reserved with ``posix_fallocate`` when it is
created, as a thick-provisioned base disk in a datastore is, so a write into a raw base never
needs new space. Reads and writes are bounds-checked against the virtual size; ``discard`` is
advisory on a raw image and leaves the contents as they are.
"""

from __future__ import annotations

import os

from labkit.errors import ConfigError
from labkit.storage.hostfile import ImageFile, Space
from labkit.storage.image import Extent, check_range


class RawImage:
    """An open raw image: ``read``/``write``/``flush``/``close`` straight through to the file."""

    format = "raw"

    def __init__(self, file: ImageFile):
        self.file = file
        self.filename = file.path
        self.size = file.length
        self.writable = file.writable

    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int, space: Space | None = None) -> "RawImage":
        """A new zero-filled raw image of ``size`` bytes (a multiple of 512), its blocks reserved."""
        if not isinstance(size, int) or size <= 0 or size % 512:
            raise ConfigError(f"a disk size must be a positive multiple of 512 bytes, not {size!r}")
        file = ImageFile(path, create=True, space=space)
        try:
            file.grow(size)
        except BaseException:
            file.close()
            os.unlink(file.path)
            raise
        return cls(file)

    @classmethod
    def open(cls, path: str | os.PathLike[str], writable: bool = False, space: Space | None = None) -> "RawImage":
        return cls(ImageFile(path, writable=writable, space=space))

    @property
    def backing(self) -> None:
        return None

    def read(self, offset: int, length: int) -> bytes:
        check_range(self.filename, self.size, offset, length)
        return self.file.pread(offset, length)

    def readinto(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the disk's bytes from ``offset`` (no copy: an overlay above reads through this)."""
        check_range(self.filename, self.size, offset, len(view))
        self.file.preadinto(offset, view)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        check_range(self.filename, self.size, offset, len(data))
        if not self.writable:
            raise ConfigError(f"{self.filename}: opened read-only")
        self.file.pwrite(offset, data)

    def discard(self, offset: int, length: int) -> None:
        check_range(self.filename, self.size, offset, length)

    def flush(self) -> None:
        if self.writable:
            self.file.sync()

    def close(self) -> None:
        self.file.close()

    def extents(self) -> list[Extent]:
        return [Extent(0, self.size, 0, True, False, True, 0, self.filename)]

    def actual_size(self) -> int:
        return os.fstat(self.file.fd).st_blocks * 512

    def __enter__(self) -> "RawImage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
