"""A backup by an agent in the guest: ``guests/backup64.S`` sends its disk's files over a paravirtual channel.

The channel is a virtio console (virtio 1.x, 5.3) whose host end is a file, as QEMU's
``-device virtserialport -chardev file,...`` is: :class:`ChannelFile` writes every chain the
guest puts on the transmit queue to the file, in order. The agent reads its disk through
virtio-blk (opened read-only here: VIRTIO_BLK_F_RO, a write would get IOERR) and hands each
piece to the console; the guest only posts descriptors, the two devices move the bytes. The
stream is the LKFS metadata (superblock and directory) followed by every file's bytes in
directory order (:func:`labkit.backup.files.parse_stream`), and it is the backup: its
directory holds every file's SHA-256, so the backup is checked when it is taken and again
before a restore (:func:`restore_agent_backup`).
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable

from labkit.backup.files import METADATA_BYTES, FilesReport, Layout, parse_stream, restore_files
from labkit.errors import ConfigError, FilesDamaged, StorageError
from labkit.memory import GuestMemory
from labkit.vmm.devices.spec import DeviceContext, DeviceSpec
from labkit.vmm.machine import Machine
from labkit.vmm.status import Origin, StatusKind
from labkit.virtio import transport as t
from labkit.virtio.blk import block_devices
from labkit.virtio.console import NOTIFY_NAME, VirtioConsole
from labkit.virtio.transport import NotifyPort
from labkit.x86 import layout

GUEST = "backup64"
PARAMS_ADDRESS = 0x80000
PARAMS_MAGIC = 0x47414B42  # "BKAG"
ACKED_ADDRESS = 0x80010
"""Where ``backup64``'s workload counts its acknowledged writes."""
COMMAND_BACKUP, COMMAND_WORK = 1, 2
CHANNEL_NAME = "backup-channel"
EXIT_MEANINGS = {1: "bad parameters", 2: "no usable virtio-blk or virtio console", 3: "a device needs a reset",
                 4: "a disk request failed", 6: "the disk's LKFS superblock or directory is bad"}


class ChannelFile(VirtioConsole):
    """A virtio console whose host end is the file ``path`` (created empty; every transmitted byte appended).

    The guest decides how much it sends: past ``limit`` bytes nothing more is written (the host's disk is not the
    guest's to fill) and ``dropped`` counts what was refused; the chains still come back used.
    """

    KIND = "virtio console to a file"
    COUNTERS: tuple[str, ...] = (*VirtioConsole.COUNTERS, "dropped")
    dropped: int

    def __init__(self, memory: GuestMemory, path: str, limit: int):
        self.path = path
        self.limit = limit
        self._written = 0
        try:
            self._file = open(path, "wb")
        except OSError as error:
            raise StorageError(f"{path}: cannot create the channel's file: {error.strerror}") from None
        super().__init__(memory, self._append)

    def _append(self, data: bytes | memoryview) -> None:
        room = max(0, self.limit - self._written)
        if len(data) > room:
            self.dropped += len(data) - room
            data = data[:room]
        self._file.write(data)
        self._file.flush()
        self._written += len(data)

    def close(self) -> None:
        self._file.close()


def channel_devices(path: str | os.PathLike[str], limit: int) -> list[DeviceSpec]:
    """The paravirtual channel for ``Machine(devices=...)``: a virtio console at the usual console address
    and notify port, whose transmitted bytes (at most ``limit``) go to the file ``path`` (opened where the
    machine's core runs)."""
    target = os.path.abspath(os.fspath(path))
    if not isinstance(limit, int) or limit < 0:
        raise ConfigError(f"the channel's limit is a number of bytes, not {limit!r}")

    def build(context: DeviceContext) -> ChannelFile:
        return ChannelFile(context.memory, target, limit)

    def build_port(context: DeviceContext) -> NotifyPort:
        return NotifyPort(context.device(CHANNEL_NAME))

    return [DeviceSpec(CHANNEL_NAME, "mmio", layout.VIRTIO_MMIO_BASE, t.MMIO_SIZE, build),
            DeviceSpec(NOTIFY_NAME, "pio", layout.VIRTIO_NOTIFY_PORT, 2, build_port)]


