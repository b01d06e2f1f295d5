"""labkit's qcow2 files against Debian's qemu-img and qemu-io, both ways."""

from __future__ import annotations

import json
import os
import random

import pytest
from qemu_tools import qemu_check, qemu_img, qemu_io

from labkit.errors import UnsupportedImage
from labkit.storage import Qcow2Image, RawImage, check_image, create_overlay, info, open_image

pytestmark = pytest.mark.unit

MIB = 1 << 20


def make_base(path, size: int = 8 * MIB) -> bytes:
    data = random.Random(7).randbytes(size)
    image = RawImage.create(path, size)
    image.write(0, data)
    image.close()
    return data


def test_qemu_img_accepts_labkit_files(tmp_path):
    base = tmp_path / "base.raw"
    make_base(base)
    create_overlay(tmp_path / "top.qcow2", base, cluster_size=4096)
    top = open_image(tmp_path / "top.qcow2", writable=True)
    rng = random.Random(1)
    for _ in range(200):
        offset = rng.randrange(0, 8 * MIB - 70000)
        top.write(offset, rng.randbytes(rng.randrange(1, 70000)))
    top.discard(MIB, MIB)
    top.close()
    code, report = qemu_check(str(tmp_path / "top.qcow2"))
    assert code == 0, report
    ours = info(tmp_path / "top.qcow2")
    theirs = json.loads(qemu_img("info", "--output", "json", str(tmp_path / "top.qcow2")).stdout)
    for key in ("virtual-size", "format", "cluster-size", "format-specific", "backing-filename",
                "backing-filename-format", "dirty-flag"):
        assert ours[key] == theirs[key], key
    # The same bytes through QEMU's reader and labkit's, and qemu-img map agrees on what is allocated.
    out = tmp_path / "flat.raw"
    qemu_img("convert", "-O", "raw", str(tmp_path / "top.qcow2"), str(out))
    with open_image(tmp_path / "top.qcow2") as image:  # type: ignore[attr-defined]
        assert out.read_bytes() == image.read(0, image.size)
        ours_map = [(e.start, e.length) for e in image.extents() if e.depth == 0 and e.data]
    theirs_map = [(e["start"], e["length"]) for e in
                  json.loads(qemu_img("map", "--output", "json", str(tmp_path / "top.qcow2")).stdout)
                  if e["depth"] == 0 and e["data"]]
    assert ours_map == theirs_map
    assert "identical" in qemu_img("compare", str(tmp_path / "top.qcow2"), str(out)).stdout


def test_labkit_reads_what_qemu_writes(tmp_path):
    base = tmp_path / "base.raw"
    data = bytearray(make_base(base))
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "-o", "cluster_size=4096",
             str(tmp_path / "top.qcow2"))
    commands = []
    rng = random.Random(3)
    for i in range(60):
        offset = rng.randrange(0, 8 * MIB - 20000) & ~511
        length = rng.randrange(1, 40) * 512
        pattern = i + 1
        commands.append(f"write -P {pattern} {offset} {length}")
        data[offset:offset + length] = bytes([pattern]) * length
    commands.append(f"write -z {2 * MIB} {64 * 1024}")
    data[2 * MIB:2 * MIB + 65536] = bytes(65536)
    commands.append(f"discard {4 * MIB} {64 * 1024}")
    data[4 * MIB:4 * MIB + 65536] = bytes(65536)
    qemu_io(str(tmp_path / "top.qcow2"), *commands)
    assert check_image(tmp_path / "top.qcow2").exit_code == 0
    top = open_image(tmp_path / "top.qcow2", writable=True)
    assert top.read(0, 8 * MIB) == data
    top.write(3 * MIB + 100, b"labkit")  # and labkit keeps writing into QEMU's file
    data[3 * MIB + 100:3 * MIB + 106] = b"labkit"
    top.close()
    assert qemu_check(str(tmp_path / "top.qcow2"))[0] == 0
    qemu_io(str(tmp_path / "top.qcow2"), f"read -P 0x{ord('l'):x} {3 * MIB + 100} 1")


