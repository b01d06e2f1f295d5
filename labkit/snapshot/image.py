"""A memory region's bytes in a snapshot, held in a sealed ``memfd`` (:class:`MemoryImage`).

A full snapshot must freeze guest memory while the guest may go on, so it copies it once.  Where
that copy goes decides its cost: into a new ``bytes`` object every page is a fresh anonymous page
that the kernel zeroes on its first-touch fault before the copy writes it (on this PVM cloud VM a
64 MiB copy into fresh memory costs 3-5x one into touched memory, ``benchmarks/bench_snapshot.py``).
A ``memfd`` filled by ``pwrite`` or ``copy_file_range`` gets its pages from the kernel with no
fault and no zeroing (shmem skips clearing a page a write fills whole), and a copy from another
memfd skips its holes (``lseek(SEEK_DATA)``), pages never written, which read as zeros.

The image is then sealed (``F_SEAL_WRITE``, ``F_SEAL_SHRINK``, ``F_SEAL_GROW``, ``F_SEAL_SEAL``):
nothing can change a snapshot's memory afterwards, and restoring it is a ``MAP_PRIVATE | MAP_FIXED``
mapping of the image over the new machine's RAM (:meth:`MemoryImage.map_private_over`), as
Firecracker restores guest memory from its snapshot file: no copy at restore; the guest's first
write to each page copies that one page (a copy-on-write fault), its first read maps the image's page.

A :class:`MemoryImage` is an :class:`mmap.mmap` of the image (read-only, shared), so it is a buffer
like ``bytes``: ``len``, slices, ``bytes(image)``, ``memoryview(image)``, written to a file as it is;
``==`` compares contents; it pickles as its bytes (a state sent to a worker process).  Comparing,
pickling and saving read the image's file, not its mapping (:meth:`MemoryImage.chunks`), so the pages
a sparse image never had are not allocated for it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import weakref
from typing import Any, Iterable, Iterator

from labkit.errors import SnapshotError, strerror
from labkit.memory import byte_runs, memory_file

PAGE = 4096
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _new_file(size: int) -> int:
    return memory_file("labkit-snapshot-ram", size, SnapshotError, "a snapshot's memory image", sealable=True)


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each stretch of ``fd``'s first ``size`` bytes that holds pages (``SEEK_DATA`` /
    ``SEEK_HOLE``); what lies between them was never written and reads as zeros."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # no data from offset to the end
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end - start
        offset = end


def _copy_range(source: int, target: int, offset: int, length: int, to: int | None = None) -> None:
    """``copy_file_range`` of ``length`` bytes at ``offset`` of ``source`` to ``to`` (default: the same offset)."""
    done, to = 0, offset if to is None else to
    while done < length:
        copied = os.copy_file_range(source, target, length - done, offset + done, to + done)
        if copied <= 0:
            raise SnapshotError(f"copying a memory image stopped at byte {offset + done:#x} of {offset + length:#x}")
        done += copied


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


_PRESENT, _SWAPPED, _FILE = 0x80, 0x40, 0x20
"""Bits 63, 62 and 61 of a ``/proc/PID/pagemap`` entry (Documentation/admin-guide/mm/pagemap.rst), in its top byte."""
_HOLDS_DATA = bytes(int(bool(b & (_PRESENT | _SWAPPED))) for b in range(256))
"""Top byte -> 1 for a page of an anonymous mapping that holds data (present or swapped out)."""
_WRITTEN_OVER_FILE = bytes(int(bool(b & _SWAPPED or b & (_PRESENT | _FILE) == _PRESENT)) for b in range(256))
"""Top byte -> 1 for a page of a private file mapping that was written (an anonymous copy, present or swapped)."""


_PAGEMAP_CHECKED: list[bool] = []


def _pagemap_tells_pages() -> bool:
    """Whether this host's ``/proc/self/pagemap`` tells written pages from untouched ones, checked once on a
    scratch mapping (one page written, one read, one untouched), not trusted: a sandbox that gives zeros
    would otherwise make every page look untouched and a snapshot skip them all."""
    if not _PAGEMAP_CHECKED:
        scratch = mmap.mmap(-1, 3 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            scratch[0] = 1
            _ = scratch[PAGE]
            flags = _read_page_flags(memoryview(scratch), check=False)
            _PAGEMAP_CHECKED.append(flags is not None and flags.translate(_HOLDS_DATA)[0::2] == b"\x01\x00")
        finally:
            scratch.close()
    return _PAGEMAP_CHECKED[0]


def _page_flags(view: memoryview) -> bytes | None:
    """The top byte of each page's ``/proc/self/pagemap`` entry for the page-aligned writable ``view``,
    or ``None`` where that cannot be read or trusted (a read-only buffer, an unaligned one, no ``/proc``)."""
    return _read_page_flags(view, check=True)


def _read_page_flags(view: memoryview, check: bool) -> bytes | None:
    if view.readonly or len(view) % PAGE or (check and not _pagemap_tells_pages()):
        return None
    anchor = (ctypes.c_char * len(view)).from_buffer(view)
    address = ctypes.addressof(anchor)
    del anchor
    if address % PAGE:
        return None
    pages = len(view) // PAGE
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        entries = os.pread(fd, 8 * pages, 8 * (address // PAGE))
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(entries) != 8 * pages:
        return None
    return entries[7::8]


class MemoryImage(mmap.mmap):
    """A region's bytes at a snapshot: a sealed memfd, mapped read-only here (see the module docstring)."""

    fd: int

    @classmethod
    def _sealed(cls, fd: int, size: int) -> MemoryImage:
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            image = cls(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) if size else None
        except OSError as error:
            os.close(fd)
            raise SnapshotError(f"cannot seal a snapshot's memory image: {strerror(error.errno or 0)}") from None
        if image is None:
            os.close(fd)
            raise SnapshotError("a memory image cannot be empty")
        image.fd = fd
        weakref.finalize(image, os.close, fd)
        return image

    @classmethod
    def copy_of_memory(cls, view: memoryview | bytes, base: MemoryImage | None = None) -> MemoryImage:
        """An image of ``view``'s bytes (host memory: a KVM slot, an in-process emulator's RAM).

        Only the pages that hold something are copied (``pwrite`` of each run), as
        ``/proc/self/pagemap`` tells them: in an anonymous mapping a page never touched is not
        present and reads as zeros; in ``base``'s image mapped over ``view`` (:meth:`map_private_over`)
        only the pages the guest or host wrote since are anonymous, the rest are ``base``'s, copied
        from its file in the kernel.  Without a readable pagemap every byte is copied.
        """
        view = memoryview(view).cast("B")
        size = len(view)
        flags = _page_flags(view)
        if base is not None and (flags is None or len(base) != size):
            base = None  # copy every byte instead
        fd = _new_file(size)
        try:
            if flags is None:
                _write_all(fd, view, 0)
            else:
                if base is not None:
                    for offset, length in data_extents(base.fd, size):
                        _copy_range(base.fd, fd, offset, length)
                mask = flags.translate(_WRITTEN_OVER_FILE if base is not None else _HOLDS_DATA)
                for first, count in byte_runs(mask):
                    _write_all(fd, view[first * PAGE:(first + count) * PAGE], first * PAGE)
        except OSError as error:
            os.close(fd)
            raise SnapshotError(f"cannot fill a snapshot's memory image: {strerror(error.errno or 0)}") from None
        return cls._sealed(fd, size)

    @classmethod
    def copy_of_file(cls, source: int, size: int) -> MemoryImage:
        """An image of the first ``size`` bytes of the file ``source`` (an emulated machine's RAM memfd):
        ``copy_file_range`` of its data, its holes left holes."""
        fd = _new_file(size)
        try:
            for offset, length in data_extents(source, size):
                _copy_range(source, fd, offset, length)
        except (OSError, SnapshotError) as error:
            os.close(fd)
            reason = strerror(error.errno or 0) if isinstance(error, OSError) else str(error)
            raise SnapshotError(f"cannot copy guest RAM into a snapshot image: {reason}") from None
        return cls._sealed(fd, size)

    @classmethod
    def with_pages(cls, base: Any, pages: Iterable[tuple[int, memoryview]]) -> MemoryImage:
        """A new image: ``base`` (an image or any buffer) with each (byte offset, 4 KiB) of ``pages`` written over it."""
        size = len(base)
        if isinstance(base, MemoryImage):
            fd = _new_file(size)
            try:
                for offset, length in data_extents(base.fd, size):
                    _copy_range(base.fd, fd, offset, length)
            except BaseException:
                os.close(fd)
                raise
        else:
            fd = _new_file(size)
            _write_all(fd, memoryview(base).cast("B"), 0)
        try:
            for offset, data in pages:
                _write_all(fd, data, offset)
        except OSError as error:
            os.close(fd)
            raise SnapshotError(f"cannot write a diff's pages into a memory image: {strerror(error.errno or 0)}") \
                from None
        return cls._sealed(fd, size)

    @classmethod
    def concatenation(cls, parts: Iterable[memoryview | bytes | tuple[int, int, int]]) -> MemoryImage:
        """An image of ``parts`` one after the other (a diff's pages): each a buffer, or ``(fd, offset, length)``
        of a file (an emulated machine's RAM memfd), copied in the kernel."""
        parts = list(parts)
        size = sum(part[2] if isinstance(part, tuple) else len(part) for part in parts)
        fd = _new_file(size)
        position = 0
        try:
            for part in parts:
                if isinstance(part, tuple):
                    source, offset, length = part
                    _copy_range(source, fd, offset, length, position)
                    position += length
                else:
                    view = memoryview(part).cast("B")
                    _write_all(fd, view, position)
                    position += len(view)
        except OSError as error:
            os.close(fd)
            raise SnapshotError(f"cannot gather a diff's pages: {strerror(error.errno or 0)}") from None
        except BaseException:
            os.close(fd)
            raise
        return cls._sealed(fd, size)

    def copy_into_file(self, target: int) -> None:
        """Make the file ``target`` (of this image's size: an emulated machine's RAM memfd, its vCPU stopped)
        hold this image: emptied by truncation, then the image's data copied in the kernel."""
        size = len(self)
        os.ftruncate(target, 0)  # every page freed: the image's holes read as zeros there too
        os.ftruncate(target, size)
        for offset, length in data_extents(self.fd, size):
            _copy_range(self.fd, target, offset, length)

    def can_map_over(self, view: memoryview) -> bool:
        """Whether ``view`` is a whole private mapping of this image's size that :meth:`map_private_over` may
        replace (a KVM slot's or an in-process emulator's RAM; not a slice, not a ``bytearray``)."""
        return (isinstance(view.obj, mmap.mmap) and not isinstance(view.obj, MemoryImage)
                and len(view.obj) == len(view) == len(self) and not view.readonly)

    def map_private_over(self, view: memoryview) -> None:
        """Map this image copy-on-write (``MAP_PRIVATE | MAP_FIXED``) over the writable host memory ``view``
        (a machine's RAM, which must be an anonymous mapping of this process that nothing else reads
        through a file).  The pages ``view`` held are dropped; its address stays the same, so a KVM
        memory slot or Unicorn's pointer to it stays valid (KVM's MMU notifier drops what it had mapped)."""
        if not self.can_map_over(view):
            raise SnapshotError(f"a {len(self)}-byte image cannot be mapped over {len(view)} bytes of memory")
        anchor = (ctypes.c_char * len(view)).from_buffer(view)
        address = ctypes.addressof(anchor)
        del anchor
        if address % mmap.PAGESIZE:
            raise SnapshotError("guest memory is not page-aligned: the image cannot be mapped over it")
        result = _libc.mmap(address, len(view), mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | 0x10, self.fd, 0)
        if result == _MAP_FAILED or result != address:  # 0x10: MAP_FIXED (the mmap module does not export it)
            raise SnapshotError(f"cannot map a snapshot image over guest memory: {strerror(ctypes.get_errno())}")

    def chunks(self, size: int = 1 << 20) -> Iterator[bytes]:
        """The image's bytes, ``size`` at a time, read from its file: pages never written read as zeros there
        without being allocated (read through the mapping, each would get a page of memory, and a sparse
        image saved or compared would grow to its full size)."""
        for offset in range(0, len(self), size):
            yield self._read(offset, min(size, len(self) - offset))

    def _read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        while len(data) < length:  # a short read: go on from where it stopped
            more = os.pread(self.fd, length - len(data), offset + len(data))
            if not more:
                raise SnapshotError(f"memory image ends at {offset + len(data):#x}, before {offset + length:#x}")
            data += more
        return data

    def __eq__(self, other: object) -> bool:
        if isinstance(other, MemoryImage):
            return len(self) == len(other) and all(mine == theirs
                                                   for mine, theirs in zip(self.chunks(), other.chunks()))
        try:
            view = memoryview(other).cast("B")  # type: ignore[arg-type]
        except TypeError:
            return NotImplemented
        if len(view) != len(self):
            return False
        offset = 0
        for chunk in self.chunks():
            if view[offset:offset + len(chunk)] != chunk:
                return False
            offset += len(chunk)
        return True

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return (MemoryImage.copy_of_memory, (self._read(0, len(self)),))

    def __repr__(self) -> str:
        return f"<MemoryImage {len(self) >> 10} KiB, memfd {self.fd}>"
