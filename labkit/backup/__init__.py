"""Backups, and why a snapshot is not one (notebook 09, "Backups")::

    from labkit.backup import run_backup_lesson
    lesson = run_backup_lesson("/tmp/lesson", damage="corrupt")   # three backups, a damaged base, three restores
    lesson.refusal            # why the snapshot's overlay chain is useless now
    [r.host_check.ok and r.vm_check.ok for r in lesson.restored]

- :mod:`labkit.backup.files`: LKFS, the tiny on-disk file layout with a SHA-256 per file;
- :mod:`labkit.backup.agent`: the in-guest agent (``guests/backup64.S``) sending its files over a virtio console;
- :mod:`labkit.backup.host`: VADP-style (snapshot, copy the frozen disk while the VM runs, commit) and a cold copy;
- :mod:`labkit.backup.lesson`: damage the base under a snapshot, restore from each kind, check the files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from labkit._lazy import lazy_exports

_EXPORTS = {
    "FilesReport": "labkit.backup.files",
    "Layout": "labkit.backup.files",
    "check_files": "labkit.backup.files",
    "format_files": "labkit.backup.files",
    "read_files": "labkit.backup.files",
    "AgentBackup": "labkit.backup.agent",
    "agent_backup": "labkit.backup.agent",
    "channel_devices": "labkit.backup.agent",
    "restore_agent_backup": "labkit.backup.agent",
    "DiskVM": "labkit.backup.host",
    "HostBackup": "labkit.backup.host",
    "cold_copy_backup": "labkit.backup.host",
    "restore_image_backup": "labkit.backup.host",
    "vadp_backup": "labkit.backup.host",
    "BackupLesson": "labkit.backup.lesson",
    "damage_disk": "labkit.backup.lesson",
    "open_checked": "labkit.backup.lesson",
    "run_backup_lesson": "labkit.backup.lesson",
    "stop_times": "labkit.backup.lesson",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

if TYPE_CHECKING:  # pragma: no cover
    from labkit.backup.agent import AgentBackup, agent_backup, channel_devices, restore_agent_backup
    from labkit.backup.files import FilesReport, Layout, check_files, format_files, read_files
    from labkit.backup.host import DiskVM, HostBackup, cold_copy_backup, restore_image_backup, vadp_backup
    from labkit.backup.lesson import BackupLesson, damage_disk, open_checked, run_backup_lesson, stop_times
