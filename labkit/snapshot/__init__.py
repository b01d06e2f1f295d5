"""Snapshots: a stopped VM's whole state, kept in memory or in a checked, atomically written file.

    >>> from labkit import Machine, Snapshot
    >>> machine = Machine("timer64")
    >>> first = machine.snapshot()               # a full snapshot (starts counting written pages)
    >>> machine.run(timeout=0.05)                # doctest: +SKIP
    >>> second = machine.snapshot(parent=first)  # a diff: only the pages written since ``first``
    >>> second.save("b.snap"); first.save("a.snap")
    >>> again = Machine.from_snapshot(Snapshot.load("b.snap", parent=Snapshot.load("a.snap")), backend="emu")

:class:`Snapshot` holds a :class:`~labkit.snapshot.state.MachineState` (what is saved and why:
:mod:`labkit.snapshot.state`); the file layout is in :mod:`labkit.snapshot.file`.  A snapshot taken of a
machine keeps its memory in sealed memfds (:mod:`labkit.snapshot.image`: only pages that hold data are
copied, and a restore on KVM maps them copy-on-write); one loaded from a file holds ``bytes``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from labkit.errors import SnapshotError
from labkit.snapshot.file import NO_PARENT, SnapshotFile, SnapshotKind, new_snapshot_id, write_snapshot_file
from labkit.snapshot.state import PAGE, MachineState, PageDiff, page_diff, state_from_sections, state_sections

if TYPE_CHECKING:
    from labkit.guest import Guest

__all__ = ["Snapshot", "SnapshotSize"]


@dataclass(frozen=True)
class SnapshotSize:
    """How much a snapshot holds: pages of memory in it, and the bytes its file takes."""

    pages: int
    memory_bytes: int
    file_bytes: int


class Snapshot:
    """A VM's state at one moment: full, or a diff (the pages written since its ``parent``).

    Made by :meth:`labkit.Machine.snapshot` or :meth:`load`; resumed with
    :meth:`labkit.Machine.from_snapshot`.  A diff keeps a reference to its parent and
    builds its whole state only when asked (:attr:`state`).
    """

    def __init__(self, state: MachineState, *, snapshot_id: bytes | None = None, parent: Snapshot | None = None,
                 diff: PageDiff | None = None):
        if (parent is None) != (diff is None):
            raise SnapshotError("a diff snapshot has both a parent and its pages; a full one has neither")
        if parent is None and not state.has_memory:
            raise SnapshotError("a full snapshot's state must hold every memory region's bytes")
        self.id = snapshot_id if snapshot_id is not None else new_snapshot_id()
        self.parent = parent
        self.diff = diff
        self._partial = state
        self._whole: MachineState | None = state if parent is None else None

    @property
    def is_diff(self) -> bool:
        return self.parent is not None

    @property
    def captured(self) -> MachineState:
        """The state as taken: whole for a full snapshot; without memory for a diff (its pages are :attr:`diff`)."""
        return self._partial

    @property
    def state(self) -> MachineState:
        """The whole state (a diff's pages written over its parent's memory, built once)."""
        if self._whole is None and self.parent is not None and self.diff is not None:
            self._whole = self._partial.with_pages(self.diff, self.parent.state)
        if self._whole is None:
            raise SnapshotError("this snapshot has no state")  # not reached: __init__ checks parent and diff
        return self._whole

    def guest(self) -> Guest:
        """The :class:`labkit.Guest` this snapshot was taken of (rebuilt from the snapshot's own copy)."""
        from labkit.guest import Guest

        image = self._partial.guest
        return Guest(image.name, image.code, image.mode, image.load_address, image.entry, image.user)

    def size(self) -> SnapshotSize:
        """Pages and bytes of memory this snapshot itself holds, and the size of its file's sections."""
        sections = state_sections(self._partial if self.is_diff else self.state, self.diff)
        pages = len(self.diff.pages) if self.diff is not None else sum(r.size for r in self.state.regions) // PAGE
        return SnapshotSize(pages=pages, memory_bytes=pages * PAGE,
                            file_bytes=sum(len(data) for data in sections.values()))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write this snapshot to ``path`` atomically (a diff writes only its pages and names its parent's id)."""
        if self.parent is not None:
            write_snapshot_file(path, state_sections(self._partial, self.diff), kind=SnapshotKind.DIFF,
                                snapshot_id=self.id, parent_id=self.parent.id)
        else:
            write_snapshot_file(path, state_sections(self.state), snapshot_id=self.id, parent_id=NO_PARENT)

    @classmethod
    def load(cls, path: str | os.PathLike[str], parent: Snapshot | None = None) -> Snapshot:
        """Read and check a snapshot file; a diff needs its ``parent`` (the snapshot whose id it names).

        Every checksum is verified before anything is built, so a bad file changes nothing.
        """
        with SnapshotFile(path) as file:
            file.verify()
            header = file.header
            if header.is_diff:
                if parent is None:
                    raise SnapshotError(f"{path} is a diff snapshot: load its parent ({header.parent_id.hex()}) "
                                        "first and pass it as parent=")
                if parent.id != header.parent_id:
                    raise SnapshotError(f"{path} is a diff of snapshot {header.parent_id.hex()}, "
                                        f"not of {parent.id.hex()} (mismatched parent)")
                whole = state_from_sections(file.section, parent.state)
                diff = page_diff(bytes(file.section("pages")), file.section("page-data"))
                snapshot = cls(whole.without_memory(), snapshot_id=header.snapshot_id, parent=parent, diff=diff)
                snapshot._whole = whole
                return snapshot
            if parent is not None:
                raise SnapshotError(f"{path} is a full snapshot; it has no parent")
            return cls(state_from_sections(file.section), snapshot_id=header.snapshot_id)

    def __repr__(self) -> str:
        state = self._partial
        kind = f"diff of {self.parent.id.hex()[:8]}, {len(self.diff.pages)} pages" if self.diff and self.parent \
            else "full"
        return f"<Snapshot {self.id.hex()[:8]} of {state.guest.name!r} ({kind}), taken on {state.taken_on['backend']}>"
