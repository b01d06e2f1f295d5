"""The qcow2 version 3 on-disk format: header, header extensions, table entries (pure functions).

Everything here follows QEMU's ``docs/interop/qcow2.rst``; each name cites its section.
All numbers are big-endian ("All numbers in qcow2 are stored in Big Endian byte order").
Layout of a file labkit creates (the same as ``qemu-img create -f qcow2``)::

    cluster 0   header (104 bytes), header extensions, backing file name     "Header", "Header extensions"
    cluster 1   refcount table (one cluster)                                 "Host cluster management"
    cluster 2   refcount block 0 (covers clusters 0 .. 8*cluster/16 - 1)
    cluster 3   L1 table (``l1_size`` entries, the file may end inside it)   "Cluster mapping"
    cluster 4+  L2 tables, data clusters and later refcount blocks, in order of allocation

:func:`decode_header` checks every field it reads against the format and against the
file's length, and raises :class:`~labkit.errors.ImageFormatError` (malformed) or
:class:`~labkit.errors.UnsupportedImage` (a valid feature labkit does not implement, named).
:func:`encode_header` is its inverse; the tests round-trip them.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Iterable

from labkit.errors import ImageFormatError, UnsupportedImage

MAGIC = b"QFI\xfb"
VERSION = 3
HEADER_LENGTH = 104                 # "Header": version 3 header through header_length
MIN_CLUSTER_BITS = 9                # "cluster_bits ... Must not be less than 9"
MAX_CLUSTER_BITS = 21               # QEMU's implementation limit (2 MiB); labkit keeps it
DEFAULT_CLUSTER_BITS = 16
REFCOUNT_ORDER = 4                  # refcount_bits = 16, the only width labkit reads and writes
MAX_BACKING_NAME = 1023             # "backing_file_size ... Must not be longer than 1023 bytes"
MAX_L1_BYTES = 32 << 20             # QEMU's limit on the L1 table ("size" note)
MAX_REFCOUNT_TABLE_BYTES = 8 << 20  # QEMU's limit on the refcount table ("Host cluster management" note)

_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")  # the 104 bytes of "Header", field by field
assert _HEADER.size == HEADER_LENGTH

# "Header": incompatible_features bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
# compatible_features / autoclear_features bits
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# "Header extensions": types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# "Cluster mapping": L1/L2 entry bits; "Host cluster management": refcount table entry
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00   # bits 9-55
COPIED = 1 << 63                      # refcount is exactly one
COMPRESSED = 1 << 62                  # L2 only
ZERO = 1 << 0                         # L2 only, "Standard Cluster Descriptor" bit 0
L1_RESERVED = 0x7F00_0000_0000_01FF   # bits 0-8 and 56-62
L2_RESERVED = 0x3F00_0000_0000_01FE   # bits 1-8 and 56-61 of a standard descriptor
REFTABLE_RESERVED = 0x1FF             # bits 0-8

# The names QEMU writes into the feature name table ("Feature name table"): (type, bit, name).
FEATURE_NAMES: tuple[tuple[int, int, str], ...] = (
    (0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
    (0, 3, "compression type"), (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"), (2, 1, "raw external data"),
)
_KNOWN_INCOMPAT = {0: "dirty bit", 1: "corrupt bit", 2: "external data file", 3: "compression type (zstd)",
                   4: "extended L2 entries (subclusters)"}


@dataclasses.dataclass(frozen=True)
class Header:
    """The qcow2 header ("Header") plus what its extensions say, as labkit uses them."""

    cluster_bits: int
    size: int                       # virtual disk size in bytes
    l1_size: int                    # entries
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    backing_file: str | None = None
    backing_format: str | None = None   # "raw" or "qcow2" from the backing file format extension
    backing_file_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = REFCOUNT_ORDER
    header_length: int = HEADER_LENGTH
    feature_names: tuple[tuple[int, int, str], ...] = ()

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // 8


def l1_entries_for(size: int, cluster_bits: int) -> int:
    """Entries an L1 table needs to map ``size`` bytes ("Cluster mapping": one L2 table per ``2**(2*bits-3)`` bytes)."""
    per_l2 = 1 << (2 * cluster_bits - 3)
    return -(-size // per_l2)


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def _extension(kind: int, data: bytes) -> bytes:
    return struct.pack(">II", kind, len(data)) + data + bytes(_pad8(len(data)) - len(data))


def encode_header(header: Header) -> bytes:
    """The first cluster's bytes: header, extensions (backing format, feature names, end), backing file name."""
    cluster = header.cluster_size
    backing = header.backing_file.encode() if header.backing_file is not None else b""
    extensions = b""
    if header.backing_format is not None:
        extensions += _extension(EXT_BACKING_FORMAT, header.backing_format.encode())
    table = b"".join(struct.pack(">BB46s", kind, bit, name.encode()) for kind, bit, name in FEATURE_NAMES)
    if HEADER_LENGTH + len(extensions) + len(table) + 16 + len(backing) <= cluster:
        extensions += _extension(EXT_FEATURE_TABLE, table)  # optional: left out where it does not fit (512 B)
    extensions += _extension(EXT_END, b"")
    backing_offset = HEADER_LENGTH + len(extensions) if backing else 0
    fields = _HEADER.pack(
        MAGIC, VERSION, backing_offset, len(backing), header.cluster_bits, header.size, 0, header.l1_size,
        header.l1_table_offset, header.refcount_table_offset, header.refcount_table_clusters, 0, 0,
        header.incompatible_features, header.compatible_features, header.autoclear_features,
        header.refcount_order, HEADER_LENGTH)
    data = fields + extensions + backing
    if len(data) > cluster:
        raise ImageFormatError(f"the header, its extensions and the backing file name take {len(data)} bytes, "
                               f"more than one {cluster}-byte cluster")
    return data


