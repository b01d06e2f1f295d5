"""Notebook 09, "Backups": damage the base disk under a snapshot (delete, corrupt, truncate), then restore."""

from __future__ import annotations

import shutil
import tempfile
import weakref
from typing import Any

from labkit.widgets.experiment import Experiment, backend_picker, backends_here, dropdown, note

DAMAGE_LABELS = {"delete": "delete the base disk", "corrupt": "flip bytes in the base's files",
                 "truncate": "cut the base short"}


class BackupRestore(Experiment):
    """The whole backup lesson (:func:`labkit.backup.lesson.run_backup_lesson`) with the chosen damage on the
    chosen backend: what the snapshot's chain says, then a table of the three backups and their restores."""

    slots = 2

    def __init__(self, damage: str = "delete", backend: str | None = None) -> None:
        from labkit.backend import choose_backend

        backends, self.skipped = backends_here()
        self.damage = dropdown("damage", [(label, name) for name, label in DAMAGE_LABELS.items()], damage)
        self.backend = backend_picker(backends, backend or choose_backend().name)
        self._cleanup: weakref.finalize | None = None
        self.last: Any = None
        """The last :class:`labkit.backup.lesson.BackupLesson`."""
        super().__init__([self.damage, self.backend], title="Lose the base, then restore:")

    def results(self) -> list[Any]:
        from labkit.backup.lesson import lesson_table, run_backup_lesson

        self.clean()
        folder = tempfile.mkdtemp(prefix="labkit-backups-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, folder, True)  # also when the kernel ends
        lesson = run_backup_lesson(folder, damage=self.damage.value, backend=self.backend.value)
        self.last = lesson
        good = sum(item.host_check.ok and item.vm_check.ok for item in lesson.restored)
        return [note(f"After '{lesson.damage_done}', opening the snapshot fails: {lesson.refusal} "
                     f"{good} of {len(lesson.restored)} backups restore to files that check out."),
                lesson_table(lesson)]

    def clean(self) -> None:
        """Delete the last run's datastore and backups."""
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup = None
