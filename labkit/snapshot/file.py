"""The snapshot file: one header, one section table, the sections' bytes, a checksum for each part.

Layout (all integers little-endian)::

    offset  size  field
    0       8     magic            b"LABKSNAP"
    8       4     version          1
    12      4     kind             0 full snapshot, 1 diff (only the pages dirtied since its parent)
    16      16    snapshot id      random, names this snapshot
    32      16    parent id        the snapshot a diff applies to; zeros for a full snapshot
    48      4     section count    1 .. MAX_SECTIONS
    52      4     reserved         0
    56      4     table CRC-32     over the section table
    60      4     header CRC-32    over bytes 0..59
    64      40 x count             section table, one entry per section:
                  name (16 bytes, ASCII, NUL-padded), offset (8), length (8), CRC-32 of the bytes (4), reserved (4)
    ...           the sections' bytes, back to back in table order, the last one ending at the end of the file

Every byte of a valid file is covered by exactly one CRC-32 (the sections are contiguous, with no
padding), and CRC-32 detects every error burst of up to 32 bits, so any single-byte change is caught;
a file's length must equal the end of its last section, so any truncation or appended byte is caught.
Nothing is trusted before it is checked: the header's CRC before its fields, the table's CRC before
its entries, each entry's offset and length against the file before its bytes are read.

Writing is atomic (:func:`write_snapshot_file`): the file is written under a temporary name in the
same folder, flushed with ``fsync``, renamed over the old file (``rename(2)`` replaces it in one step),
and the folder is flushed, so a crash at any moment leaves either the old snapshot or the new one,
never a mix.  Firecracker's snapshot files and QEMU's migration streams were the model; the checksum
per section is theirs, the contiguous layout is ours (so a flip in padding cannot go unnoticed).
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from types import TracebackType
from typing import Iterable, Mapping

from labkit.errors import SnapshotError, strerror
from labkit.snapshot.image import MemoryImage

MAGIC = b"LABKSNAP"
VERSION = 1
HEADER = struct.Struct("<8sII16s16sIIII")
ENTRY = struct.Struct("<16sQQII")
MAX_SECTIONS = 256
ID_SIZE = 16
NO_PARENT = bytes(ID_SIZE)
NAME = re.compile(r"[a-z][a-z0-9_.:-]{0,15}")
"""Section names: lowercase ASCII, at most 16 characters (``regs``, ``memory``, ``device:uart``)."""


class SnapshotKind(IntEnum):
    """What a snapshot file holds."""

    FULL = 0
    DIFF = 1


@dataclass(frozen=True)
class Section:
    """One entry of the section table: where a section's bytes lie and their CRC-32."""

    name: str
    offset: int
    length: int
    crc32: int


@dataclass(frozen=True)
class SnapshotHeader:
    """The checked header and section table of a snapshot file."""

    version: int
    kind: SnapshotKind
    snapshot_id: bytes
    parent_id: bytes
    sections: tuple[Section, ...]
    file_size: int

    @property
    def is_diff(self) -> bool:
        return self.kind is SnapshotKind.DIFF


def _crc(data: bytes | bytearray | memoryview) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def new_snapshot_id() -> bytes:
    """A fresh random snapshot id."""
    return secrets.token_bytes(ID_SIZE)


def _check_name(name: str) -> bytes:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise SnapshotError(f"section name {name!r} is not 1-16 lowercase ASCII letters, digits or _.:-")
    return name.encode("ascii")