def _fail(filename: str, what: str) -> ImageFormatError:
    return ImageFormatError(f"{filename}: not a valid qcow2 image: {what}")


def decode_header(first: bytes, file_length: int, filename: str = "image") -> Header:
    """Parse and check the header and its extensions from the file's first bytes (at least the first cluster).

    Raises :class:`ImageFormatError` for anything malformed (each offset and length checked against the
    cluster and the file) and :class:`UnsupportedImage` naming a feature labkit does not implement.
    """
    if first[:4] != MAGIC:
        raise _fail(filename, f"the magic is {bytes(first[:4])!r}, not {MAGIC!r}")
    version = struct.unpack(">I", first[4:8])[0] if len(first) >= 8 else 0
    if version == 2:
        raise UnsupportedImage(f"{filename}: qcow2 version 2 (compat=0.10) is not supported; labkit reads version 3 "
                               f"(convert: qemu-img amend -f qcow2 -o compat=1.1 {filename})")
    if version != VERSION:
        raise _fail(filename, f"version {version} (this is version 3's reader)")
    if len(first) < HEADER_LENGTH:
        raise _fail(filename, f"the file has {len(first)} bytes, fewer than a qcow2 header's {HEADER_LENGTH}")
    (_, _, backing_offset, backing_size, cluster_bits, size, crypt, l1_size, l1_offset, rt_offset, rt_clusters,
     nb_snapshots, snapshots_offset, incompat, compat, autoclear, refcount_order, header_length) = \
        _HEADER.unpack_from(first)
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise _fail(filename, f"cluster_bits {cluster_bits} is outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}")
    cluster = 1 << cluster_bits
    if len(first) < min(cluster, file_length):
        raise _fail(filename, f"the header cluster is cut off: {len(first)} of {cluster} bytes")
    if header_length < HEADER_LENGTH or header_length % 8 or header_length > cluster:
        raise _fail(filename, f"header_length {header_length} (must be >= 104, a multiple of 8, within the cluster)")
    if header_length + 8 > len(first):
        raise _fail(filename, f"the header ({header_length} bytes) and its extensions' end marker run past the end "
                              f"of the file ({file_length} bytes)")
    # Features labkit does not implement: refused by name ("Header", incompatible/autoclear bits).
    names = _feature_names(first, header_length, cluster, filename)
    unknown_incompat = incompat & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
    if unknown_incompat:
        bit = (unknown_incompat & -unknown_incompat).bit_length() - 1
        name = _KNOWN_INCOMPAT.get(bit) or dict(((k, b), n) for k, b, n in names).get((0, bit)) or "unknown feature"
        raise UnsupportedImage(f"{filename}: uses incompatible feature bit {bit} ({name}), which labkit does not "
                               "implement; it cannot be opened")
    if incompat & INCOMPAT_CORRUPT:
        raise ImageFormatError(f"{filename}: the image is marked corrupt (incompatible feature bit 1); "
                               f"repair it first (qemu-img check -r all {filename})")
    if incompat & INCOMPAT_DIRTY:
        raise UnsupportedImage(f"{filename}: the dirty bit is set (lazy refcounts were not written back); "
                               f"labkit does not rebuild refcounts: run qemu-img check -r all {filename}")
    if crypt:
        raise UnsupportedImage(f"{filename}: encryption (crypt_method {crypt}: "
                               f"{ {1: 'AES', 2: 'LUKS'}.get(crypt, 'unknown')}) is not supported by labkit")
    if nb_snapshots or snapshots_offset:
        raise UnsupportedImage(f"{filename}: has {nb_snapshots} internal snapshot(s) (snapshot table at "
                               f"{snapshots_offset:#x}); labkit does not implement internal snapshots")
    if autoclear & AUTOCLEAR_BITMAPS:
        raise UnsupportedImage(f"{filename}: has persistent dirty bitmaps (autoclear bit 0), which labkit "
                               "does not implement")
    if autoclear & AUTOCLEAR_DATA_FILE_RAW:
        raise UnsupportedImage(f"{filename}: raw external data file (autoclear bit 1) is not supported")
    if header_length > HEADER_LENGTH and first[HEADER_LENGTH] != 0:
        raise UnsupportedImage(f"{filename}: compression type {first[HEADER_LENGTH]} without its incompatible bit; "
                               "labkit writes and reads no compressed clusters")
    if refcount_order != REFCOUNT_ORDER:
        raise UnsupportedImage(f"{filename}: refcount_order {refcount_order} ({1 << refcount_order if refcount_order < 7 else '?'}"
                               f"-bit refcounts); labkit implements 16-bit refcounts only (refcount_order 4)")
    if size % 512:
        raise _fail(filename, f"virtual size {size} is not a multiple of 512")
    needed = l1_entries_for(size, cluster_bits)
    if l1_size < needed or l1_size * 8 > MAX_L1_BYTES:
        raise _fail(filename, f"l1_size {l1_size} cannot map the virtual size {size} (needs {needed} entries)")
    _check_table(filename, "L1 table", l1_offset, l1_size * 8, cluster, file_length)
    if rt_clusters == 0 or rt_clusters * cluster > MAX_REFCOUNT_TABLE_BYTES:
        raise _fail(filename, f"refcount_table_clusters {rt_clusters}")
    _check_table(filename, "refcount table", rt_offset, rt_clusters * cluster, cluster, file_length)
    backing_format: str | None = None
    extensions = _extensions(first, header_length, cluster, filename)
    for kind, data in extensions:
        if kind == EXT_BACKING_FORMAT:
            backing_format = _ascii(data, filename, "backing file format")
            if backing_format not in ("raw", "qcow2"):
                raise UnsupportedImage(f"{filename}: backing file format {backing_format!r}; labkit reads raw and qcow2")
        elif kind == EXT_BITMAPS:
            raise UnsupportedImage(f"{filename}: has a bitmaps extension (persistent dirty bitmaps), not supported")
        elif kind == EXT_CRYPTO:
            raise UnsupportedImage(f"{filename}: has a full disk encryption header, not supported")
        elif kind == EXT_DATA_FILE:
            raise UnsupportedImage(f"{filename}: names an external data file, not supported")
    backing: str | None = None
    if backing_offset:
        if backing_size == 0 or backing_size > MAX_BACKING_NAME:
            raise _fail(filename, f"backing file name length {backing_size} (1..{MAX_BACKING_NAME})")
        if backing_offset < header_length or backing_offset + backing_size > min(cluster, len(first)):
            raise _fail(filename, f"backing file name at {backing_offset:#x}+{backing_size} lies outside the "
                                  "header cluster")
        backing = _text(first[backing_offset:backing_offset + backing_size], filename, "backing file name")
    elif backing_format is not None:
        raise _fail(filename, "a backing file format without a backing file")
    return Header(cluster_bits=cluster_bits, size=size, l1_size=l1_size, l1_table_offset=l1_offset,
                  refcount_table_offset=rt_offset, refcount_table_clusters=rt_clusters, backing_file=backing,
                  backing_format=backing_format, backing_file_offset=backing_offset,
                  incompatible_features=incompat, compatible_features=compat, autoclear_features=autoclear,
                  refcount_order=refcount_order, header_length=header_length, feature_names=names)


