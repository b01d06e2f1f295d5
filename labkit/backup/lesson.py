"""A snapshot is not a backup: damage the base disk under a snapshot, then restore from each kind of backup.

:func:`run_backup_lesson` does what notebook 09's "Backups" section shows, in one folder:

1. a thick base disk in a datastore, with a few files in the LKFS layout (:mod:`labkit.backup.files`);
2. three backups of it: by the agent in the guest (:func:`~labkit.backup.agent.agent_backup`: the
   files, over the virtio console), VADP-style while the VM writes
   (:func:`~labkit.backup.host.vadp_backup`), and a cold copy of the stopped VM's disk
   (:func:`~labkit.backup.host.cold_copy_backup`);
3. a snapshot: the VM goes on with a qcow2 overlay over the base, as after "take snapshot";
4. the base is damaged (:data:`DAMAGES`: deleted, bytes flipped in its files' data, or cut short):
   the snapshot's chain is refused (:func:`open_checked`: the missing backing file, or the files
   that fail their SHA-256), because the overlay holds only what changed since the snapshot;
5. each backup is restored into a new image, its files are checked on the host, and a VM booted on
   the restored disk runs the agent, whose stream checks out again: the restored VM's files are good.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Mapping

from labkit.backup.agent import AgentBackup, agent_backup, restore_agent_backup
from labkit.backup.files import SECTOR, FilesReport, Layout, check_files, format_files, read_layout
from labkit.backup.host import DiskVM, HostBackup, cold_copy_backup, restore_image_backup, vadp_backup
from labkit.errors import ConfigError, FilesDamaged, StorageError
from labkit.storage import Datastore, open_image
from labkit.storage.image import DiskImage
from labkit.table import Table
from labkit.vmm.status import Origin

DAMAGES = ("delete", "corrupt", "truncate")
KINDS = ("agent", "vadp", "cold copy")
BASE = "base.raw"
SNAPSHOT = "vm-snapshot.qcow2"
WARM_UP_S = 0.1
"""How long the workload runs before the first backup (its writes are then in every backup)."""
DEFAULT_FILES = {"notes.txt": 3000, "thesis.tex": 90_000, "photo.jpg": 250_000, "ledger.csv": 40_000,
                 "mail.mbox": 130_000}


def sample_files(sizes: Mapping[str, int] = DEFAULT_FILES, seed: int = 9) -> dict[str, bytes]:
    """Files of the given sizes with reproducible pseudo-random bytes."""
    generator = random.Random(seed)
    return {name: generator.randbytes(size) for name, size in sizes.items()}


def damage_disk(path: str | os.PathLike[str], how: str) -> str:
    """Damage the image file at ``path``: ``"delete"`` it, ``"corrupt"`` it (one byte flipped in every
    4 KiB of its files' data, as bit rot or a bad write would), or ``"truncate"`` it in the middle of its
    files' data (a copy that stopped halfway). The disk holds an LKFS layout (its files' extent is read first).
    Returns what was done, in words."""
    path = os.fspath(path)
    if how not in DAMAGES:
        raise ConfigError(f"the damage is one of {', '.join(DAMAGES)}, not {how!r}")
    if how == "delete":
        os.unlink(path)
        return f"{os.path.basename(path)} deleted"
    image = open_image(path)
    try:
        layout = read_layout(image)
    finally:
        image.close()
    start, end = 9 * SECTOR, layout.scratch_first * SECTOR
    if how == "truncate":
        length, cut = os.path.getsize(path), (start + end) // 2 // SECTOR * SECTOR
        os.truncate(path, cut)
        return f"{os.path.basename(path)} cut from {length} to {cut} bytes, in the middle of its files' data"
    flipped = 0
    with open(path, "r+b") as handle:
        for offset in range(start, end, 4096):
            handle.seek(offset)
            byte = handle.read(1)
            handle.seek(offset)
            handle.write(bytes((byte[0] ^ 0xFF,)))
            flipped += 1
    return f"{flipped} bytes flipped in {os.path.basename(path)}'s file data"


def open_checked(path: str | os.PathLike[str]) -> DiskImage:
    """Open the image at ``path`` with its chain and check its files; a missing or damaged backing file is
    refused (:class:`StorageError`), and so are files that fail their checksums (:class:`FilesDamaged`)."""
    image = open_image(path)
    try:
        report = check_files(image)
        if not report.ok:
            raise FilesDamaged(f"{os.path.basename(os.fspath(path))}: {report.summary()}")
    except BaseException:
        image.close()
        raise
    return image


@dataclass(frozen=True)
class Restored:
    """One backup restored: the image's name, its files checked on the host, and the restored VM's agent
    run over it (its stream checked)."""

    kind: str
    image: str
    host_check: FilesReport
    vm_check: FilesReport


@dataclass(frozen=True)
class BackupLesson:
    """Everything :func:`run_backup_lesson` did and measured."""

    folder: str
    layout: Layout
    agent: AgentBackup
    vadp: HostBackup
    cold: HostBackup
    damage: str
    damage_done: str
    refusal: str
    """The error opening the snapshot's chain after the damage (type and message)."""
    restored: tuple[Restored, ...]
    writes: int
    """Writes the VM's guest saw acknowledged in all (before, during and after the backups)."""
    origin: Origin | None

    def backup(self, kind: str) -> AgentBackup | HostBackup:
        """The backup of ``kind`` (one of :data:`KINDS`)."""
        if kind == "agent":
            return self.agent
        if kind in ("vadp", "cold copy"):
            return self.vadp if kind == "vadp" else self.cold
        raise ConfigError(f"the backup kind is one of {', '.join(KINDS)}, not {kind!r}")