def encode_header(kind: SnapshotKind, snapshot_id: bytes, parent_id: bytes,
                  sections: Iterable[tuple[str, int, int]]) -> bytes:
    """The header and section table for sections given as (name, length, crc32), laid out back to back."""
    if len(snapshot_id) != ID_SIZE or len(parent_id) != ID_SIZE:
        raise SnapshotError(f"snapshot and parent ids must be {ID_SIZE} bytes")
    if (kind is SnapshotKind.FULL) != (parent_id == NO_PARENT):
        raise SnapshotError("a full snapshot has no parent and a diff snapshot must name its parent")
    listed = list(sections)
    if not 1 <= len(listed) <= MAX_SECTIONS:
        raise SnapshotError(f"a snapshot has 1 to {MAX_SECTIONS} sections, not {len(listed)}")
    if len({name for name, _, _ in listed}) != len(listed):
        raise SnapshotError("section names must be unique")
    offset = HEADER.size + ENTRY.size * len(listed)
    table = bytearray()
    for name, length, crc in listed:
        table += ENTRY.pack(_check_name(name), offset, length, crc, 0)
        offset += length
    head = HEADER.pack(MAGIC, VERSION, kind, snapshot_id, parent_id, len(listed), 0, _crc(table), 0)
    head = head[:-4] + struct.pack("<I", _crc(head[:-4]))
    return head + bytes(table)


def decode_header(data: bytes | memoryview, file_size: int, where: str = "snapshot") -> SnapshotHeader:
    """Check and decode the header and section table at the start of ``data`` (a file of ``file_size`` bytes).

    Raises :class:`SnapshotError` naming what is wrong; the sections' own checksums are checked by
    :meth:`SnapshotFile.section`/:meth:`SnapshotFile.verify`.
    """
    if file_size < HEADER.size:
        raise SnapshotError(f"{where}: truncated: {file_size} bytes, shorter than the {HEADER.size}-byte header")
    head = bytes(data[:HEADER.size])
    magic, version, kind, snapshot_id, parent_id, count, reserved, table_crc, head_crc = HEADER.unpack(head)
    if magic != MAGIC:
        raise SnapshotError(f"{where}: not a labkit snapshot (magic {magic!r}, expected {MAGIC!r})")
    if head_crc != _crc(head[:-4]):
        raise SnapshotError(f"{where}: header checksum mismatch (the header is corrupt)")
    if version != VERSION:
        raise SnapshotError(f"{where}: snapshot format version {version}; this labkit reads version {VERSION}")
    if kind not in {member.value for member in SnapshotKind}:
        raise SnapshotError(f"{where}: unknown snapshot kind {kind}")
    if reserved:
        raise SnapshotError(f"{where}: reserved header field is {reserved:#x}, not 0")
    if not 1 <= count <= MAX_SECTIONS:
        raise SnapshotError(f"{where}: absurd section count {count} (1 to {MAX_SECTIONS})")
    kind = SnapshotKind(kind)
    if (kind is SnapshotKind.FULL) != (parent_id == NO_PARENT):
        raise SnapshotError(f"{where}: a {kind.name.lower()} snapshot with {'a' if parent_id != NO_PARENT else 'no'} parent")
    table_end = HEADER.size + ENTRY.size * count
    if file_size < table_end:
        raise SnapshotError(f"{where}: truncated: {file_size} bytes, the section table ends at {table_end}")
    table = bytes(data[HEADER.size:table_end])
    if table_crc != _crc(table):
        raise SnapshotError(f"{where}: section table checksum mismatch (the table is corrupt)")
    sections = []
    offset = table_end
    for index in range(count):
        raw_name, start, length, crc, entry_reserved = ENTRY.unpack_from(table, index * ENTRY.size)
        name = raw_name.rstrip(b"\0").decode("ascii", "replace")
        if not NAME.fullmatch(name) or raw_name != name.encode("ascii").ljust(16, b"\0") or entry_reserved:
            raise SnapshotError(f"{where}: section {index} has a malformed name or reserved field")
        if start != offset:
            raise SnapshotError(f"{where}: section {name!r} starts at {start}, expected {offset} (sections are contiguous)")
        if length > file_size - start:
            raise SnapshotError(f"{where}: truncated or absurd length: section {name!r} needs bytes "
                                f"{start}..{start + length}, the file has {file_size}")
        sections.append(Section(name, start, length, crc))
        offset = start + length
    if len({section.name for section in sections}) != count:
        raise SnapshotError(f"{where}: duplicate section names")
    if offset != file_size:
        raise SnapshotError(f"{where}: {file_size - offset} bytes after the last section (file damaged or appended to)")
    return SnapshotHeader(version, kind, snapshot_id, parent_id, tuple(sections), file_size)