def _check_table(filename: str, what: str, offset: int, length: int, cluster: int, file_length: int) -> None:
    if offset == 0 or offset % cluster:
        raise _fail(filename, f"the {what} offset {offset:#x} is not a non-zero multiple of the cluster size")
    if offset + length > file_length:
        raise _fail(filename, f"the {what} at {offset:#x} (+{length} bytes) runs past the end of the file "
                              f"({file_length} bytes)")


def _extensions(first: bytes, header_length: int, cluster: int, filename: str) -> list[tuple[int, bytes]]:
    """The header extensions up to the end marker ("Header extensions"), each bounded by the first cluster."""
    found: list[tuple[int, bytes]] = []
    seen: set[int] = set()
    offset = header_length
    limit = min(cluster, len(first))
    while True:
        if offset + 8 > limit:
            raise _fail(filename, f"header extensions run past the header cluster at {offset:#x} (no end marker)")
        kind, length = struct.unpack_from(">II", first, offset)
        if kind == EXT_END:
            return found
        end = offset + 8 + _pad8(length)
        if end > limit:
            raise _fail(filename, f"header extension {kind:#010x} at {offset:#x} has length {length}, past the "
                                  "header cluster")
        if kind in seen and kind != 0:
            raise _fail(filename, f"header extension {kind:#010x} appears twice")
        seen.add(kind)
        found.append((kind, bytes(first[offset + 8:offset + 8 + length])))
        offset = end