def run_backup_lesson(folder: str | os.PathLike[str], *, damage: str = "delete", backend: str = "auto",
                      disk_size: int = 8 << 20, writes: int = 1_000_000,
                      files: Mapping[str, bytes] | None = None) -> BackupLesson:
    """Steps 1-5 of the module's docstring in ``folder`` (created; it must be empty or missing)."""
    if damage not in DAMAGES:
        raise ConfigError(f"the damage is one of {', '.join(DAMAGES)}, not {damage!r}")
    folder = os.path.abspath(os.fspath(folder))
    if os.path.isdir(folder) and os.listdir(folder):
        raise ConfigError(f"{folder} is not empty: the lesson makes its own datastore and backups there")
    store = Datastore(os.path.join(folder, "datastore"), capacity=8 * disk_size)
    backups = os.path.join(folder, "backups")
    os.makedirs(backups)
    store.create_raw(BASE, disk_size)
    disk = store.open(BASE)
    try:
        layout = format_files(disk, sample_files() if files is None else files)
        disk.flush()
    finally:
        disk.close()

    agent = agent_backup(store.file(BASE), os.path.join(backups, "agent.lkfs"), backend=backend)
    vm = DiskVM(store, BASE, writes, backend=backend)
    try:
        vm.run_for(WARM_UP_S)  # the workload has written before the first backup
        vm.start()
        vadp = vadp_backup(vm, os.path.join(backups, "vadp.raw"))
        cold = cold_copy_backup(vm, os.path.join(backups, "cold.raw"))
        state = vm.stun()  # "take snapshot": the VM goes on writing into an overlay over the base
        store.create_overlay(SNAPSHOT, BASE)
        vm.resume(SNAPSHOT, state)
    finally:
        vm.close()

    done = damage_disk(store.file(BASE), damage)
    try:
        open_checked(store.file(SNAPSHOT)).close()
        refusal = ""
    except StorageError as error:
        refusal = f"{type(error).__name__}: {error}"
    if not refusal:
        raise StorageError(f"the snapshot still opened with good files after the base was damaged ({done})")

    restored = []
    for kind, backup in (("agent", agent), ("vadp", vadp), ("cold copy", cold)):
        name = f"restored-{kind.replace(' ', '-')}.raw"
        if isinstance(backup, AgentBackup):
            store.create_raw(name, backup.layout.disk_sectors * SECTOR)
            image = store.open(name)
            try:
                host_check = restore_agent_backup(backup.path, image)
            finally:
                image.close()
        else:
            host_check = restore_image_backup(backup, store, name)
        vm_check = agent_backup(store.file(name), os.path.join(backups, f"check-{name}.lkfs"),
                                backend=backend).report
        restored.append(Restored(kind, name, host_check, vm_check))
    return BackupLesson(folder, layout, agent, vadp, cold, damage, done, refusal, tuple(restored), vm.acknowledged,
                        agent.origin)


def lesson_table(lesson: BackupLesson) -> Table:
    """One row per backup kind: what it copied, how long the VM stood still, and whether its restore checks out."""
    rows = []
    for item in lesson.restored:
        backup = lesson.backup(item.kind)
        if isinstance(backup, AgentBackup):
            copied, stopped, during = backup.stream_bytes, "0 (the guest sends)", "-"
        else:
            copied, stopped = backup.bytes_copied, f"{backup.stopped_s * 1e3:.1f}"
            during = str(backup.writes_during_copy)
        rows.append([item.kind, f"{copied:,}", stopped, during, item.host_check.summary(), item.vm_check.summary()])
    where = f"{lesson.origin}" if lesson.origin is not None else "?"
    return Table(f"Restores after the base was damaged ({lesson.damage_done}); runs on {where}",
                 ["backup", "bytes copied", "VM stopped (ms)", "VM writes during the copy", "restored files (host)",
                  "restored VM's agent"], rows,
                 note=f"The snapshot's chain: {lesson.refusal}")


@dataclass(frozen=True)
class StopTimes:
    """For one disk size: a VADP backup and a cold copy of the same running VM's disk."""

    disk_bytes: int
    vadp: HostBackup
    cold: HostBackup


def stop_times(folder: str | os.PathLike[str], sizes: tuple[int, ...] = (16 << 20, 64 << 20, 128 << 20), *,
               backend: str = "auto", writes: int = 1_000_000) -> tuple[StopTimes, ...]:
    """How long each host-level backup stops a VM whose disk is each of ``sizes`` bytes (measured, in
    ``folder``: made empty; the backups are deleted after each size)."""
    folder = os.path.abspath(os.fspath(folder))
    if os.path.isdir(folder) and os.listdir(folder):
        raise ConfigError(f"{folder} is not empty: the measurement makes its own datastores there")
    found = []
    for size in sizes:
        store = Datastore(os.path.join(folder, f"disk-{size >> 20}MiB"), capacity=3 * size)
        store.create_raw(BASE, size)
        disk = store.open(BASE)
        try:
            format_files(disk, sample_files({"notes.txt": 3000, "data.bin": 60_000}))
        finally:
            disk.close()
        vm = DiskVM(store, BASE, writes, backend=backend)
        vm.run_for(WARM_UP_S)
        targets = [os.path.join(folder, f"{kind}-{size >> 20}MiB.raw") for kind in ("vadp", "cold")]
        try:
            vm.start()
            vadp = vadp_backup(vm, targets[0])
            cold = cold_copy_backup(vm, targets[1])
        finally:
            vm.close()
            for target in targets:
                if os.path.exists(target):
                    os.unlink(target)
        found.append(StopTimes(size, vadp, cold))
    return tuple(found)
