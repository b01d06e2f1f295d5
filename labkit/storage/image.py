"""``DiskImage``: what every image format offers (read, write, discard, flush, close), and its range check.

As kvmtool's ``disk_image_operations``: a disk is read/write/flush/close, and copy-on-write
is a layer (a qcow2 overlay) over a read-only base. Offsets and lengths come from a guest
or a user: :func:`check_range` is the one check every format applies before it touches a file.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from labkit.errors import ImageRangeError


@dataclasses.dataclass(frozen=True)
class Extent:
    """A run of the virtual disk with one allocation state, as ``qemu-img map --output json`` prints it.

    ``depth`` is how far down the chain the data comes from (0: this image); ``offset`` is the host
    offset in the file at that depth, or ``None`` where nothing is stored (zeros).
    """

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None
    filename: str | None = None


class DiskImage(Protocol):
    """An open disk image of ``size`` bytes; ``backing`` is the image below it in a chain, or ``None``."""

    filename: str
    format: str
    size: int
    writable: bool

    @property
    def backing(self) -> "DiskImage | None": ...

    def read(self, offset: int, length: int) -> bytes: ...

    def readinto(self, offset: int, view: memoryview) -> None: ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...

    def extents(self) -> list[Extent]: ...

    def actual_size(self) -> int: ...


def check_range(filename: str, size: int, offset: object, length: object) -> None:
    """``offset`` and ``length`` are whole numbers with ``0 <= offset <= offset + length <= size``."""
    if (not isinstance(offset, int) or isinstance(offset, bool) or not isinstance(length, int)
            or isinstance(length, bool)):
        raise ImageRangeError(f"{filename}: offset and length must be integers, not {offset!r} and {length!r}")
    if offset < 0 or length < 0 or offset + length > size:
        raise ImageRangeError(f"{filename}: {length} bytes at offset {offset} reach outside the virtual disk "
                              f"of {size} bytes")