def _feature_names(first: bytes, header_length: int, cluster: int, filename: str) -> tuple[tuple[int, int, str], ...]:
    """The feature name table, if the extensions parse (used only to name an unknown feature)."""
    try:
        extensions = _extensions(first, header_length, cluster, filename)
    except ImageFormatError:
        return ()
    for kind, data in extensions:
        if kind == EXT_FEATURE_TABLE:
            return tuple((data[i], data[i + 1], data[i + 2:i + 48].split(b"\0", 1)[0].decode("latin-1"))
                         for i in range(0, len(data) - 47, 48))
    return ()


def _ascii(data: bytes, filename: str, what: str) -> str:
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise _fail(filename, f"the {what} is not ASCII: {data!r}") from None


def _text(data: bytes, filename: str, what: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(filename, f"the {what} is not UTF-8: {data!r}") from None
    if "\0" in text:
        raise _fail(filename, f"the {what} contains a NUL byte")
    return text


def be64_array(data: bytes) -> list[int]:
    """Big-endian 64-bit table entries (L1, L2, refcount table) as ints."""
    return list(struct.unpack(f">{len(data) // 8}Q", data[:len(data) // 8 * 8]))


def pack_be64(entries: Iterable[int]) -> bytes:
    values = list(entries)
    return struct.pack(f">{len(values)}Q", *values)
