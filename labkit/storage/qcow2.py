"""qcow2 version 3 images written and read by labkit (QEMU's ``docs/interop/qcow2.rst``).

What is implemented, by section of qcow2.rst:

- "Header", "Header extensions", "Feature name table": :mod:`labkit.storage.qcow2_format`.
- "Cluster mapping": a two-level L1/L2 table maps guest clusters to host clusters; a cluster
  is allocated on its first write (copy-on-write from the backing chain for the part of the
  cluster the write does not cover); the standard descriptor's zero flag (bit 0) reads zeros.
- "Host cluster management": 16-bit refcounts (``refcount_order`` 4) in refcount blocks
  reached through the refcount table; the table moves and grows when it is full.
- Backing files: an unallocated cluster reads from the backing image (zeros past its end, or
  with no backing image at all). :meth:`Qcow2Image.discard` frees clusters and leaves zero
  clusters over a backing file, as QEMU does; :meth:`Qcow2Image.make_empty` empties an
  overlay after a commit (:func:`labkit.storage.chain.commit`).

Refused on open, each with an error naming it: version 2, encryption, internal snapshots,
compressed clusters, extended L2 entries, an external data file, persistent dirty bitmaps,
non-deflate compression (zstd), refcount widths other than 16 bits, the dirty and corrupt
bits, and unknown incompatible bits.

Every offset read from the file is checked before it is used: on open the whole metadata is
scanned (:func:`scan`), every L1/L2/refcount-table entry's reserved bits, alignment and bounds
against the file's length, and every cluster's references (header, tables, refcount blocks,
L2 tables, data) are counted and compared with its stored refcount. A cluster referenced more
often than its refcount says, or a COPIED flag (bit 63) that disagrees with the refcount, is
corruption: the image is refused, so a damaged table is never read as wrong data. A refcount
higher than the references is a leak (harmless; ``labkit disk check -r leaks`` repairs it).

Crash safety: the order of writes
---------------------------------
Allocating writes follow QEMU's order (data, refcounts, L2, L1), so a process killed at any
instant leaves an image whose only defect can be leaked clusters:

1. the file grows first (``posix_fallocate`` through the image's space: a full datastore or
   ENOSPC is raised here, before anything is written, and the in-memory state is rolled back);
2. new data clusters (the guest's bytes plus the copied-on-write rest of each cluster) and
   in-place overwrites are written: nothing points at the new clusters yet;
3. refcounts: new refcount blocks are written whole before the refcount table entry that
   links them; a refcount table that must grow is written to new clusters, then the header's
   two table fields are rewritten in one 12-byte write, then the old table is freed;
4. L2: new L2 tables are written whole, and existing tables get their changed entries;
5. L1: the entries that point at the new L2 tables.

Freeing runs the other way (L2/L1 entries first, then refcounts), so a freed cluster is never
reused while a table on disk still points at it. A crash after step 3 leaves clusters with a
refcount and no reference (leaks); before it, unreferenced clusters with refcount 0 (free).
``barriers=True`` (the default) adds an ``fdatasync`` wherever a later write depends on an earlier
one (after step 3; after new L2 tables; before a new refcount block or table is linked, and after
the header switches tables; between clearing entries and lowering refcounts), so a power failure,
which may reorder the writes the page cache holds, cannot put a reference on disk before what it
refers to, as QEMU's cache dependencies and synchronous refcount-table updates do. ``flush()`` is an ``fdatasync``: what was written before it survives
a power failure. Metadata is written through, never held dirty in memory, so every write that
returned is in the page cache and survives a killed process. ``tests/storage/test_crash_points.py``
stops an operation after each of its writes (and tears the last one at a sector boundary);
``benchmarks/killsweep_qcow2.py`` kills writers at random moments; ``qemu-img check`` and
:mod:`labkit.storage.check` judge what they leave. An image object is used by one thread at a time
(a block device serializes its requests); several images may grow in one datastore from several threads.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import sys
from array import array
from typing import Iterator

from labkit.errors import ConfigError, ImageFormatError, StorageError, UnsupportedImage
from labkit.storage import qcow2_format as fmt
from labkit.storage.hostfile import ImageFile, Space
from labkit.storage.image import DiskImage, Extent, check_range

_SWAP = sys.byteorder == "little"


def _be16(data: bytes) -> array:
    values = array("H")
    values.frombytes(data)
    if _SWAP:
        values.byteswap()
    return values


def _to_be16(values: array) -> bytes:
    copy = array("H", values)
    if _SWAP:
        copy.byteswap()
    return copy.tobytes()


@dataclasses.dataclass
class Scan:
    """What a full pass over an image's metadata found (:func:`scan`); ``labkit disk check`` prints it."""

    header: fmt.Header
    file_length: int
    l1: list[int]
    l2: dict[int, list[int]]                  # L1 index -> the L2 table's entries
    refcount_table: list[int]
    refcounts: array                          # stored refcount per host cluster (up to the file's end)
    references: array                         # references counted from the metadata, per host cluster
    corruptions: list[str] = dataclasses.field(default_factory=list)
    leaks: list[int] = dataclasses.field(default_factory=list)   # clusters whose refcount exceeds references
    leaks_past_end: list[int] = dataclasses.field(default_factory=list)  # refcounts > 0 past the file's end
    allocated_data: int = 0
    fragmented_data: int = 0

    @property
    def clean(self) -> bool:
        return not self.corruptions and not self.leaks and not self.leaks_past_end


