"""A crash after every single write: the image on disk after the first N writes of an operation is clean or
leaks only, for ``labkit disk check`` and ``qemu-img check``, and reads every byte written before the operation.

labkit writes metadata through (no dirty cache), so the file after the first N ``pwrite`` calls of an
operation is exactly what a process killed between those calls leaves (test_crash.py kills real writers at
random moments; this visits every point of the operations that are rare there). The last write may also be
torn: only its first sectors land. The operations: a write that moves the refcount table (512-byte clusters),
a write that allocates L2 tables and refcount blocks, a discard over a backing file, a commit's emptying.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from qemu_tools import qemu_check

from labkit.storage import Qcow2Image, RawImage, check_image, create_overlay, open_image
from labkit.storage.hostfile import ImageFile

pytestmark = [pytest.mark.unit, pytest.mark.slow]

MIB = 1 << 20


class Crash(Exception):
    pass


class CrashingFile:
    """An ImageFile whose writes stop (the process "dies") at the ``limit``-th; ``torn``: its first sectors land.

    A write tears only at a 512-byte sector boundary of the file (a disk writes sectors whole; a killed
    process's write stops at a page boundary at the finest), so a write within one sector never tears.
    """

    def __init__(self, file: ImageFile, limit: int, torn: bool):
        self._file, self.limit, self.torn, self.writes = file, limit, torn, 0
        self.offsets: list[int] = []

    def pwrite(self, offset: int, data) -> None:
        if self.writes == self.limit:
            cut = (offset + len(data) // 2) // 512 * 512 - offset
            if self.torn and cut > 0:
                self._file.pwrite(offset, memoryview(data)[:cut])
            raise Crash
        self.writes += 1
        self.offsets.append(offset)
        self._file.pwrite(offset, data)

    def __getattr__(self, name):
        return getattr(self._file, name)


def run_crashing(path: Path, operation, limit: int, torn: bool = False) -> list[int]:
    """Open ``path``, run ``operation(image)`` until the ``limit``-th write; returns the offsets written."""
    image = open_image(path, writable=True)
    crashing = CrashingFile(image.file, limit, torn)  # type: ignore[attr-defined]
    image.file = crashing  # type: ignore[attr-defined]
    try:
        operation(image)
    except Crash:
        pass
    crashing._file.close()  # the process is gone: no flush, no more writes
    if image.backing is not None:
        image.backing.close()
    return crashing.offsets


def sweep(folder: Path, prepared: Path, operation, expected: bytes, limits) -> int:
    """The crash points ``limits(offsets written)`` of ``operation`` on a copy of ``prepared``; returns how many."""
    offsets = run_crashing(shutil.copyfile(prepared, folder / "total.qcow2"), operation, limit=10**9)
    chosen = limits(offsets)
    for limit in chosen:
        for torn in (False, True):
            work = folder / "work.qcow2"
            shutil.copyfile(prepared, work)
            run_crashing(work, operation, limit, torn)
            labkit = check_image(work)
            assert labkit.exit_code in (0, 3), (limit, torn, labkit.corruptions[:3])
            code, report = qemu_check(str(work))
            assert code in (0, 3), (limit, torn, report)
            with open_image(work) as image:  # type: ignore[attr-defined]
                assert image.read(0, len(expected)) == expected, (limit, torn)
    return len(chosen)


def test_every_crash_point_of_a_write_that_moves_the_refcount_table(tmp_path):
    path = tmp_path / "small.qcow2"
    Qcow2Image.create(path, 16 * MIB, cluster_size=512)
    before = random.Random(1).randbytes(7 * MIB + MIB // 2)
    with open_image(path, writable=True) as image:  # type: ignore[attr-defined]
        image.write(0, before)  # just short of filling the first refcount table (64 blocks of 256 clusters)
        table = image.header.refcount_table_offset
    after = random.Random(2).randbytes(MIB)

    def operation(image) -> None:
        image.write(len(before), after)
        assert image.header.refcount_table_offset != table  # this write moves the table

    def around_the_move(offsets: list[int]) -> list[int]:
        """Every point from the first write into a refcount block to just past the header's table fields (the
        move), and every 8th point elsewhere (the writes of L2 tables and L1 entries, alike)."""
        header = offsets.index(48)
        return sorted(set(range(0, len(offsets), 8)) | set(range(max(0, header - 40), min(len(offsets), header + 4))))

    assert sweep(tmp_path, path, operation, before, around_the_move) > 20


def test_every_crash_point_of_allocating_writes_and_a_discard(tmp_path):
    base = tmp_path / "base.raw"
    raw = RawImage.create(base, 4 * MIB)
    raw.write(0, random.Random(3).randbytes(4 * MIB))
    raw.close()
    path = tmp_path / "top.qcow2"
    create_overlay(path, base, cluster_size=4096)
    with open_image(path, writable=True) as image:  # type: ignore[attr-defined]
        image.write(MIB, b"\x01" * 300_000)
        expected = image.read(0, 4 * MIB)

    def operation(image) -> None:
        image.write(3 * MIB - 5000, b"\x02" * 20_000)       # new L2 table, copy-on-write at both ends
        image.write(MIB + 4096, b"\x03" * 100)              # in place
        image.discard(MIB, 200_000)                         # zero clusters over the backing, frees
        image.write(MIB + 8192, b"\x04" * 5000)             # reuses a freed cluster

    def unchanged_part(data: bytes) -> bytes:
        return data[:MIB]  # the operation never touches the first MiB: it must always read as before

    total = len(run_crashing(shutil.copyfile(path, tmp_path / "t.qcow2"), operation, limit=10**9))
    assert total > 8
    for limit in range(total):
        for torn in (False, True):
            work = tmp_path / "work.qcow2"
            shutil.copyfile(path, work)
            run_crashing(work, operation, limit, torn)
            assert check_image(work).exit_code in (0, 3), (limit, torn)
            assert qemu_check(str(work))[0] in (0, 3), (limit, torn)
            with open_image(work) as image:  # type: ignore[attr-defined]
                assert unchanged_part(image.read(0, 4 * MIB)) == unchanged_part(expected)


def test_every_crash_point_of_a_commits_emptying(tmp_path):
    base = tmp_path / "base.raw"
    RawImage.create(base, 2 * MIB).close()
    path = tmp_path / "top.qcow2"
    create_overlay(path, base, cluster_size=4096)
    with open_image(path, writable=True) as image:  # type: ignore[attr-defined]
        image.write(0, random.Random(4).randbytes(2 * MIB))
        expected = image.read(0, 2 * MIB)
    shutil.copyfile(path, tmp_path / "committed-base.raw")
    # The commit's copy has landed in the base (as commit does before emptying); only the emptying may crash.
    with open_image(path) as image:  # type: ignore[attr-defined]
        data = image.read(0, 2 * MIB)
    with open(base, "r+b") as handle:
        handle.write(data)

    def operation(image) -> None:
        image.make_empty()

    total = len(run_crashing(shutil.copyfile(path, tmp_path / "t.qcow2"), operation, limit=10**9))
    assert total >= 2
    for limit in range(total):
        for torn in (False, True):
            work = tmp_path / "work.qcow2"
            shutil.copyfile(path, work)
            run_crashing(work, operation, limit, torn)
            assert check_image(work).exit_code in (0, 3), (limit, torn)
            assert qemu_check(str(work))[0] in (0, 3), (limit, torn)
            with open_image(work) as image:  # type: ignore[attr-defined]
                assert image.read(0, 2 * MIB) == expected
