"""A snapshot's memory image (a sealed memfd): exact copies, holes kept, copy-on-write restore, dirty bitmaps."""

from __future__ import annotations

import mmap
import os
import pickle
import random

import pytest

from labkit.errors import SnapshotError
from labkit.memory import bitmap_pages
from labkit.snapshot.image import MemoryImage, data_extents
from labkit.memory import page_runs

pytestmark = pytest.mark.unit

PAGE = 4096
PAGES = 64


def anonymous(pages: int = PAGES) -> mmap.mmap:
    return mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def written(memory: mmap.mmap, pages: list[int], seed: int) -> None:
    for page in pages:
        memory[page * PAGE:(page + 1) * PAGE] = random.Random(seed * 1000 + page).randbytes(PAGE)


def test_an_image_of_sparse_memory_is_exact_keeps_its_holes_and_is_sealed() -> None:
    memory = anonymous()
    written(memory, [0, 1, 2, 9, 40, 63], seed=1)
    _ = memory[20 * PAGE]  # read only: the zero page is mapped, nothing is written
    image = MemoryImage.copy_of_memory(memoryview(memory))
    holding = {offset // PAGE + i for offset, length in data_extents(image.fd, len(image)) for i in range(length // PAGE)}
    assert {0, 1, 2, 9, 40, 63} <= holding <= {0, 1, 2, 9, 20, 40, 63}  # checked first: reading a hole fills it
    assert bytes(image) == bytes(memory) and image == memoryview(memory) and len(image) == PAGES * PAGE
    with pytest.raises(PermissionError):
        os.pwrite(image.fd, b"x", 0)
    with pytest.raises(PermissionError):
        os.ftruncate(image.fd, 0)
    assert pickle.loads(pickle.dumps(image)) == image


def test_comparing_pickling_and_saving_a_sparse_image_allocate_none_of_its_holes(tmp_path) -> None:
    from labkit.snapshot.file import SnapshotFile, write_snapshot_file

    memory = anonymous(1024)  # 4 MiB, 3 pages written
    written(memory, [0, 500, 1023], seed=2)
    image = MemoryImage.copy_of_memory(memoryview(memory))
    allocated = os.fstat(image.fd).st_blocks
    assert allocated * 512 <= 3 * PAGE + 3 * PAGE  # the written pages (and at most as much again of rounding)
    assert image == memoryview(memory) and image == MemoryImage.copy_of_memory(memoryview(memory))
    assert image != memoryview(memory)[:-1] and image != bytes(len(image))
    assert pickle.loads(pickle.dumps(image)) == bytes(memory)
    write_snapshot_file(tmp_path / "sparse.snap", {"memory": image})
    with SnapshotFile(tmp_path / "sparse.snap") as saved:
        assert bytes(saved.section("memory")) == bytes(memory)
    assert os.fstat(image.fd).st_blocks == allocated  # through the mapping, 1,021 pages of zeros would be allocated


def test_an_image_mapped_over_memory_is_copy_on_write_and_a_new_image_takes_only_the_writes() -> None:
    source = anonymous()
    written(source, list(range(0, PAGES, 3)), seed=2)
    image = MemoryImage.copy_of_memory(memoryview(source))
    target = anonymous()
    written(target, [5, 6], seed=3)  # what the new machine held before: dropped by the mapping
    view = memoryview(target)
    assert image.can_map_over(view) and not image.can_map_over(memoryview(bytearray(len(image))))
    image.map_private_over(view)
    assert bytes(target) == bytes(image)
    written(target, [3, 4, 50], seed=4)  # the restored guest's writes
    expected = bytes(target)
    assert bytes(image) == bytes(source)  # the snapshot never sees them
    again = MemoryImage.copy_of_memory(view, base=image)
    assert bytes(again) == expected
    del view
    with pytest.raises(SnapshotError):
        image.map_private_over(memoryview(anonymous(PAGES // 2)))


def test_diffs_gather_pages_and_an_image_refills_a_machines_ram_file() -> None:
    source = anonymous()
    written(source, [1, 2, 7], seed=5)
    image = MemoryImage.copy_of_memory(memoryview(source))
    ram = os.memfd_create("test-ram")
    try:
        os.ftruncate(ram, len(image))
        os.pwrite(ram, b"\xff" * (3 * PAGE), 10 * PAGE)  # a page of the old RAM must read as zeros after
        image.copy_into_file(ram)
        assert os.pread(ram, len(image), 0) == bytes(image)
        gathered = MemoryImage.concatenation([(ram, 2 * PAGE, PAGE), b"\x07" * PAGE, memoryview(image)[7 * PAGE:8 * PAGE]])
        assert bytes(gathered) == bytes(image[2 * PAGE:3 * PAGE]) + b"\x07" * PAGE + bytes(image[7 * PAGE:8 * PAGE])
        pages = [(3 * PAGE, memoryview(b"\x01" * PAGE)), (60 * PAGE, memoryview(b"\x02" * PAGE))]
        patched = MemoryImage.with_pages(image, pages)
        want = bytearray(image)
        want[3 * PAGE:4 * PAGE], want[60 * PAGE:61 * PAGE] = b"\x01" * PAGE, b"\x02" * PAGE
        assert bytes(patched) == bytes(want) and bytes(MemoryImage.with_pages(bytes(image), pages)) == bytes(want)
    finally:
        os.close(ram)


def test_bitmap_pages_equals_the_set_bits() -> None:
    generator = random.Random(6)
    for _ in range(300):
        size = generator.randrange(0, 600)
        bitmap = bytes(generator.choice([0xFF, generator.randrange(256)]) if generator.random() < 0.15 else 0
                       for _ in range(size))
        value = int.from_bytes(bitmap, "little")
        assert bitmap_pages(bitmap) == [bit for bit in range(8 * size) if value >> bit & 1]
    for _ in range(300):  # runs of whole bytes (one range each), next to partial ones and at either end
        bitmap = b"".join(bytes([generator.choice([0, 0xFF, generator.randrange(256)])]) * generator.randrange(1, 9)
                          for _ in range(generator.randrange(0, 12)))
        value = int.from_bytes(bitmap, "little")
        assert bitmap_pages(bitmap) == [bit for bit in range(8 * len(bitmap)) if value >> bit & 1]


def test_page_runs_join_consecutive_pages_but_not_across_a_region_edge() -> None:
    assert list(page_runs([1, 2, 3, 5, 6, 9])) == [(1, 3), (5, 2), (9, 1)]
    assert list(page_runs([1, 2, 3, 4], breaks=[3])) == [(1, 2), (3, 2)]
    assert list(page_runs([])) == []


def test_without_a_pagemap_it_can_trust_an_image_copies_every_byte(monkeypatch) -> None:
    from labkit.snapshot import image

    assert image._pagemap_tells_pages()  # checked on this host: a written, a read and an untouched page
    monkeypatch.setattr(image, "_PAGEMAP_CHECKED", [False])
    memory = anonymous()
    written(memory, [4], seed=7)
    copied = MemoryImage.copy_of_memory(memoryview(memory))
    assert list(data_extents(copied.fd, len(copied))) == [(0, len(copied))] and bytes(copied) == bytes(memory)
