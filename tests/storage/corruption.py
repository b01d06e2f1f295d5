"""Damage a reference overlay byte by byte and by truncation; judge what labkit makes of each damaged copy.

An outcome is acceptable when labkit refuses to open the image with a clear error, or ``labkit disk
check`` exits 2, or the image opens and reads exactly the reference's data. Anything else (reading
different data without a word) is a failure. Used by test_corruption.py (a sample) and
benchmarks/corruption_sweep_qcow2.py (every byte).
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
from pathlib import Path

from qemu_tools import qemu_img, qemu_io

from labkit.errors import StorageError
from labkit.storage import RawImage, check_image, create_overlay, open_image
from labkit.storage import qcow2_format as fmt

SIZE = 1 << 20


@dataclasses.dataclass(frozen=True)
class Reference:
    path: Path
    data: bytes            # what the whole virtual disk reads
    regions: list[tuple[str, int, int]]   # (what, offset, length) of the header and the tables


def make_references(folder: Path) -> list[Reference]:
    """Two overlays over one raw base (4 KiB clusters): one written by labkit, one by qemu-io."""
    base = folder / "base.raw"
    image = RawImage.create(base, SIZE)
    image.write(0, random.Random(1).randbytes(SIZE))
    image.close()
    rng = random.Random(2)
    writes = [(rng.randrange(SIZE // 512 - 16) * 512, rng.randrange(1, 16) * 512, i + 1) for i in range(40)]
    create_overlay(folder / "labkit.qcow2", base, cluster_size=4096)
    with open_image(folder / "labkit.qcow2", writable=True) as overlay:  # type: ignore[attr-defined]
        for offset, length, pattern in writes:
            overlay.write(offset, bytes([pattern]) * length)
        overlay.discard(SIZE // 2, 16384)
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "-o", "cluster_size=4096",
             str(folder / "qemu.qcow2"))
    qemu_io(str(folder / "qemu.qcow2"), *(f"write -P {p} {o} {n}" for o, n, p in writes),
            f"discard {SIZE // 2} 16384")
    references = []
    for name in ("labkit.qcow2", "qemu.qcow2"):
        with open_image(folder / name) as image:  # type: ignore[attr-defined]
            data = image.read(0, SIZE)
        references.append(Reference(folder / name, data, regions(folder / name)))
    assert references[0].data == references[1].data
    return references


def regions(path: Path) -> list[tuple[str, int, int]]:
    """Where the header and every table of ``path`` lie (from its undamaged metadata)."""
    raw = path.read_bytes()
    header = fmt.decode_header(raw[:4096], len(raw))
    cs = header.cluster_size
    found = [("header cluster", 0, cs),
             ("refcount table", header.refcount_table_offset, header.refcount_table_clusters * cs),
             ("L1 table", header.l1_table_offset, header.l1_size * 8)]
    table = fmt.be64_array(raw[header.refcount_table_offset:header.refcount_table_offset + cs])
    found += [(f"refcount block {i}", e, cs) for i, e in enumerate(table) if e]
    l1 = fmt.be64_array(raw[header.l1_table_offset:header.l1_table_offset + header.l1_size * 8])
    found += [(f"L2 table {i}", e & fmt.OFFSET_MASK, cs) for i, e in enumerate(l1) if e & fmt.OFFSET_MASK]
    return found


def judge(path: Path, expected: bytes) -> str:
    """``refused``, ``check`` (labkit disk check exits 2), ``same`` (reads the reference's data), ``size`` (the
    virtual size field changed, still consistent with the tables: the disk looks larger or smaller, and every
    byte it still has reads the reference's data), or ``WRONG ...``."""
    try:
        image = open_image(path, format="qcow2")  # as a VM's configuration names it (a damaged magic probes as raw)
    except StorageError:
        return "refused"
    try:
        if check_image(path, format="qcow2").exit_code == 2:
            return "check"
        if image.size != SIZE:
            shorter = min(image.size, SIZE)
            return "size" if image.read(0, shorter) == expected[:shorter] else "WRONG: size changed and data differ"
        data = image.read(0, SIZE)
    except StorageError:
        return "refused"
    finally:
        image.close()
    if data == expected:
        return "same"
    differing = sum(1 for i in range(0, SIZE, 512) if data[i:i + 512] != expected[i:i + 512])
    return f"WRONG: {differing} sectors differ"


def flip(reference: Reference, work: Path, offset: int, mask: int = 0xFF) -> str:
    """Judge a copy of the reference with the byte at ``offset`` XORed with ``mask``."""
    shutil.copyfile(reference.path, work)
    with open(work, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ mask]))
    return judge(work, reference.data)


def truncate(reference: Reference, work: Path, length: int) -> str:
    shutil.copyfile(reference.path, work)
    os.truncate(work, length)
    return judge(work, reference.data)


def table_offsets(reference: Reference) -> list[int]:
    return sorted({offset + i for _, offset, length in reference.regions for i in range(length)})


def describe(reference: Reference, offset: int) -> str:
    for what, start, length in reference.regions:
        if start <= offset < start + length:
            return f"{reference.path.name}: {what} byte {offset - start} (file offset {offset:#x})"
    return f"{reference.path.name}: file offset {offset:#x}"


