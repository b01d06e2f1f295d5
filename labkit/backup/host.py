"""Backups taken on the host: a consistent image backup as VMware's VADP takes it, and a cold copy of the files.

**VADP-style** (:func:`vadp_backup`), in the order vSphere's snapshot-based backup uses:

1. stun the VM (``Machine.pause``, its state saved with ``Machine.snapshot``), create a qcow2
   overlay over its disk, and let it run on from the same state with the overlay as its disk:
   from now on every write of the guest goes to the delta, and the disk below is frozen;
2. copy the frozen disk (the backup: a raw image of the disk as it was at the stun) while the
   VM runs and writes into the delta;
3. stun it again, commit the delta into the disk below (``qemu-img commit``), delete the delta,
   and let the VM run on from the same state on its own disk again.

The VM stops twice, briefly (the two stuns, measured); the copy's length does not stop it.
The backup holds exactly the writes the guest had seen acknowledged before the first stun.

**Cold copy** (:func:`cold_copy_backup`): the VM is stopped for the whole copy of its image
files, at the host file system's level, as a file-level backup of a datastore folder is.

The VM (:class:`DiskVM`) runs ``guests/backup64.S``'s workload: one-sector writes round the
scratch area of its LKFS disk, each acknowledged write counted in guest RAM, so a test
can say which writes must be in the backup, in the delta, and on the disk after the commit.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from labkit.backup.agent import ACKED_ADDRESS, COMMAND_WORK, GUEST, PARAMS_ADDRESS, agent_parameters
from labkit.backup.files import FilesReport, check_files
from labkit.errors import ConfigError, StorageError
from labkit.storage import Datastore, RawImage, open_image
from labkit.vmm.machine import Machine
from labkit.vmm.status import Origin, RunResult, StatusKind
from labkit.virtio.blk import block_devices

COPY_CHUNK = 1 << 20


class DiskVM:
    """A VM running ``backup64``'s workload (``writes`` writes) on image ``disk`` of ``store``.

    :meth:`start` runs it in a thread; :meth:`stun` pauses it, saves its state and closes it (its
    disk is free then); :meth:`resume` goes on from that state with another image of the chain as
    its disk; :meth:`finish` waits for the guest to end. :attr:`acknowledged` is the guest's count of
    writes it saw completed, read whenever the VM is stopped.
    """

    def __init__(self, store: Datastore, disk: str, writes: int, *, backend: str = "auto", timeout: float = 60.0):
        self.store = store
        self.disk = disk
        self.backend = backend
        self.timeout = timeout
        self.acknowledged = 0
        self.result: RunResult | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.machine: Machine | None = Machine(GUEST, backend, devices=self._devices(disk))
        self.machine.write_memory(PARAMS_ADDRESS, agent_parameters(COMMAND_WORK, writes))
        self.origin: Origin | None = None

    def _devices(self, disk: str) -> list[Any]:
        store = self.store

        def opener() -> Any:
            return store.open(disk)

        return block_devices(opener)

    def start(self) -> None:
        """Run the VM in a thread of its own (until it ends, is stunned, or its timeout passes)."""
        machine = self.machine
        if machine is None or self._thread is not None:
            raise ConfigError("this VM is not stopped, or it has ended")

        def run() -> None:
            try:
                self.result = machine.run(timeout=self.timeout)
            except BaseException as error:  # re-raised in the caller's thread by _join
                self._error = error

        self._thread = threading.Thread(target=run, name=f"vm on {self.disk}", daemon=True)
        self._thread.start()

    def run_for(self, seconds: float) -> RunResult:
        """Run the VM in this thread for ``seconds`` (its run's time budget), then leave it stopped where it is:
        a workload that has written before a backup starts. :meth:`start` continues it."""
        machine = self.machine
        if machine is None or self._thread is not None:
            raise ConfigError("this VM is not stopped, or it has ended")
        self.result = machine.run(timeout=seconds)
        self.acknowledged = int.from_bytes(machine.read_memory(ACKED_ADDRESS, 4), "little")
        self.origin = self.result.origin
        return self.result

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    @property
    def running(self) -> bool:
        """Whether the guest has not ended (it may be stopped between a stun and a resume)."""
        return self.result is None or self.result.status.kind in (StatusKind.PAUSED, StatusKind.TIMEOUT)

    def stun(self) -> Any:
        """Pause the VM, save its state (``Machine.snapshot``), close it; returns the state, or ``None`` when
        the guest had already ended (nothing to resume). Its disk images are closed afterwards."""
        machine = self.machine
        if machine is None:
            if not self.running:
                return None  # it ended before: it stays off, its disk is free
            raise ConfigError("this VM is stunned already")
        machine.pause()
        self._join()
        self.acknowledged = int.from_bytes(machine.read_memory(ACKED_ADDRESS, 4), "little")
        state = machine.snapshot() if self.running else None
        self.origin = self.result.origin if self.result is not None else self.origin
        machine.close()
        self.machine = None
        return state

    def resume(self, disk: str, state: Any) -> None:
        """Go on from ``state`` (what :meth:`stun` returned) with image ``disk`` as the VM's disk."""
        if self.machine is not None:
            raise ConfigError("this VM is running: stun it first")
        self.disk = disk
        if state is None:
            return  # the guest had ended: it stays off
        self.machine = Machine.from_snapshot(state, self.backend, devices=self._devices(disk))
        self.start()

    def finish(self) -> RunResult:
        """Wait until the guest ends (the VM stays open to be read); returns its last result."""
        if self.machine is None:
            if self.result is None:
                raise ConfigError("this VM never ran")
            return self.result
        self._join()
        self.acknowledged = int.from_bytes(self.machine.read_memory(ACKED_ADDRESS, 4), "little")
        if self.result is None:
            raise ConfigError("this VM was not started")
        self.origin = self.result.origin
        return self.result

    def close(self) -> None:
        """Stop the VM where it is (its acknowledged writes counted) and close it."""
        if self.machine is not None:
            self.machine.pause()
            self._join()
            self.acknowledged = int.from_bytes(self.machine.read_memory(ACKED_ADDRESS, 4), "little")
            self.machine.close()
            self.machine = None


@dataclass(frozen=True)
class HostBackup:
    """A host-level backup: ``kind`` (``"vadp"`` or ``"cold copy"``), the raw image file ``path`` holding the
    disk at the backup's moment, and what it cost the VM."""

    kind: str
    path: str
    bytes_copied: int
    stuns_s: tuple[float, ...]
    """How long the VM stood still, each time it was stopped (VADP: the snapshot and the commit)."""
    copy_s: float
    writes_in_backup: int
    """Writes the guest saw acknowledged before its disk was frozen: all of them, and no later one, are in it."""
    writes_during_copy: int
    """Writes the guest saw acknowledged while the copy ran (VADP: they went into the delta)."""
    delta_bytes: int
    """The delta's file size when it was committed (0 for a cold copy)."""
    report: FilesReport
    origin: Origin | None

    @property
    def stopped_s(self) -> float:
        return sum(self.stuns_s)


def copy_image(path: str, target: str) -> int:
    """Copy the virtual disk of image ``path`` (read through its chain) into a new raw file ``target``."""
    source = open_image(path)
    try:
        RawImage.create(target, source.size).close()
        copy = RawImage.open(target, writable=True)
        try:
            for start in range(0, source.size, COPY_CHUNK):
                copy.write(start, source.read(start, min(COPY_CHUNK, source.size - start)))
            copy.flush()
        finally:
            copy.close()
        return source.size
    finally:
        source.close()


def _check(path: str) -> FilesReport:
    image = open_image(path)
    try:
        return check_files(image)
    finally:
        image.close()


def _free_target(target: str) -> None:
    if os.path.exists(target):
        raise ConfigError(f"{target} exists: a backup goes into a new file")
    if not os.path.isdir(os.path.dirname(os.path.abspath(target))):
        raise ConfigError(f"{target}: its folder does not exist")


def vadp_backup(vm: DiskVM, target: str | os.PathLike[str]) -> HostBackup:
    """Back up ``vm``'s disk into the raw file ``target`` while it runs on a delta (see the module's steps).

    If the copy fails, the delta is still committed and deleted and the VM goes on on its own disk (as a backup
    application deletes its snapshot after a failed job); then the error is raised."""
    target = os.fspath(target)
    _free_target(target)
    store, disk = vm.store, vm.disk
    delta = f"{disk}.backup-delta.qcow2"
    if os.path.exists(store.file(delta)):
        raise StorageError(f"{store.file(delta)} exists: an earlier backup did not finish (commit or delete it)")
    started = time.perf_counter()
    state = vm.stun()
    frozen_writes = vm.acknowledged
    try:
        store.create_overlay(delta, disk)
    except BaseException:
        vm.resume(disk, state)
        raise
    vm.resume(delta, state)
    first_stun = time.perf_counter() - started
    started = time.perf_counter()
    try:
        copied = copy_image(store.file(disk), target)
    finally:
        copy_s = time.perf_counter() - started
        started = time.perf_counter()
        state = vm.stun()
        during = vm.acknowledged - frozen_writes
        delta_bytes = os.path.getsize(store.file(delta))
        store.commit(delta)
        store.delete(delta)
        vm.resume(disk, state)
        second_stun = time.perf_counter() - started
    return HostBackup("vadp", target, copied, (first_stun, second_stun), copy_s, frozen_writes, during,
                      delta_bytes, _check(target), vm.origin)


def cold_copy_backup(vm: DiskVM, target: str | os.PathLike[str]) -> HostBackup:
    """Stop ``vm`` for the whole copy of its disk into the raw file ``target`` (the host file system's backup);
    the VM goes on afterwards, also when the copy failed."""
    target = os.fspath(target)
    _free_target(target)
    started = time.perf_counter()
    state = vm.stun()
    frozen_writes = vm.acknowledged
    copy_started = time.perf_counter()
    try:
        copied = copy_image(vm.store.file(vm.disk), target)
    finally:
        copy_s = time.perf_counter() - copy_started
        vm.resume(vm.disk, state)
    stopped = time.perf_counter() - started
    return HostBackup("cold copy", target, copied, (stopped,), copy_s, frozen_writes, 0, 0, _check(target),
                      vm.origin)


def restore_image_backup(backup: HostBackup, store: Datastore, name: str) -> FilesReport:
    """Copy the backup's image into ``store`` as raw image ``name`` (it must not exist); returns its files' check."""
    if os.path.exists(store.file(name)):
        raise ConfigError(f"{store.file(name)} exists: restore into a new image name")
    source = RawImage.open(backup.path)
    try:
        store.create_raw(name, source.size)
        restored = store.open(name)
        try:
            for start in range(0, source.size, COPY_CHUNK):
                restored.write(start, source.read(start, min(COPY_CHUNK, source.size - start)))
            restored.flush()
            return check_files(restored)
        finally:
            restored.close()
    finally:
        source.close()