def agent_parameters(command: int, count: int = 0) -> bytes:
    """``backup64``'s parameter block: the command (1 backup, 2 work) and the number of writes."""
    if command not in (COMMAND_BACKUP, COMMAND_WORK) or not 0 <= count < 1 << 32 or \
            (command == COMMAND_WORK and count == 0):
        raise ConfigError(f"backup64 takes command 1 (backup) or 2 (work, at least one write), not {command}, {count}")
    return struct.pack("<4I", PARAMS_MAGIC, command, count, 0)


@dataclass(frozen=True)
class AgentBackup:
    """An agent backup: the stream file ``path``, its ``layout``, the check of its files, and what the run did."""

    path: str
    layout: Layout
    report: FilesReport
    stream_bytes: int
    chains: int
    """Chains the guest put on the console's transmit queue (one per piece of at most 64 KiB)."""
    disk_reads: int
    elapsed_s: float
    origin: Origin | None


def agent_backup(disk: str | os.PathLike[str] | Callable[[], Any], target: str | os.PathLike[str], *,
                 backend: str = "auto", timeout: float = 30.0) -> AgentBackup:
    """Boot ``backup64`` on ``disk`` (an image path, opened read-only, or an opener) and take its files into ``target``.

    Raises :class:`StorageError` naming the agent's exit when it could not send (a disk without an LKFS
    layout, ...) and :class:`FilesDamaged` when what arrived does not check out; ``target`` then holds what
    arrived, for a look.
    """
    from labkit.storage import open_image

    opener = disk if callable(disk) else _read_only(os.fspath(disk), open_image)
    target = os.fspath(target)
    probe = opener()
    try:
        limit = METADATA_BYTES + probe.size  # an agent sends the metadata and files that fit on its disk
    finally:
        probe.close()
    with Machine(GUEST, backend, devices=[*block_devices(opener), *channel_devices(target, limit)]) as machine:
        machine.write_memory(PARAMS_ADDRESS, agent_parameters(COMMAND_BACKUP))
        started = time.perf_counter()
        result = machine.run(timeout=timeout)
        elapsed = time.perf_counter() - started
        channel = machine.device_state(CHANNEL_NAME)
        blk = machine.device_state("virtio-blk")
    if result.status.kind is not StatusKind.EXITED or result.status.code != 0:
        why = EXIT_MEANINGS.get(result.status.code or 0, str(result.status)) \
            if result.status.kind is StatusKind.EXITED else str(result.status)
        raise StorageError(f"the backup agent did not finish on {os.fspath(disk) if not callable(disk) else 'the disk'}: "
                           f"{why}")
    if channel["dropped"]:
        raise StorageError(f"the backup agent sent more than its disk holds ({limit} bytes kept, "
                           f"{channel['dropped']} refused): not a backup")
    with open(target, "rb") as handle:
        stream = handle.read()
    layout_, _files, report = parse_stream(stream)
    report.require()
    return AgentBackup(target, layout_, report, len(stream), int(channel["chains"]), int(blk["reads"]), elapsed,
                       result.origin)


def _read_only(path: str, open_image: Callable[..., Any]) -> Callable[[], Any]:
    def opener() -> Any:
        return open_image(path)
    return opener


def restore_agent_backup(backup: str | os.PathLike[str], disk: Any) -> FilesReport:
    """Write the files of the agent backup file ``backup`` onto ``disk`` (an open, writable image) where its
    layout puts them; returns the check of the files read back from ``disk``. A backup whose own files do not
    check out is refused (:class:`FilesDamaged`) before anything is written."""
    from labkit.backup.files import check_files

    try:
        with open(backup, "rb") as handle:
            stream = handle.read()
    except OSError as error:
        raise StorageError(f"{backup}: cannot read the backup: {error.strerror}") from None
    layout_, files, report = parse_stream(stream)
    if not report.ok:
        raise FilesDamaged(f"{backup}: the backup itself is damaged: {report.summary()}")
    restore_files(disk, layout_, files)
    disk.flush()
    return check_files(disk)