class SnapshotFile:
    """A snapshot file opened for reading: its header checked, its sections read through a private mapping.

    Use as a context manager; :meth:`verify` checks every section's CRC before anything is restored.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        where = str(self.path)
        try:
            with open(self.path, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except OSError as error:
            raise SnapshotError(f"cannot read snapshot {where}: {strerror(error.errno)}") from None
        self._view = memoryview(self._map) if self._map is not None else memoryview(b"")
        self._handed_out: list[memoryview] = []
        try:
            self.header = decode_header(self._view, size, where)
        except BaseException:
            self.close()
            raise
        self._by_name = {section.name: section for section in self.header.sections}

    def names(self) -> list[str]:
        return [section.name for section in self.header.sections]

    def section(self, name: str) -> memoryview:
        """The bytes of section ``name`` after checking its CRC-32.

        A read-only view into the file's mapping, valid until :meth:`close` (which releases it).
        """
        try:
            section = self._by_name[name]
        except KeyError:
            raise SnapshotError(f"{self.path}: no section {name!r} (it has {', '.join(self.names())})") from None
        data = self._view[section.offset:section.offset + section.length]
        if _crc(data) != section.crc32:
            data.release()
            raise SnapshotError(f"{self.path}: section {name!r} checksum mismatch (its bytes are corrupt)")
        self._handed_out.append(data)
        return data

    def verify(self) -> None:
        """Check every section's CRC-32; raises :class:`SnapshotError` naming the first bad section."""
        for name in self.names():
            self.section(name)

    def close(self) -> None:
        for view in self._handed_out:
            view.release()
        self._handed_out.clear()
        self._view.release()
        if self._map is not None:
            self._map.close()
            self._map = None

    def __enter__(self) -> SnapshotFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


def write_snapshot_file(path: str | os.PathLike[str], sections: Mapping[str, bytes | bytearray | memoryview], *,
                        kind: SnapshotKind = SnapshotKind.FULL, snapshot_id: bytes | None = None,
                        parent_id: bytes = NO_PARENT) -> SnapshotHeader:
    """Write a snapshot file atomically: temporary file, ``fsync``, ``rename`` over ``path``, ``fsync`` of the folder.

    A failure (a full disk: ``ENOSPC``) raises :class:`SnapshotError`, removes the temporary file and
    leaves the file at ``path`` as it was.
    """
    target = Path(path)
    snapshot_id = snapshot_id if snapshot_id is not None else new_snapshot_id()
    views = {name: memoryview(data).cast("B") for name, data in sections.items()}
    head = encode_header(kind, snapshot_id, parent_id,
                         [(name, view.nbytes, _crc_of_pieces(_pieces(view))) for name, view in views.items()])
    folder = target.parent if str(target.parent) else Path(".")
    temporary = folder / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            with os.fdopen(descriptor, "wb", closefd=True) as file:
                file.write(head)
                for view in views.values():
                    for piece in _pieces(view):
                        file.write(piece)
                file.flush()
                os.fsync(file.fileno())
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        os.replace(temporary, target)
        _fsync_folder(folder)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise SnapshotError(f"cannot save snapshot {target}: {strerror(error.errno)}; "
                            f"the file there before (if any) is unchanged") from None
    return decode_header(head, len(head) + sum(view.nbytes for view in views.values()), str(target))


def _pieces(view: memoryview) -> Iterable[bytes | memoryview]:
    """A section's bytes: a whole :class:`MemoryImage` read from its file (its holes stay unallocated), the rest as
    it is."""
    if isinstance(view.obj, MemoryImage) and view.nbytes == len(view.obj):
        return view.obj.chunks()
    return (view,)


def _crc_of_pieces(pieces: Iterable[bytes | memoryview]) -> int:
    crc = 0
    for piece in pieces:
        crc = zlib.crc32(piece, crc)
    return crc & 0xFFFFFFFF


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
