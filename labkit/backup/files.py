"""LKFS: the tiny file layout labkit's backup lesson puts on a disk, so that "the files check out" is a real check.

Every number is little-endian; a sector is 512 bytes::

    sector 0      superblock
      +0   "LKFS"            +4  le32 version (1)       +8  le32 files (0..32)   +12 le32 crc32 of sectors 1-8
      +16  le64 disk sectors (the layout's size)        +24 le64 scratch first sector   +32 le64 scratch sectors
      +40  zeros ...          +508 le32 crc32 of bytes 0..507 (zlib's CRC-32)
    sectors 1-8   the directory: 32 entries of 128 bytes (unused ones all zero)
      +0   name[64] (UTF-8, NUL-padded, not empty)   +64 le64 first sector   +72 le64 length in bytes
      +80  sha256[32] of the file's bytes            +112 16 zero bytes
    sector 9 on   the files' data, each from a sector boundary, in directory order; then the scratch area
                  (sectors no file uses: the workload of ``guests/backup64.S`` writes there)

:func:`format_files` writes a layout on a disk, :func:`check_files` reads it back and checks every
checksum and extent (:class:`FilesReport`), :func:`parse_stream` checks what the in-guest agent
sent (the metadata sectors, then each file's bytes in directory order). A damaged superblock or
directory, a file reaching past the disk, or a file whose SHA-256 differs is reported by name;
nothing is read as good data that is not.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass
from typing import Mapping, Protocol

from labkit.errors import ConfigError, FilesDamaged

SECTOR = 512
MAGIC = b"LKFS"
VERSION = 1
ENTRIES = 32
ENTRY_SIZE = 128
NAME_BYTES = 64
DIRECTORY_SECTORS = ENTRIES * ENTRY_SIZE // SECTOR  # 8
METADATA_SECTORS = 1 + DIRECTORY_SECTORS  # 9: what the agent sends first
METADATA_BYTES = METADATA_SECTORS * SECTOR
SUPERBLOCK = struct.Struct("<4sIIIQQQ")
ENTRY = struct.Struct("<64sQQ32s16s")
SCRATCH_MAGIC = b"LKSCRTCH"
SCRATCH_MIX = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


class BlockDisk(Protocol):
    """What the layout needs of a disk: its ``size``, ``read`` and ``write`` (labkit.storage's images)."""

    size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...


@dataclass(frozen=True)
class FileEntry:
    """One directory entry: the file's ``name``, its ``first_sector``, ``length`` in bytes and ``sha256``."""

    name: str
    first_sector: int
    length: int
    sha256: bytes

    @property
    def sectors(self) -> int:
        return -(-self.length // SECTOR)


@dataclass(frozen=True)
class Layout:
    """A disk's superblock and directory, as read (and checked) or as written."""

    disk_sectors: int
    scratch_first: int
    scratch_sectors: int
    files: tuple[FileEntry, ...]

    @property
    def file_bytes(self) -> int:
        return sum(entry.length for entry in self.files)


@dataclass(frozen=True)
class FilesReport:
    """What :func:`check_files` found: the files whose bytes match their SHA-256 (``good``) and, for every
    other, ``damaged[name]`` saying what is wrong; ``layout_error`` when the superblock or directory is bad."""

    good: tuple[str, ...]
    damaged: Mapping[str, str]
    layout_error: str | None = None

    @property
    def ok(self) -> bool:
        return self.layout_error is None and not self.damaged

    def summary(self) -> str:
        if self.layout_error is not None:
            return f"the file layout is unreadable: {self.layout_error}"
        if not self.damaged:
            return f"all {len(self.good)} files check out (SHA-256)"
        return (f"{len(self.damaged)} of {len(self.good) + len(self.damaged)} files damaged: "
                + "; ".join(f"{name}: {why}" for name, why in self.damaged.items()))

    def require(self) -> None:
        """Raise :class:`FilesDamaged` (naming every damaged file) unless every file checks out."""
        if not self.ok:
            raise FilesDamaged(self.summary())


def format_files(disk: BlockDisk, files: Mapping[str, bytes], scratch_sectors: int = 64) -> Layout:
    """Write an LKFS layout holding ``files`` (name -> bytes) on ``disk``, then a scratch area of
    ``scratch_sectors``; returns the layout. A layout that does not fit is a :class:`ConfigError`."""
    if len(files) > ENTRIES:
        raise ConfigError(f"an LKFS disk holds at most {ENTRIES} files, not {len(files)}")
    if not isinstance(scratch_sectors, int) or scratch_sectors < 1:
        raise ConfigError(f"the scratch area is at least one sector, not {scratch_sectors!r}")
    entries, sector = [], METADATA_SECTORS
    for name, data in files.items():
        encoded = name.encode() if isinstance(name, str) else b""
        if not encoded or len(encoded) > NAME_BYTES or b"\0" in encoded:
            raise ConfigError(f"an LKFS file name is 1-{NAME_BYTES} UTF-8 bytes without NUL, not {name!r}")
        entries.append(FileEntry(name, sector, len(data), hashlib.sha256(data).digest()))
        sector += entries[-1].sectors
    disk_sectors = disk.size // SECTOR
    if sector + scratch_sectors > disk_sectors:
        raise ConfigError(f"{len(files)} files and {scratch_sectors} scratch sectors need {sector + scratch_sectors} "
                          f"sectors; the disk has {disk_sectors}")
    layout = Layout(disk_sectors, sector, scratch_sectors, tuple(entries))
    for entry, data in zip(entries, files.values()):
        disk.write(entry.first_sector * SECTOR, bytes(data).ljust(entry.sectors * SECTOR, b"\0"))
    disk.write(layout.scratch_first * SECTOR, bytes(scratch_sectors * SECTOR))
    disk.write(0, encode_metadata(layout))
    return layout


def encode_metadata(layout: Layout) -> bytes:
    """The superblock and directory sectors of ``layout`` (what the agent sends first)."""
    directory = b"".join(ENTRY.pack(e.name.encode(), e.first_sector, e.length, e.sha256, bytes(16))
                         for e in layout.files).ljust(DIRECTORY_SECTORS * SECTOR, b"\0")
    head = SUPERBLOCK.pack(MAGIC, VERSION, len(layout.files), zlib.crc32(directory), layout.disk_sectors,
                           layout.scratch_first, layout.scratch_sectors).ljust(SECTOR - 4, b"\0")
    return head + struct.pack("<I", zlib.crc32(head)) + directory


def decode_metadata(metadata: bytes, disk_sectors: int | None = None) -> Layout:
    """The layout in ``metadata`` (the first :data:`METADATA_BYTES`), every field checked; ``disk_sectors``:
    the disk it was read from (its files and scratch area must lie on it). Raises :class:`FilesDamaged`."""
    if len(metadata) < METADATA_BYTES:
        raise FilesDamaged(f"the superblock and directory are {METADATA_BYTES} bytes; only {len(metadata)} are there")
    head, directory = metadata[:SECTOR], metadata[SECTOR:METADATA_BYTES]
    magic, version, count, directory_crc, sectors, scratch_first, scratch_sectors = SUPERBLOCK.unpack_from(head)
    if magic != MAGIC:
        raise FilesDamaged(f"sector 0 is not an LKFS superblock (magic {magic!r}, not {MAGIC!r})")
    if struct.unpack_from("<I", head, SECTOR - 4)[0] != zlib.crc32(head[:SECTOR - 4]):
        raise FilesDamaged("the superblock's CRC-32 does not match its bytes")
    if version != VERSION:
        raise FilesDamaged(f"LKFS version {version}; labkit reads version {VERSION}")
    if zlib.crc32(directory) != directory_crc:
        raise FilesDamaged("the directory's CRC-32 (in the superblock) does not match sectors 1-8")
    if count > ENTRIES:
        raise FilesDamaged(f"the superblock says {count} files; a directory holds {ENTRIES}")
    if disk_sectors is not None and sectors > disk_sectors:
        raise FilesDamaged(f"the layout is {sectors} sectors; the disk has {disk_sectors}")
    if scratch_first < METADATA_SECTORS or scratch_first + scratch_sectors > sectors:
        raise FilesDamaged(f"the scratch area (sectors {scratch_first}+{scratch_sectors}) is not inside the layout")
    files = []
    for index in range(count):
        raw_name, first, length, digest, _reserved = ENTRY.unpack_from(directory, index * ENTRY_SIZE)
        try:
            name = raw_name.rstrip(b"\0").decode()
        except UnicodeDecodeError:
            raise FilesDamaged(f"directory entry {index}: the name is not UTF-8") from None
        entry = FileEntry(name, first, length, digest)
        if not name or first < METADATA_SECTORS or first + entry.sectors > sectors:
            raise FilesDamaged(f"directory entry {index} ({name!r}): sectors {first}+{entry.sectors} are not "
                               f"inside the layout's {sectors} sectors")
        files.append(entry)
    return Layout(sectors, scratch_first, scratch_sectors, tuple(files))


def read_layout(disk: BlockDisk) -> Layout:
    """The checked layout on ``disk`` (:class:`FilesDamaged` if it has none or a damaged one)."""
    if disk.size < METADATA_BYTES:
        raise FilesDamaged(f"a disk of {disk.size} bytes cannot hold the {METADATA_BYTES}-byte LKFS metadata")
    return decode_metadata(disk.read(0, METADATA_BYTES), disk.size // SECTOR)


def read_files(disk: BlockDisk) -> dict[str, bytes]:
    """Every file's bytes (not checked: :func:`check_files` checks)."""
    layout = read_layout(disk)
    return {e.name: disk.read(e.first_sector * SECTOR, e.length) for e in layout.files}


def check_files(disk: BlockDisk) -> FilesReport:
    """Read every file on ``disk`` and compare it with its SHA-256; never raises for a damaged disk."""
    try:
        layout = read_layout(disk)
    except FilesDamaged as error:
        return FilesReport((), {}, str(error))
    return _report(layout, {e.name: disk.read(e.first_sector * SECTOR, e.length) for e in layout.files})


def _report(layout: Layout, contents: Mapping[str, bytes]) -> FilesReport:
    good, damaged = [], {}
    for entry in layout.files:
        data = contents.get(entry.name)
        if data is None or len(data) != entry.length:
            damaged[entry.name] = f"{0 if data is None else len(data)} of its {entry.length} bytes are there"
        elif hashlib.sha256(data).digest() != entry.sha256:
            damaged[entry.name] = "its SHA-256 differs from the directory's"
        else:
            good.append(entry.name)
    return FilesReport(tuple(good), damaged)


def parse_stream(stream: bytes) -> tuple[Layout, dict[str, bytes], FilesReport]:
    """What the agent sent: the metadata, then each file's bytes in directory order (exactly, nothing after).

    Returns the layout, the files and their check; a stream too short or too long is :class:`FilesDamaged`."""
    layout = decode_metadata(stream[:METADATA_BYTES])
    expected = METADATA_BYTES + layout.file_bytes
    if len(stream) != expected:
        raise FilesDamaged(f"the agent's stream is {len(stream)} bytes; its directory says {expected}")
    files, position = {}, METADATA_BYTES
    for entry in layout.files:
        files[entry.name] = stream[position:position + entry.length]
        position += entry.length
    return layout, files, _report(layout, files)


def restore_files(disk: BlockDisk, layout: Layout, files: Mapping[str, bytes]) -> None:
    """Write ``files`` back where ``layout`` puts them, then the metadata (a restore from a file-level backup).
    The scratch area is zeroed: an agent backup holds files only."""
    if layout.disk_sectors > disk.size // SECTOR:
        raise ConfigError(f"the backup's layout is {layout.disk_sectors} sectors; the disk has {disk.size // SECTOR}")
    for entry in layout.files:
        disk.write(entry.first_sector * SECTOR, bytes(files[entry.name]).ljust(entry.sectors * SECTOR, b"\0"))
    disk.write(layout.scratch_first * SECTOR, bytes(layout.scratch_sectors * SECTOR))
    disk.write(0, encode_metadata(layout))


# -- the workload's scratch records (guests/backup64.S command 2) -----------------------------------------

def scratch_record(number: int) -> bytes:
    """The sector the workload writes as its write ``number``."""
    return (SCRATCH_MAGIC + struct.pack("<QQ", number, (number * SCRATCH_MIX) & _MASK)).ljust(SECTOR, b"\0")


def scratch_numbers(disk: BlockDisk, layout: Layout) -> list[int | None]:
    """Per scratch sector: the number of the workload's write it holds, ``None`` if still zero.

    A sector holding anything but one of the workload's records is :class:`FilesDamaged`."""
    data = disk.read(layout.scratch_first * SECTOR, layout.scratch_sectors * SECTOR)
    numbers: list[int | None] = []
    for index in range(layout.scratch_sectors):
        sector = data[index * SECTOR:(index + 1) * SECTOR]
        if sector == bytes(SECTOR):
            numbers.append(None)
            continue
        number = struct.unpack_from("<Q", sector, len(SCRATCH_MAGIC))[0]
        if sector != scratch_record(number) or number % layout.scratch_sectors != index:
            raise FilesDamaged(f"scratch sector {layout.scratch_first + index} holds no record of the workload")
        numbers.append(number)
    return numbers


def expected_scratch(writes: int, sectors: int) -> list[int | None]:
    """What :func:`scratch_numbers` reads after the first ``writes`` writes of the workload."""
    return [max(range(index, writes, sectors)) if index < writes else None for index in range(sectors)]