def read_header(file: ImageFile) -> fmt.Header:
    """The checked header of ``file`` (at most its first 2 MiB are read)."""
    start = file.pread(0, min(file.length, 24))
    if start[:4] != fmt.MAGIC:
        raise ImageFormatError(f"{file.path}: not a qcow2 image (no QFI\\xfb magic)")
    bits = struct.unpack(">I", start[20:24])[0] if len(start) == 24 else 0
    bits = bits if fmt.MIN_CLUSTER_BITS <= bits <= fmt.MAX_CLUSTER_BITS else fmt.MIN_CLUSTER_BITS
    return fmt.decode_header(file.pread(0, min(file.length, 1 << bits)), file.length, file.path)


def scan(file: ImageFile, header: fmt.Header) -> Scan:
    """Read and check all metadata: tables, refcounts, references, COPIED flags ("Host cluster management").

    Compressed clusters raise :class:`UnsupportedImage`. Everything else wrong is collected in
    ``corruptions`` (the image must not be used) or ``leaks`` (it may).
    """
    cs = header.cluster_size
    bits = header.cluster_bits
    length = file.length
    nclusters = -(-length // cs)
    per_block = cs * 8 // 16
    problems: list[str] = []
    references = array("H", bytes(2 * nclusters))
    refcounts = array("H", bytes(2 * nclusters))
    past_end: list[int] = []
    name = file.path

    def refer(offset: int, what: str, count: int = 1) -> bool:
        first = offset >> bits
        for cluster in range(first, first + count):
            if cluster >= nclusters:
                problems.append(f"{what} at {offset:#x} lies past the end of the file ({length} bytes)")
                return False
            if references[cluster] < 0xFFFF:
                references[cluster] += 1
        return True

    def table_in_file(offset: int, size: int, what: str) -> bool:
        if offset % cs:
            problems.append(f"{what} offset {offset:#x} is not cluster-aligned")
            return False
        if offset + size > length or offset < cs:
            problems.append(f"{what} at {offset:#x} (+{size} bytes) lies outside the file ({length} bytes)")
            return False
        return True

    refer(0, "the header")
    # Refcount table and blocks.
    rt_bytes = header.refcount_table_clusters * cs
    refcount_table = fmt.be64_array(file.pread(header.refcount_table_offset, rt_bytes))
    refer(header.refcount_table_offset, "the refcount table", header.refcount_table_clusters)
    for index, entry in enumerate(refcount_table):
        if not entry:
            continue
        if entry & fmt.REFTABLE_RESERVED:
            problems.append(f"refcount table entry {index} ({entry:#x}) has reserved bits set")
            continue
        if not table_in_file(entry, cs, f"refcount block {index}"):
            continue
        refer(entry, f"refcount block {index}")
        block = _be16(file.pread(entry, cs))
        base = index * per_block
        if base < nclusters:
            upto = min(per_block, nclusters - base)
            refcounts[base:base + upto] = block[:upto]
            rest = block[upto:]
        else:
            upto, rest = 0, block
        if any(rest):
            past_end.extend(base + upto + i for i, value in enumerate(rest) if value)
    # L1 and L2 tables ("Cluster mapping").
    l1 = fmt.be64_array(file.pread(header.l1_table_offset, header.l1_size * 8))
    refer(header.l1_table_offset, "the L1 table", -(-header.l1_size * 8 // cs))
    l2_tables: dict[int, list[int]] = {}
    copied: list[tuple[int, int, int, int]] = []   # COPIED flags that disagree: (host cluster, flag, L1 index, slot)
    allocated = fragmented = 0
    previous = -1
    for index, entry in enumerate(l1):
        if not entry:
            continue
        if entry & fmt.L1_RESERVED:
            problems.append(f"L1 entry {index} ({entry:#x}) has reserved bits set")
            continue
        offset = entry & fmt.OFFSET_MASK
        if not offset:
            problems.append(f"L1 entry {index} ({entry:#x}) has flags but no offset")
            continue
        if not table_in_file(offset, cs, f"the L2 table of L1 entry {index}"):
            continue
        refer(offset, f"the L2 table of L1 entry {index}")
        if (entry >> 63) != (refcounts[offset >> bits] == 1):
            copied.append((offset >> bits, entry >> 63, index, -1))
        table = fmt.be64_array(file.pread(offset, cs))
        l2_tables[index] = table
        unusual = fmt.COMPRESSED | fmt.L2_RESERVED | (cs - 1) & ~fmt.ZERO
        for slot, l2 in enumerate(table):
            if not l2:
                continue
            host = l2 & fmt.OFFSET_MASK
            if l2 & unusual or not host or host + cs > length:  # the rare cases, named (this loop is hot)
                where = f"L2 entry {slot} of L1 entry {index} (guest offset {(index * (cs // 8) + slot) * cs:#x})"
                if l2 & fmt.COMPRESSED:
                    raise UnsupportedImage(f"{name}: {where} is a compressed cluster; labkit does not implement "
                                           "compressed clusters (decompress: qemu-img convert -O qcow2)")
                if l2 & fmt.L2_RESERVED:
                    problems.append(f"{where} ({l2:#x}) has reserved bits set")
                elif not host:
                    if l2 & fmt.COPIED:
                        problems.append(f"{where} ({l2:#x}) has the COPIED flag but no offset")
                elif host % cs:
                    problems.append(f"{where}: data cluster offset {host:#x} is not cluster-aligned")
                else:
                    problems.append(f"{where}: data cluster at {host:#x} runs past the end of the file "
                                    f"({length} bytes)")
                continue
            cluster = host >> bits
            if references[cluster] < 0xFFFF:
                references[cluster] += 1
            if (l2 >> 63) != (refcounts[cluster] == 1):
                copied.append((cluster, l2 >> 63, index, slot))
            allocated += 1  # as qemu-img check counts: every entry with a host cluster, zero clusters too
            if previous >= 0 and host != previous + cs:
                fragmented += 1
            previous = host
    # Refcounts against references.
    leaks: list[int] = []
    for cluster in range(nclusters) if refcounts != references else ():
        stored, counted = refcounts[cluster], references[cluster]
        if stored < counted:
            problems.append(f"cluster {cluster} (at {cluster * cs:#x}): refcount={stored} reference={counted}")
        elif stored > counted:
            leaks.append(cluster)
    for cluster, flag, index, slot in copied:
        if references[cluster] <= refcounts[cluster]:  # else reported above
            what = f"L1 entry {index}" if slot < 0 else f"L2 entry {slot} of L1 entry {index}"
            problems.append(f"{what}: COPIED flag {'set' if flag else 'clear'} but refcount={refcounts[cluster]}")
    return Scan(header=header, file_length=length, l1=l1, l2=l2_tables, refcount_table=refcount_table,
                refcounts=refcounts, references=references, corruptions=problems, leaks=leaks,
                leaks_past_end=past_end, allocated_data=allocated, fragmented_data=fragmented)


class _Transaction:
    """The in-memory changes of one metadata update, so a failure before they reach the disk can be undone."""

    def __init__(self) -> None:
        self.refcount_before: dict[int, int] = {}
        self.new_blocks: dict[int, int] = {}            # refcount table index -> host cluster of the new block
        self.new_table: tuple[int, int] | None = None   # (first host cluster, clusters) of a grown refcount table
        self.table_before: list[int] | None = None
        self.end = 0                                    # the file must be at least this long (bytes)


class Qcow2Image:
    """An open qcow2 (version 3) image; ``backing`` is the opened image below it, or ``None``.

    Open it with :meth:`open` (or :func:`labkit.storage.open_image`, which also opens the backing
    chain), make one with :meth:`create`. Reads and writes take byte offsets into the virtual disk.
    """

    format = "qcow2"

    def __init__(self, file: ImageFile, header: fmt.Header, backing: DiskImage | None = None,
                 barriers: bool = True):
        self.file = file
        self.filename = file.path
        self.header = header
        self.size = header.size
        self.writable = file.writable
        self.cluster_size = header.cluster_size
        self.barriers = barriers
        self._bits = header.cluster_bits
        self._l2_entries = header.l2_entries
        self._per_block = self.cluster_size * 8 // 16
        result = scan(file, header)
        if result.corruptions:
            more = f" (and {len(result.corruptions) - 1} more problems)" if len(result.corruptions) > 1 else ""
            raise ImageFormatError(f"{file.path}: corrupt qcow2 metadata: {result.corruptions[0]}{more}; "
                                   f"see labkit disk check {file.path}")
        self._l1 = result.l1
        self._l2 = result.l2
        self._rt = result.refcount_table
        self._rc = result.refcounts
        self._free_hint = 0
        self._backing = backing
        if backing is not None and header.backing_file is None:
            raise ConfigError(f"{file.path} has no backing file, but one was given")

    # -- opening and creating -------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], writable: bool = False, space: Space | None = None,
             backing: DiskImage | None = None, barriers: bool = True) -> "Qcow2Image":
        """Open one qcow2 file (its backing image, already opened, is passed in: see ``open_image``)."""
        file = ImageFile(path, writable=writable, space=space)
        try:
            image = cls(file, read_header(file), backing, barriers)
            if image.header.autoclear_features and writable:
                file.pwrite(88, bytes(8))  # "autoclear_features": a writer clears the bits it does not know
            return image
        except BaseException:
            file.close()
            raise

    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int, *, cluster_size: int = 1 << fmt.DEFAULT_CLUSTER_BITS,
               backing_file: str | None = None, backing_format: str | None = None,
               space: Space | None = None) -> None:
        """Write a new, empty qcow2 image (atomically: a temporary file, fsync, rename).

        ``backing_file`` is stored as given (relative names are relative to this image's folder,
        as in QEMU); ``backing_format`` is ``"raw"`` or ``"qcow2"``.
        """
        if not isinstance(size, int) or size <= 0 or size % 512:
            raise ConfigError(f"a disk size must be a positive multiple of 512 bytes, not {size!r}")
        if cluster_size & (cluster_size - 1) or not 1 << fmt.MIN_CLUSTER_BITS <= cluster_size <= 1 << fmt.MAX_CLUSTER_BITS:
            raise ConfigError(f"cluster size {cluster_size}: a power of two from 512 to 2 MiB")
        if backing_format not in (None, "raw", "qcow2"):
            raise ConfigError(f"backing format {backing_format!r}: raw or qcow2")
        if backing_file is not None and len(backing_file.encode()) > fmt.MAX_BACKING_NAME:
            raise ConfigError(f"a backing file name is at most {fmt.MAX_BACKING_NAME} bytes")
        bits = cluster_size.bit_length() - 1
        l1_size = max(1, fmt.l1_entries_for(size, bits))
        if l1_size * 8 > fmt.MAX_L1_BYTES:
            raise ConfigError(f"{size} bytes need an L1 table larger than 32 MiB: use larger clusters")
        l1_clusters = -(-l1_size * 8 // cluster_size)
        per_block = cluster_size * 8 // 16
        rt_clusters, blocks = 1, 1
        while True:  # header + refcount table + refcount blocks + L1 must all be covered by the blocks
            total = 1 + rt_clusters + blocks + l1_clusters
            need_blocks = -(-total // per_block)
            need_rt = -(-need_blocks * 8 // cluster_size)
            if (need_blocks, need_rt) == (blocks, rt_clusters):
                break
            blocks, rt_clusters = need_blocks, need_rt
        rt_offset = cluster_size
        l1_offset = (1 + rt_clusters + blocks) * cluster_size
        header = fmt.Header(cluster_bits=bits, size=size, l1_size=l1_size, l1_table_offset=l1_offset,
                            refcount_table_offset=rt_offset, refcount_table_clusters=rt_clusters,
                            backing_file=backing_file, backing_format=backing_format)
        first = fmt.encode_header(header)
        table = [(1 + rt_clusters + i) * cluster_size for i in range(blocks)]
        refcounts = array("H", [1] * total + [0] * (blocks * per_block - total))
        path = os.fspath(path)
        if os.path.lexists(path):
            raise ConfigError(f"{path} exists already")
        temporary = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.creating")
        if os.path.lexists(temporary):
            os.unlink(temporary)  # left by a crash during an earlier create: never linked anywhere
        file = ImageFile(temporary, create=True, space=space)
        try:
            file.grow(l1_offset + l1_size * 8)
            file.pwrite(0, first)
            file.pwrite(rt_offset, fmt.pack_be64(table))
            file.pwrite((1 + rt_clusters) * cluster_size, _to_be16(refcounts))
            file.sync()
            os.rename(temporary, path)
        except BaseException:
            file.close()
            if os.path.lexists(temporary):
                os.unlink(temporary)
            raise
        file.close()
        directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    # -- DiskImage ------------------------------------------------------------------------------

    @property
    def backing(self) -> DiskImage | None:
        return self._backing

    def replace_backing(self, image: DiskImage) -> None:
        """Put ``image`` (the same backing file, opened again, e.g. writable for a commit) below this one."""
        if self._backing is None or os.path.realpath(image.filename) != os.path.realpath(self._backing.filename):
            raise ConfigError(f"{image.filename} is not the backing file of {self.filename}")
        self._backing.close()
        self._backing = image

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the virtual disk at ``offset``, through the backing chain where unallocated."""
        check_range(self.filename, self.size, offset, length)
        buffer = bytearray(length)
        self.readinto(offset, memoryview(buffer))
        return bytes(buffer)

    def readinto(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` from ``offset``: each run read straight into its slice, down the chain (no copies)."""
        check_range(self.filename, self.size, offset, len(view))
        for kind, start, count, host in self._runs(offset, len(view)):
            piece = view[start - offset:start - offset + count]
            if kind == "data":
                self.file.preadinto(host, piece)
            elif kind == "zero":
                piece[:] = bytes(count)
            else:
                self._read_below_into(start, piece)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset``: in place where the cluster is this image's own, else allocate (see the order)."""
        view = memoryview(data).cast("B")
        check_range(self.filename, self.size, offset, len(view))
        if not self.writable:
            raise ConfigError(f"{self.filename}: opened read-only")
        if not view:
            return
        cs = self.cluster_size
        first, last = offset >> self._bits, (offset + len(view) - 1) >> self._bits
        in_place: list[tuple[int, int, int]] = []        # (host offset, start in view, length)
        fresh: list[int] = []                            # guest clusters that need a new host cluster
        replaced: list[int] = []                         # host clusters of zero-flag entries being replaced
        for guest in range(first, last + 1):
            entry = self._entry(guest)
            host = entry & fmt.OFFSET_MASK
            lo = max(offset, guest * cs)
            hi = min(offset + len(view), (guest + 1) * cs)
            if host and not entry & fmt.ZERO and entry & fmt.COPIED:
                in_place.append((host + lo - guest * cs, lo - offset, hi - lo))
            else:
                fresh.append(guest)
                if host:
                    replaced.append(host >> self._bits)
        if not fresh:
            self._write_runs(in_place, view)
            return
        txn = _Transaction()
        try:
            tables = sorted({guest // self._l2_entries for guest in fresh if not self._l1[guest // self._l2_entries]})
            table_clusters = {index: self._allocate(1, txn) for index in tables}
            data_start = self._allocate(len(fresh), txn)
            self.file.grow(txn.end)                                    # 1. space first (may raise DatastoreFull)
            self._write_runs(in_place, view)                           # 2. data
            buffer = bytearray(len(fresh) * cs)
            for i, guest in enumerate(fresh):
                lo = max(offset, guest * cs)
                hi = min(offset + len(view), (guest + 1) * cs)
                if lo > guest * cs or hi < (guest + 1) * cs:
                    buffer[i * cs:(i + 1) * cs] = self._old_cluster(guest)
                buffer[i * cs + lo - guest * cs:i * cs + hi - guest * cs] = view[lo - offset:hi - offset]
            self.file.pwrite(data_start << self._bits, buffer)
            self._commit_refcounts(txn)                                # 3. refcounts
        except BaseException:
            self._rollback(txn)
            raise
        if self.barriers:
            self.file.sync()
        new_entries = {guest: ((data_start + i) << self._bits) | fmt.COPIED for i, guest in enumerate(fresh)}
        for index, cluster in table_clusters.items():                 # 4. new L2 tables, whole
            table = [0] * self._l2_entries
            for guest, entry in new_entries.items():
                if guest // self._l2_entries == index:
                    table[guest % self._l2_entries] = entry
            self.file.pwrite(cluster << self._bits, fmt.pack_be64(table))
            self._l2[index] = table
        self._update_l2({g: e for g, e in new_entries.items() if g // self._l2_entries not in table_clusters})
        if table_clusters:
            if self.barriers:
                self.file.sync()
            for index, cluster in table_clusters.items():             # 5. L1 entries
                self._set_l1(index, (cluster << self._bits) | fmt.COPIED)
        if replaced:  # zero clusters that had a host cluster: freed after the entries that pointed at them
            if self.barriers:
                self.file.sync()
            self._free(replaced)

    def discard(self, offset: int, length: int) -> None:
        """Free this image's clusters wholly inside the range (partial clusters are left as they are).

        The whole clusters read as zeros afterwards: over a backing file they become zero clusters (an L2
        table is allocated for them if need be, as QEMU does), so the backing's old data does not come back.
        """
        check_range(self.filename, self.size, offset, length)
        if not self.writable:
            raise ConfigError(f"{self.filename}: opened read-only")
        cs = self.cluster_size
        first, end = -(-offset // cs), (offset + length) // cs
        if offset + length == self.size:
            end = -(-self.size // cs)
        changes: dict[int, int] = {}
        freed: list[int] = []
        cleared = fmt.ZERO if self._backing is not None else 0  # over a backing file: zeros, not the old data
        for guest in range(first, end):
            entry = self._entry(guest)
            if entry == cleared:
                continue
            host = entry & fmt.OFFSET_MASK
            if host:
                freed.append(host >> self._bits)
            changes[guest] = cleared
        missing = sorted({g // self._l2_entries for g in changes if not self._l1[g // self._l2_entries]})
        if missing:  # zero clusters over a backing file need an L2 table to be written in
            txn = _Transaction()
            try:
                tables = {index: self._allocate(1, txn) for index in missing}
                self.file.grow(txn.end)
                self._commit_refcounts(txn)
            except BaseException:
                self._rollback(txn)
                raise
            if self.barriers:
                self.file.sync()
            for index, cluster in tables.items():
                table = [0] * self._l2_entries
                for guest in changes:
                    if guest // self._l2_entries == index:
                        table[guest % self._l2_entries] = cleared
                self.file.pwrite(cluster << self._bits, fmt.pack_be64(table))
                self._l2[index] = table
            if self.barriers:
                self.file.sync()
            for index, cluster in tables.items():
                self._set_l1(index, (cluster << self._bits) | fmt.COPIED)
            changes = {g: e for g, e in changes.items() if g // self._l2_entries not in tables}
        self._update_l2(changes)                       # references first ...
        if freed:
            if self.barriers:
                self.file.sync()
            self._free(freed)                          # ... then refcounts

    def flush(self) -> None:
        """``fdatasync`` the file: every write before this survives a power failure."""
        if self.writable:
            self.file.sync()

    def close(self) -> None:
        """Flush and close this image and the backing chain below it."""
        try:
            if self.writable and not self.file.closed:
                self.flush()
        finally:
            self.file.close()
            if self._backing is not None:
                self._backing.close()

    def __enter__(self) -> "Qcow2Image":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def actual_size(self) -> int:
        return os.fstat(self.file.fd).st_blocks * 512

    def repair_leaks(self) -> int:
        """Lower every leaked refcount to the references counted (``qemu-img check -r leaks``); returns how many.

        Refcounts first, then the COPIED flags of entries whose cluster is now referenced once.
        """
        if not self.writable:
            raise ConfigError(f"{self.filename}: opened read-only")
        result = scan(self.file, self.header)
        fixed = sorted(result.leaks) + sorted(result.leaks_past_end)
        for cluster in fixed:
            self._set_refcount(cluster, result.references[cluster] if cluster < len(result.references) else 0, None)
        self._write_refcount_entries(fixed)
        for index, entry in enumerate(self._l1):
            if entry and self._refcount((entry & fmt.OFFSET_MASK) >> self._bits) == 1 and not entry & fmt.COPIED:
                self._set_l1(index, entry | fmt.COPIED)
        changes = {}
        for index, table in self._l2.items():
            for slot, entry in enumerate(table):
                host = entry & fmt.OFFSET_MASK
                if host and self._refcount(host >> self._bits) == 1 and not entry & fmt.COPIED:
                    changes[index * self._l2_entries + slot] = entry | fmt.COPIED
        self._update_l2(changes)
        self._free_hint = 0
        self._trim()
        return len(fixed)

    def allocated_clusters(self) -> int:
        """Guest clusters with data in this file (not counting zero clusters)."""
        return sum(1 for table in self._l2.values() for e in table if e & fmt.OFFSET_MASK and not e & fmt.ZERO)

    def extents(self) -> list[Extent]:
        return self.map_range(0, self.size, 0)

    def map_range(self, start: int, length: int, depth: int) -> list[Extent]:
        """Extents of ``[start, start+length)`` down the chain (``qemu-img map``)."""
        found: list[Extent] = []
        for kind, offset, count, host in self._runs(start, length):
            if kind == "data":
                found.append(Extent(offset, count, depth, True, False, True, host, self.filename))
            elif kind == "zero":
                found.append(Extent(offset, count, depth, True, True, False, None, self.filename))
            elif self._backing is not None and offset < self._backing.size:
                below = min(count, self._backing.size - offset)
                found.extend(_map_below(self._backing, offset, below, depth + 1))
                if below < count:
                    found.append(Extent(offset + below, count - below, depth, False, True, False, None, None))
            else:
                found.append(Extent(offset, count, depth, False, True, False, None, None))
        return _merge(found)

    def make_empty(self) -> None:
        """Drop every cluster mapping (after a commit): L1 cleared first, then the refcounts, then the file's tail."""
        if not self.writable:
            raise ConfigError(f"{self.filename}: opened read-only")
        freed = [(e & fmt.OFFSET_MASK) >> self._bits for e in self._l1 if e]
        freed += [(e & fmt.OFFSET_MASK) >> self._bits for t in self._l2.values() for e in t if e & fmt.OFFSET_MASK]
        self.file.pwrite(self.header.l1_table_offset, bytes(8 * len(self._l1)))
        self._l1 = [0] * len(self._l1)
        self._l2 = {}
        if self.barriers:
            self.file.sync()
        self._free(freed)

    # -- mapping --------------------------------------------------------------------------------

    def _entry(self, guest: int) -> int:
        table = self._l2.get(guest // self._l2_entries)
        return table[guest % self._l2_entries] if table is not None else 0

    def _runs(self, offset: int, length: int) -> Iterator[tuple[str, int, int, int]]:
        """``(kind, guest offset, length, host offset)`` runs: kind is data, zero or below (unallocated)."""
        cs, bits, per = self.cluster_size, self._bits, self._l2_entries
        end = offset + length
        kind, run_start, run_host, position = "", offset, 0, offset
        while position < end:
            guest = position >> bits
            table = self._l2.get(guest // per)
            if table is None:  # the whole L2 range is unallocated
                step_end = min(end, (guest // per + 1) * per * cs)
                this, host = "below", 0
            else:
                entry = table[guest % per]
                step_end = min(end, (guest + 1) * cs)
                host = (entry & fmt.OFFSET_MASK) + (position - guest * cs)
                this = "zero" if entry & fmt.ZERO else "data" if entry & fmt.OFFSET_MASK else "below"
                if this != "data":
                    host = 0
            if this == kind and (kind != "data" or host == run_host + (position - run_start)):
                position = step_end
                continue
            if kind:
                yield kind, run_start, position - run_start, run_host
            kind, run_start, run_host, position = this, position, host, step_end
        if kind:
            yield kind, run_start, end - run_start, run_host

    def _read_below_into(self, offset: int, view: memoryview) -> None:
        backing = self._backing
        inside = 0 if backing is None else max(0, min(len(view), backing.size - offset))
        if inside:
            assert backing is not None
            backing.readinto(offset, view[:inside])
        if inside < len(view):
            view[inside:] = bytes(len(view) - inside)

    def _old_cluster(self, guest: int) -> bytes:
        """The current contents of guest cluster ``guest`` (for copy-on-write of a partial write)."""
        entry = self._entry(guest)
        if entry & fmt.ZERO:
            return bytes(self.cluster_size)
        if entry & fmt.OFFSET_MASK:
            return self.file.pread(entry & fmt.OFFSET_MASK, self.cluster_size)
        buffer = bytearray(self.cluster_size)  # past the virtual size: zeros
        start = guest * self.cluster_size
        self._read_below_into(start, memoryview(buffer)[:min(self.cluster_size, self.size - start)])
        return bytes(buffer)

    def _write_runs(self, runs: list[tuple[int, int, int]], view: memoryview) -> None:
        for host, start, count in runs:
            self.file.pwrite(host, view[start:start + count])

    def _update_l2(self, changes: dict[int, int]) -> None:
        """Write changed entries of existing L2 tables, one write per contiguous run."""
        per = self._l2_entries
        for guest in sorted(changes):
            self._l2[guest // per][guest % per] = changes[guest]
        guests = sorted(changes)
        i = 0
        while i < len(guests):
            j = i
            while j + 1 < len(guests) and guests[j + 1] == guests[j] + 1 and guests[j + 1] % per:
                j += 1
            index = guests[i] // per
            table_offset = self._l1[index] & fmt.OFFSET_MASK
            slot = guests[i] % per
            self.file.pwrite(table_offset + 8 * slot, fmt.pack_be64(self._l2[index][slot:slot + j - i + 1]))
            i = j + 1

    def _set_l1(self, index: int, entry: int) -> None:
        self.file.pwrite(self.header.l1_table_offset + 8 * index, struct.pack(">Q", entry))
        self._l1[index] = entry

    # -- host clusters and refcounts ------------------------------------------------------------

    def _refcount(self, cluster: int) -> int:
        return self._rc[cluster] if cluster < len(self._rc) else 0

    def _set_refcount(self, cluster: int, value: int, txn: _Transaction | None) -> None:
        if cluster >= len(self._rc):
            self._rc.extend(array("H", bytes(2 * (cluster + 1 - len(self._rc) + 256))))
        if txn is not None and cluster not in txn.refcount_before:
            txn.refcount_before[cluster] = self._rc[cluster]
        self._rc[cluster] = value

    def _find_free(self, count: int) -> int:
        """The first run of ``count`` clusters with refcount 0, from the hint on (past the end if need be)."""
        cluster = self._free_hint
        run = 0
        while run < count:
            if self._refcount(cluster + run):
                cluster += run + 1
                run = 0
            else:
                run += 1
        return cluster

    def _allocate(self, count: int, txn: _Transaction) -> int:
        """Reserve ``count`` contiguous clusters in memory (refcount 1) and plan the refcount blocks they need."""
        start = self._find_free(count)
        for cluster in range(start, start + count):
            self._set_refcount(cluster, 1, txn)
        self._free_hint = start + count
        txn.end = max(txn.end, (start + count) << self._bits)
        self._cover(start, count, txn)
        return start

    def _cover(self, start: int, count: int, txn: _Transaction) -> None:
        """Make sure refcount blocks (and a refcount table large enough) exist for these clusters."""
        for block in range(start // self._per_block, (start + count - 1) // self._per_block + 1):
            if block >= len(self._rt):
                self._grow_table(block, txn)
            if not self._rt[block] and block not in txn.new_blocks:
                where = self._find_free(1)
                self._set_refcount(where, 1, txn)
                txn.new_blocks[block] = where
                txn.end = max(txn.end, (where + 1) << self._bits)
                self._cover(where, 1, txn)

    def _grow_table(self, block: int, txn: _Transaction) -> None:
        """Plan a larger refcount table (at new clusters) with room for ``block``."""
        if txn.table_before is None:
            txn.table_before = list(self._rt)
        per_cluster = self.cluster_size // 8
        entries = max(block + 1, len(self._rt) * 3 // 2)
        clusters = -(-entries // per_cluster) + 1
        if clusters * self.cluster_size > fmt.MAX_REFCOUNT_TABLE_BYTES:
            raise StorageError(f"{self.filename}: the refcount table would exceed 8 MiB")
        self._rt.extend([0] * (clusters * per_cluster - len(self._rt)))
        if txn.new_table is not None:  # grown twice in one update: the first new table is not needed any more
            for cluster in range(txn.new_table[0], txn.new_table[0] + txn.new_table[1]):
                self._set_refcount(cluster, 0, txn)
        start = self._find_free(clusters)
        for cluster in range(start, start + clusters):
            self._set_refcount(cluster, 1, txn)
        txn.new_table = (start, clusters)
        txn.end = max(txn.end, (start + clusters) << self._bits)
        self._cover(start, clusters, txn)

    def _commit_refcounts(self, txn: _Transaction) -> None:
        """Write the transaction's refcounts: new blocks whole, changed entries, then the table (see the order)."""
        bits, per = self._bits, self._per_block
        for block, where in sorted(txn.new_blocks.items()):
            self.file.pwrite(where << bits, _to_be16(self._block_values(block)))
        changed = sorted(c for c in txn.refcount_before if c // per not in txn.new_blocks)
        self._write_refcount_entries(changed)
        for block, where in txn.new_blocks.items():
            self._rt[block] = where << bits
        if txn.new_table is not None:
            start, clusters = txn.new_table
            self.file.pwrite(start << bits, fmt.pack_be64(self._rt))
            old_offset = self.header.refcount_table_offset
            old_clusters = self.header.refcount_table_clusters
            if self.barriers:
                self.file.sync()  # the new blocks and table are on disk before the header points at them
            self.file.pwrite(48, struct.pack(">QI", start << bits, clusters))  # one write: offset and size
            if self.barriers:
                self.file.sync()  # ... and the header before the old table is freed
            self.header = dataclasses.replace(self.header, refcount_table_offset=start << bits,
                                              refcount_table_clusters=clusters)
            txn.new_table = None
            old = list(range(old_offset >> bits, (old_offset >> bits) + old_clusters))
            for cluster in old:
                self._rc[cluster] = 0
            self._write_refcount_entries(old)
            self._free_hint = min(self._free_hint, old[0])
        else:
            if txn.new_blocks and self.barriers:
                self.file.sync()  # a new block is on disk before the table entry that links it
            for block in sorted(txn.new_blocks):
                self.file.pwrite(self.header.refcount_table_offset + 8 * block,
                                 struct.pack(">Q", self._rt[block]))
        txn.refcount_before.clear()
        txn.new_blocks.clear()
        txn.table_before = None

    def _block_values(self, block: int) -> array:
        start = block * self._per_block
        values = self._rc[start:start + self._per_block]
        if len(values) < self._per_block:
            values.extend(array("H", [0] * (self._per_block - len(values))))
        return values

    def _write_refcount_entries(self, clusters: list[int]) -> None:
        """Write the stored refcounts of ``clusters`` (sorted; their blocks exist), one write per run."""
        per = self._per_block
        i = 0
        while i < len(clusters):
            j = i
            while j + 1 < len(clusters) and clusters[j + 1] == clusters[j] + 1 and clusters[j + 1] % per:
                j += 1
            first = clusters[i]
            block = self._rt[first // per]
            values = self._rc[first:clusters[j] + 1]
            self.file.pwrite(block + 2 * (first % per), _to_be16(values))
            i = j + 1

    def _rollback(self, txn: _Transaction) -> None:
        for cluster, value in txn.refcount_before.items():
            self._rc[cluster] = value
        if txn.table_before is not None:
            self._rt = txn.table_before
        else:
            for block in txn.new_blocks:
                self._rt[block] = 0
        self._free_hint = min([self._free_hint, *txn.refcount_before]) if txn.refcount_before else self._free_hint

    def _free(self, clusters: list[int]) -> None:
        """Drop one reference from each cluster (its references on disk are gone already); trim the file's tail."""
        for cluster in clusters:
            if self._rc[cluster]:
                self._rc[cluster] -= 1
        self._write_refcount_entries(sorted(set(clusters)))
        self._free_hint = min([self._free_hint, *clusters])
        self._trim()

    def _trim(self) -> None:
        """Cut the file after its last cluster in use (freed space returns to the datastore)."""
        used = len(self._rc)
        while used and not self._rc[used - 1]:
            used -= 1
        tail = max(used << self._bits, self.header.l1_table_offset + 8 * self.header.l1_size)
        if tail < self.file.length:
            self.file.truncate(tail)


def _map_below(image: DiskImage, offset: int, length: int, depth: int) -> list[Extent]:
    if isinstance(image, Qcow2Image):
        return image.map_range(offset, length, depth)
    return [Extent(offset, length, depth, True, False, True, offset, image.filename)]


def _merge(extents: list[Extent]) -> list[Extent]:
    merged: list[Extent] = []
    for extent in extents:
        if merged:
            last = merged[-1]
            same = (last.depth, last.present, last.zero, last.data, last.filename) == \
                (extent.depth, extent.present, extent.zero, extent.data, extent.filename)
            contiguous = (last.offset is None and extent.offset is None) or (
                last.offset is not None and extent.offset == last.offset + last.length)
            if same and contiguous and last.start + last.length == extent.start:
                merged[-1] = dataclasses.replace(last, length=last.length + extent.length)
                continue
        merged.append(extent)
    return merged
