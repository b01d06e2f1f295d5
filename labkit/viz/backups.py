"""Notebook 09's backup figure: how long each host-level backup stops the VM, and what each kind copies.

    >>> from labkit.backup.lesson import run_backup_lesson, stop_times
    >>> from labkit.viz.backups import backup_figure
    >>> backup_figure(run_backup_lesson("/tmp/lesson"), stop_times("/tmp/stops"))

The left panel is measured on running VMs (``labkit.backup.lesson.stop_times``): a VADP-style
backup stops the VM twice, for a snapshot and for the commit, whatever the disk's size; a cold copy
stops it for the whole copy. The right panel: bytes each kind of backup copied in the lesson's run
(the agent copies the files only). The title says what measured it, from the runs' own origin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from labkit.errors import ConfigError
from labkit.viz.labels import measured_on
from labkit.viz.style import finish, new_figure, readable_fonts

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from labkit.backup.lesson import BackupLesson, StopTimes
    from labkit.vmm.status import Origin

MIB = 1 << 20
COLOURS = {"agent": "#4c72b0", "vadp": "#55a868", "cold copy": "#c44e52"}


def origin_label(origin: Origin | None) -> str:
    """``measured on KVM (kvm_pvm)`` or on the emulator, from a run's origin."""
    if origin is None:
        raise ConfigError("a backup figure needs runs that say where they ran (an origin)")
    return measured_on(origin.backend, origin.flavour)


def backup_figure(lesson: BackupLesson, stops: Sequence[StopTimes]) -> Figure:
    """Left: VM stopped (ms) against disk size for VADP and a cold copy; right: bytes copied per backup kind."""
    if not stops:
        raise ConfigError("the backup figure needs at least one stop_times measurement")
    with readable_fonts():
        figure = new_figure(7.5, 3.8)
        left, right = figure.subplots(1, 2)
        sizes = [stop.disk_bytes / MIB for stop in stops]
        for kind, pick in (("vadp", lambda s: s.vadp), ("cold copy", lambda s: s.cold)):
            stopped = [pick(stop).stopped_s * 1e3 for stop in stops]
            left.plot(sizes, stopped, marker="o", color=COLOURS[kind],
                      label="VADP (2 stuns)" if kind == "vadp" else "cold copy")
        left.set_xlabel("disk size (MiB)")
        left.set_ylabel("VM stopped (ms)")
        left.set_ylim(bottom=0)
        left.set_title("VM stopped per backup")
        left.legend(loc="upper left")
        kinds = ["agent", "vadp", "cold copy"]
        copied = [lesson.agent.stream_bytes / MIB, lesson.vadp.bytes_copied / MIB, lesson.cold.bytes_copied / MIB]
        right.bar(range(3), copied, color=[COLOURS[k] for k in kinds], width=0.6)
        right.set_xticks(range(3), ["agent\n(files)", "VADP\n(disk)", "cold\n(disk)"])
        right.set_ylabel("copied (MiB)")
        right.set_title(f"Copied from a {lesson.layout.disk_sectors * 512 // MIB} MiB disk")
        for axis in (left, right):
            finish(axis)
        origins = sorted({origin_label(stop.vadp.origin) for stop in stops} | {origin_label(lesson.origin)})
        figure.suptitle("Backups of a running VM\n" + "; ".join(origins), fontsize=12)
    return figure