PATTERNS = {
    # name: list of (offset, length) writes into a 32 MiB overlay
    "sequential": [(i * 256 * 1024, 256 * 1024) for i in range(64)],
    "random": [(offset * 4096, 4096) for offset in random.Random(11).sample(range(32 * MIB // 4096), 400)],
    "rewrite": [((i % 16) * 65536, 65536) for i in range(400)],
}


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("cluster_size", [4096, 65536])
def test_overlay_growth_equals_qemu_io(tmp_path, pattern, cluster_size):
    """The same writes into labkit's overlay and QEMU's leave files within 10% of each other's size."""
    make_base(tmp_path / "base.raw", 32 * MIB)
    create_overlay(tmp_path / "labkit.qcow2", tmp_path / "base.raw", cluster_size=cluster_size)
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "-o", f"cluster_size={cluster_size}",
             str(tmp_path / "qemu.qcow2"))
    writes = PATTERNS[pattern]
    image = open_image(tmp_path / "labkit.qcow2", writable=True)
    for offset, length in writes:
        image.write(offset, b"\x5a" * length)
    image.close()
    qemu_io(str(tmp_path / "qemu.qcow2"), *(f"write -P 0x5a {o} {n}" for o, n in writes))
    ours, theirs = os.path.getsize(tmp_path / "labkit.qcow2"), os.path.getsize(tmp_path / "qemu.qcow2")
    assert abs(ours - theirs) <= 0.10 * theirs, (ours, theirs)
    assert "identical" in qemu_img("compare", str(tmp_path / "labkit.qcow2"), str(tmp_path / "qemu.qcow2")).stdout


UNSUPPORTED = {
    "compression": ("compressed cluster", lambda d: (
        qemu_img("create", "-f", "qcow2", str(d / "plain.qcow2"), "1M"),
        qemu_io(str(d / "plain.qcow2"), "write -P 3 0 64k"),
        qemu_img("convert", "-c", "-O", "qcow2", str(d / "plain.qcow2"), str(d / "x.qcow2")))),
    "zstd": ("compression type", lambda d: qemu_img(
        "create", "-f", "qcow2", "-o", "compression_type=zstd", str(d / "x.qcow2"), "1M")),
    "extended L2": ("extended L2", lambda d: qemu_img(
        "create", "-f", "qcow2", "-o", "extended_l2=on", str(d / "x.qcow2"), "1M")),
    "encryption": ("encryption", lambda d: qemu_img(
        "create", "--object", "secret,id=sec0,data=123456", "-f", "qcow2", "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", str(d / "x.qcow2"), "1M")),
    "internal snapshot": ("internal snapshot", lambda d: (
        qemu_img("create", "-f", "qcow2", str(d / "x.qcow2"), "1M"),
        qemu_img("snapshot", "-c", "s1", str(d / "x.qcow2")))),
    "external data file": ("external data file", lambda d: qemu_img(
        "create", "-f", "qcow2", "-o", f"data_file={d / 'x.data'}", str(d / "x.qcow2"), "1M")),
    "dirty bitmap": ("bitmap", lambda d: (
        qemu_img("create", "-f", "qcow2", str(d / "x.qcow2"), "1M"),
        qemu_img("bitmap", "--add", str(d / "x.qcow2"), "b0"))),
    "refcount width": ("refcount", lambda d: qemu_img(
        "create", "-f", "qcow2", "-o", "refcount_bits=8", str(d / "x.qcow2"), "1M")),
    "version 2": ("version 2", lambda d: qemu_img(
        "create", "-f", "qcow2", "-o", "compat=0.10", str(d / "x.qcow2"), "1M")),
}


@pytest.mark.parametrize("feature", sorted(UNSUPPORTED))
def test_features_labkit_does_not_write_are_refused_by_name(tmp_path, feature):
    words, make = UNSUPPORTED[feature]
    make(tmp_path)
    with pytest.raises(UnsupportedImage, match=words):
        open_image(tmp_path / "x.qcow2")
    report = check_image(tmp_path / "x.qcow2")
    assert report.exit_code == 1 and words in (report.error or ""), report


def test_writing_into_qemus_zero_clusters(tmp_path):
    """``write -z`` over allocated clusters leaves zero clusters that keep their host cluster (bit 0 set, an
    offset): labkit reads them as zeros, and a partial write gets a fresh cluster (zeros around the data)."""
    base = tmp_path / "base.raw"
    make_base(base, MIB)
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "-o", "cluster_size=4096",
             str(tmp_path / "top.qcow2"))
    qemu_io(str(tmp_path / "top.qcow2"), "write -P 1 0 64k", "write -z 0 32k")
    with open_image(tmp_path / "top.qcow2") as image:  # type: ignore[attr-defined]
        zero_kept = [e for e in image.extents() if e.zero and e.depth == 0]
    assert zero_kept, "qemu-io left no zero clusters"
    top = open_image(tmp_path / "top.qcow2", writable=True)
    top.write(5000, b"labkit")
    expected = bytearray(32768) + b"\x01" * 32768
    expected[5000:5006] = b"labkit"
    assert top.read(0, 65536) == expected
    top.close()
    assert check_image(tmp_path / "top.qcow2").exit_code == 0
    assert qemu_check(str(tmp_path / "top.qcow2"))[0] == 0
    qemu_io(str(tmp_path / "top.qcow2"), "read -P 0 0 4k", "read -P 1 32k 32k")
