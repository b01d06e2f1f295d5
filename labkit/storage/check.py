"""``labkit disk check``: the consistency check of ``qemu-img check``, with its exit codes.

:func:`check_image` runs :func:`labkit.storage.qcow2.scan` over one qcow2 file (not its backing
chain) and counts what it finds the way ``qemu-img check`` does: a cluster referenced more often
than its refcount says, a COPIED flag that disagrees with the refcount, a table entry with
reserved bits, an offset that is not aligned or lies past the end of the file, or a header that
cannot be parsed at all, is a *corruption*; a refcount higher than the references is a *leak*.

Exit codes (``qemu-img check``'s): 0 clean, 1 the check could not be completed (no such file, a
feature labkit does not implement), 2 corruptions, 3 leaked clusters only. ``repair=True``
(``-r leaks``) lowers leaked refcounts to the references counted; leaked clusters at the end of
the file are then trimmed. A raw image has no metadata: it is always clean.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from labkit.errors import ImageFormatError, StorageError, UnsupportedImage
from labkit.storage.chain import probe_format
from labkit.storage.hostfile import ImageFile
from labkit.storage.qcow2 import Qcow2Image, read_header, scan

EXIT_CLEAN, EXIT_INCOMPLETE, EXIT_CORRUPT, EXIT_LEAKS = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class CheckReport:
    """The result of checking one image file."""

    filename: str
    format: str
    corruptions: tuple[str, ...] = ()
    leaks: tuple[str, ...] = ()
    error: str | None = None          # why the check could not be completed
    allocated_clusters: int = 0
    total_clusters: int = 0
    fragmented_clusters: int = 0
    image_end_offset: int = 0
    leaks_fixed: int = 0

    @property
    def exit_code(self) -> int:
        if self.error is not None:
            return EXIT_INCOMPLETE
        if self.corruptions:
            return EXIT_CORRUPT
        return EXIT_LEAKS if self.leaks else EXIT_CLEAN

    def as_json(self) -> dict[str, Any]:
        """The keys of ``qemu-img check --output json`` that apply."""
        report: dict[str, Any] = {"filename": self.filename, "format": self.format,
                                  "check-errors": 1 if self.error else 0}
        if self.format == "qcow2" and self.error is None:
            report.update({"image-end-offset": self.image_end_offset, "total-clusters": self.total_clusters,
                           "allocated-clusters": self.allocated_clusters})
            if self.fragmented_clusters:
                report["fragmented-clusters"] = self.fragmented_clusters
        if self.corruptions:
            report["corruptions"] = len(self.corruptions)
        if self.leaks:
            report["leaks"] = len(self.leaks)
        if self.leaks_fixed:
            report["leaks-fixed"] = self.leaks_fixed
        return report


def check_image(path: str | os.PathLike[str], repair: bool = False, format: str | None = None) -> CheckReport:
    """Check one image file (``qemu-img check``); ``repair`` fixes leaked refcounts (``-r leaks``).

    ``format`` is probed unless given (``-f qcow2``): a qcow2 file whose magic is damaged probes as raw,
    as with ``qemu-img``, so give the format where it is known. A check takes no lock: an image being
    written while it is checked may show leaks (a repair takes the writer's lock).
    """
    path = os.fspath(path)
    try:
        kind = format or probe_format(path)
    except StorageError as error:
        return CheckReport(path, "unknown", error=str(error))
    if kind == "raw":
        return CheckReport(path, "raw")
    try:
        file = ImageFile(path, writable=repair, lock=repair)  # a check only reads: no lock (qemu-img check -U)
    except StorageError as error:
        return CheckReport(path, kind, error=str(error))
    try:
        try:
            header = read_header(file)
            result = scan(file, header)
        except UnsupportedImage as error:
            return CheckReport(path, kind, error=str(error))
        except ImageFormatError as error:
            return CheckReport(path, kind, corruptions=(str(error),))
        cs = header.cluster_size
        leaks = tuple(f"leaked cluster {c} refcount={result.refcounts[c]} reference={result.references[c]}"
                      for c in result.leaks)
        leaks += tuple(f"refcount of cluster {c}, past the end of the file, is not 0" for c in result.leaks_past_end)
        fixed = 0
        if repair and leaks and not result.corruptions:
            file.close()
            image = Qcow2Image.open(path, writable=True)
            fixed = image.repair_leaks()
            image.close()
            return dataclasses.replace(check_image(path, format=kind), leaks_fixed=fixed)
        used = [c for c in range(len(result.refcounts)) if result.refcounts[c] or result.references[c]]
        end = max(((used[-1] + 1) * cs if used else 0), min(file.length, header.l1_table_offset + 8 * header.l1_size))
        return CheckReport(path, kind, corruptions=tuple(result.corruptions), leaks=leaks,
                           allocated_clusters=result.allocated_data, total_clusters=-(-header.size // cs),
                           fragmented_clusters=result.fragmented_data, image_end_offset=end)
    finally:
        file.close()
