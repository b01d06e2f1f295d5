"""labkit's qcow2 against a plain bytearray model: writes, reads, discards, chains, commit, reopen."""

from __future__ import annotations

import os
import re
import random

import pytest

from labkit.errors import ConfigError, ImageRangeError
from labkit.storage import Qcow2Image, RawImage, check_image, commit, create_overlay, open_image
from labkit.storage import qcow2_format as fmt

pytestmark = pytest.mark.unit


def fill(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def assert_clean(path) -> None:
    report = check_image(path)
    assert report.exit_code == 0, (report.corruptions, report.leaks[:5])


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536])
def test_random_writes_and_discards_match_a_model(tmp_path, cluster_size):
    size = 3 << 20
    path = tmp_path / "disk.qcow2"
    Qcow2Image.create(path, size, cluster_size=cluster_size)
    model = bytearray(size)
    rng = random.Random(cluster_size)
    image = open_image(path, writable=True)
    for step in range(300):
        offset = rng.randrange(size)
        length = rng.randrange(1, min(size - offset, 3 * cluster_size + 7) + 1)
        if rng.random() < 0.15:
            image.discard(offset, length)
            cs = cluster_size
            first, end = -(-offset // cs), (offset + length) // cs
            model[first * cs:end * cs] = bytes((end - first) * cs) if end > first else b""
        else:
            data = fill(step, length)
            image.write(offset, data)
            model[offset:offset + length] = data
        if step % 50 == 0:
            assert image.read(0, size) == model
    assert image.read(0, size) == model
    image.close()
    assert_clean(path)
    reopened = open_image(path)
    assert reopened.read(0, size) == model
    reopened.close()


def test_small_clusters_grow_the_refcount_table(tmp_path):
    """512-byte clusters: a refcount block covers 256 clusters and the first table 64 blocks, so it must move."""
    path = tmp_path / "small.qcow2"
    Qcow2Image.create(path, 16 << 20, cluster_size=512)
    image = open_image(path, writable=True)
    assert isinstance(image, Qcow2Image)
    first_table = image.header.refcount_table_offset
    data = fill(1, 12 << 20)
    for offset in range(0, len(data), 1 << 20):
        image.write(offset, data[offset:offset + (1 << 20)])
    assert image.header.refcount_table_offset != first_table
    assert image.read(0, len(data)) == data
    image.close()
    assert_clean(path)
    with open_image(path) as again:  # type: ignore[attr-defined]
        assert again.read(0, len(data)) == data


def test_overlay_reads_fall_through_a_chain(tmp_path):
    base = tmp_path / "base.raw"
    raw = RawImage.create(base, 1 << 20)
    raw.write(0, b"B" * (1 << 20))
    raw.close()
    names = []
    below = base
    for depth in range(4):
        name = tmp_path / f"overlay{depth}.qcow2"
        create_overlay(name, below, cluster_size=4096)
        image = open_image(name, writable=True)
        image.write(depth * 8192 + 100, bytes([depth]) * 5000)
        image.close()
        names.append(name)
        below = name
    top = open_image(below)
    expected = bytearray(b"B" * (1 << 20))
    for depth in range(4):
        expected[depth * 8192 + 100:depth * 8192 + 5100] = bytes([depth]) * 5000
    assert top.read(0, 1 << 20) == expected
    depths = {e.depth for e in top.extents()}
    assert depths == {0, 1, 2, 3, 4}
    top.close()
    for name in names:
        assert_clean(name)


def test_backing_smaller_than_overlay_reads_zeros_past_its_end(tmp_path):
    base = tmp_path / "base.raw"
    RawImage.create(base, 8192).close()
    with open(base, "r+b") as handle:
        handle.write(b"\xff" * 8192)
    create_overlay(tmp_path / "top.qcow2", base, size=65536, cluster_size=4096)
    top = open_image(tmp_path / "top.qcow2", writable=True)
    assert top.read(0, 16384) == b"\xff" * 8192 + bytes(8192)
    top.write(8190, b"ab")  # copy-on-write of a cluster that straddles nothing: inside the backing's end
    assert top.read(4096, 8192) == b"\xff" * 4094 + b"ab" + bytes(4096)
    top.close()


def test_discard_over_a_backing_file_reads_zeros_not_the_backing(tmp_path):
    base = tmp_path / "base.raw"
    raw = RawImage.create(base, 65536)
    raw.write(0, b"\x77" * 65536)
    raw.close()
    create_overlay(tmp_path / "top.qcow2", base, cluster_size=4096)
    top = open_image(tmp_path / "top.qcow2", writable=True)
    top.write(0, b"\x01" * 16384)
    top.discard(4096, 8192)
    assert top.read(0, 16384) == b"\x01" * 4096 + bytes(8192) + b"\x01" * 4096
    assert top.read(16384, 4096) == b"\x77" * 4096
    top.close()
    assert_clean(tmp_path / "top.qcow2")


def test_discard_frees_the_tail_and_the_space_is_reused(tmp_path):
    path = tmp_path / "disk.qcow2"
    Qcow2Image.create(path, 4 << 20)
    image = open_image(path, writable=True)
    image.write(0, fill(2, 2 << 20))
    grown = os.path.getsize(path)
    image.discard(1 << 20, 1 << 20)
    shrunk = os.path.getsize(path)
    assert shrunk == grown - (1 << 20)
    image.discard(0, 1 << 20)
    image.write(2 << 20, fill(3, 1 << 20))  # reuses the freed clusters: the file does not grow
    assert os.path.getsize(path) <= grown - (1 << 20)
    image.close()
    assert_clean(path)


def test_commit_merges_into_the_parent_and_empties_the_overlay(tmp_path):
    base = tmp_path / "base.qcow2"
    Qcow2Image.create(base, 1 << 20, cluster_size=4096)
    with open_image(base, writable=True) as image:  # type: ignore[attr-defined]
        image.write(0, b"a" * (1 << 20))
    create_overlay(tmp_path / "top.qcow2", base, cluster_size=4096)
    top = open_image(tmp_path / "top.qcow2", writable=True)
    top.write(5000, b"b" * 10000)
    top.discard(65536, 8192)
    expected = top.read(0, 1 << 20)
    full = os.path.getsize(tmp_path / "top.qcow2")
    top.close()
    assert commit(tmp_path / "top.qcow2") > 0
    assert os.path.getsize(tmp_path / "top.qcow2") < full
    with open_image(tmp_path / "top.qcow2") as image:  # type: ignore[attr-defined]
        assert image.read(0, 1 << 20) == expected
        assert all(e.depth == 1 for e in image.extents())
    with open_image(base) as image:  # type: ignore[attr-defined]
        assert image.read(0, 1 << 20) == expected
    assert_clean(base)
    assert_clean(tmp_path / "top.qcow2")


def test_out_of_range_requests_are_refused(tmp_path):
    path = tmp_path / "disk.qcow2"
    Qcow2Image.create(path, 1 << 20)
    image = open_image(path, writable=True)
    for offset, length in [(-1, 1), (0, (1 << 20) + 1), ((1 << 20), 1), (1 << 62, 1), (5, -3)]:
        with pytest.raises(ImageRangeError):
            image.read(offset, length)
        with pytest.raises(ImageRangeError):
            image.discard(offset, length)
    with pytest.raises(ImageRangeError):
        image.write((1 << 20) - 1, b"xy")
    with pytest.raises(ImageRangeError):
        image.read(0.5, 1)  # type: ignore[arg-type]
    image.close()
    readonly = open_image(path)
    with pytest.raises(ConfigError):
        readonly.write(0, b"x")
    readonly.close()
    assert_clean(path)


def test_header_round_trips():
    header = fmt.Header(cluster_bits=12, size=1 << 30, l1_size=fmt.l1_entries_for(1 << 30, 12),
                        l1_table_offset=3 << 12, refcount_table_offset=1 << 12, refcount_table_clusters=1,
                        backing_file="../base image.raw", backing_format="raw")
    data = fmt.encode_header(header) + bytes(1 << 20)
    decoded = fmt.decode_header(data[:4096], len(data))
    assert decoded.backing_file == header.backing_file
    assert decoded.backing_format == "raw"
    assert dataclasses_equal(decoded, header)


def dataclasses_equal(a: fmt.Header, b: fmt.Header) -> bool:
    keys = ("cluster_bits", "size", "l1_size", "l1_table_offset", "refcount_table_offset", "refcount_table_clusters",
            "backing_file", "backing_format", "refcount_order", "header_length")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def test_backing_chain_loops_and_missing_backing_are_refused(tmp_path):
    from labkit.errors import ImageFormatError, StorageError
    Qcow2Image.create(tmp_path / "a.qcow2", 65536, backing_file="b.qcow2", backing_format="qcow2")
    Qcow2Image.create(tmp_path / "b.qcow2", 65536, backing_file="a.qcow2", backing_format="qcow2")
    with pytest.raises(ImageFormatError, match="loops"):
        open_image(tmp_path / "a.qcow2")
    Qcow2Image.create(tmp_path / "c.qcow2", 65536, backing_file="gone.raw", backing_format="raw")
    with pytest.raises(StorageError, match="does not exist"):
        open_image(tmp_path / "c.qcow2")


@pytest.mark.parametrize("bit, error, words", [
    (0, "UnsupportedImage", "dirty bit"),
    (1, "ImageFormatError", "marked corrupt"),
    (2, "UnsupportedImage", "external data file"),
    (3, "UnsupportedImage", "compression type"),
    (4, "UnsupportedImage", "extended L2"),
    (9, "UnsupportedImage", "bit 9 (unknown feature)"),
])
def test_incompatible_feature_bits_are_refused_by_name(tmp_path, bit, error, words):
    import labkit.errors
    path = tmp_path / "disk.qcow2"
    Qcow2Image.create(path, 1 << 20)
    raw = bytearray(path.read_bytes())
    raw[72:80] = (1 << bit).to_bytes(8, "big")
    path.write_bytes(raw)
    with pytest.raises(getattr(labkit.errors, error), match=re.escape(words)):
        open_image(path)


def test_an_unknown_feature_is_named_from_the_feature_name_table(tmp_path):
    path = tmp_path / "disk.qcow2"
    Qcow2Image.create(path, 1 << 20)
    raw = bytearray(path.read_bytes())
    raw[72:80] = (1 << 7).to_bytes(8, "big")
    table = raw.find(b"dirty bit") - 2  # the first entry: (type 0, bit 0, "dirty bit")
    raw[table:table + 48] = bytes([0, 7]) + b"time travel".ljust(46, b"\0")
    path.write_bytes(raw)
    with pytest.raises(Exception, match=r"bit 7 \(time travel\)"):
        open_image(path)


def test_unknown_autoclear_bits_are_cleared_by_a_writer(tmp_path):
    path = tmp_path / "disk.qcow2"
    Qcow2Image.create(path, 1 << 20)
    raw = bytearray(path.read_bytes())
    raw[88:96] = (1 << 40).to_bytes(8, "big")
    path.write_bytes(raw)
    open_image(path).close()
    assert path.read_bytes()[88:96] == (1 << 40).to_bytes(8, "big")  # a reader leaves them
    open_image(path, writable=True).close()
    assert path.read_bytes()[88:96] == bytes(8)


def test_an_image_has_one_writer_or_any_number_of_readers(tmp_path):
    from labkit.errors import StorageError
    path = tmp_path / "disk.qcow2"
    Qcow2Image.create(path, 1 << 20)
    writer = open_image(path, writable=True)
    with pytest.raises(StorageError, match="in use"):
        open_image(path, writable=True)
    with pytest.raises(StorageError, match="in use"):
        open_image(path)
    assert check_image(path).exit_code == 0  # a check reads without a lock (qemu-img check -U)
    writer.close()
    readers = [open_image(path), open_image(path)]
    with pytest.raises(StorageError, match="in use"):
        open_image(path, writable=True)
    for reader in readers:
        reader.close()
    open_image(path, writable=True).close()
