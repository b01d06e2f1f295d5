"""A power failure: the writes since the last ``fdatasync`` reach the disk in any subset, the earlier ones all.

With ``barriers=True`` every such image is clean or leaks only (labkit's and qemu-img's check) and reads the
data written before the operation; with ``barriers=False`` some are corrupt, which shows the test can tell.
The operations: allocating writes that link new refcount blocks and move the refcount table (512-byte
clusters), a discard over a backing file, and writes that reuse the freed clusters.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from qemu_tools import qemu_check

from labkit.storage import Qcow2Image, check_image, open_image
from labkit.storage.hostfile import ImageFile

pytestmark = [pytest.mark.unit, pytest.mark.slow]

MIB = 1 << 20


class JournalledFile:
    """An ImageFile that also records each write and each fdatasync, to replay any prefix later."""

    def __init__(self, file: ImageFile):
        self._file = file
        self.epochs: list[list[tuple[int, bytes]]] = [[]]  # writes between syncs

    def pwrite(self, offset: int, data) -> None:
        self.epochs[-1].append((offset, bytes(data)))
        self._file.pwrite(offset, data)

    def sync(self) -> None:
        self._file.sync()
        self.epochs.append([])

    def __getattr__(self, name):
        return getattr(self._file, name)


def record(path: Path, operation, barriers: bool) -> list[list[tuple[int, bytes]]]:
    image = open_image(path, writable=True, barriers=barriers)
    journal = JournalledFile(image.file)  # type: ignore[attr-defined]
    image.file = journal  # type: ignore[attr-defined]
    operation(image)
    journal._file.close()
    return journal.epochs


def power_loss_images(prepared: Path, epochs, work: Path, rng: random.Random, per_epoch: int):
    """Copies of ``prepared`` with every earlier epoch's writes and a random subset of one epoch's."""
    for index, epoch in enumerate(epochs):
        subsets = [[], list(range(len(epoch)))] + [
            sorted(rng.sample(range(len(epoch)), rng.randrange(len(epoch) + 1))) for _ in range(per_epoch)]
        for subset in subsets:
            shutil.copyfile(prepared, work)
            with open(work, "r+b") as handle:
                for earlier in epochs[:index]:
                    for offset, data in earlier:
                        handle.seek(offset)
                        handle.write(data)
                for i in subset:
                    offset, data = epoch[i]
                    handle.seek(offset)
                    handle.write(data)
            yield index, subset


def operation(image) -> None:
    rng = random.Random(5)
    image.write(7 * MIB + MIB // 2, rng.randbytes(MIB))   # new refcount blocks, the table moves
    image.discard(MIB, 64 * 1024)                          # frees
    image.write(12 * MIB, rng.randbytes(20_000))          # reuses freed clusters
    image.write(MIB + 1000, rng.randbytes(3000))


def prepare(folder: Path) -> tuple[Path, bytes]:
    path = folder / "prepared.qcow2"
    Qcow2Image.create(path, 16 * MIB, cluster_size=512)
    data = random.Random(1).randbytes(7 * MIB + MIB // 2)
    with open_image(path, writable=True) as image:  # type: ignore[attr-defined]
        image.write(0, data)
    return path, data[:MIB]  # the first MiB is never written by the operation


def judge(work: Path, expected: bytes) -> bool:
    """True when the image is clean or leaks only and the untouched first MiB reads as before."""
    if check_image(work).exit_code not in (0, 3):
        return False
    with open_image(work) as image:  # type: ignore[attr-defined]
        return image.read(0, MIB) == expected


def test_power_loss_with_barriers_leaves_no_corruption(tmp_path):
    prepared, expected = prepare(tmp_path)
    epochs = record(shutil.copyfile(prepared, tmp_path / "live.qcow2"), operation, barriers=True)
    assert len(epochs) > 6
    rng = random.Random(9)
    cases = 0
    for index, subset in power_loss_images(prepared, epochs, tmp_path / "work.qcow2", rng, per_epoch=4):
        assert judge(tmp_path / "work.qcow2", expected), (index, subset)
        if cases % 5 == 0:
            assert qemu_check(str(tmp_path / "work.qcow2"))[0] in (0, 3), (index, subset)
        cases += 1
    assert cases > 30


def test_without_barriers_a_power_loss_can_corrupt(tmp_path):
    prepared, expected = prepare(tmp_path)
    epochs = record(shutil.copyfile(prepared, tmp_path / "live.qcow2"), operation, barriers=False)
    assert len(epochs) == 1  # no fdatasync at all: any subset of the writes may land
    rng = random.Random(9)
    corrupt = 0
    for _, subset in power_loss_images(prepared, epochs, tmp_path / "work.qcow2", rng, per_epoch=30):
        corrupt += not judge(tmp_path / "work.qcow2", expected)
    assert corrupt > 0
