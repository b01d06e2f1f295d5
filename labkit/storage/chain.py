"""Backing chains: open an image with everything below it, commit an overlay into its parent, describe a chain.

A qcow2 overlay names its backing file in its header ("Header": ``backing_file_offset``) and the
backing file's format in a header extension ("Header extensions": backing file format name). A
relative name is relative to the overlay's own folder, as in QEMU. :func:`open_image` opens the
whole chain (the backing images read-only), refusing loops and chains deeper than
:data:`MAX_CHAIN`. :func:`commit` copies an overlay's clusters into its parent and then empties
the overlay (``qemu-img commit``): a crash during the copy leaves both images valid, the overlay
still holding everything; the emptying is ordered like a discard (leaks at worst).
"""

from __future__ import annotations

import os
from typing import Any

from labkit.errors import ConfigError, ImageFormatError, StorageError
from labkit.storage import qcow2_format as fmt
from labkit.storage.hostfile import ImageFile, Space
from labkit.storage.image import DiskImage
from labkit.storage.qcow2 import Qcow2Image, read_header
from labkit.storage.raw import RawImage

MAX_CHAIN = 64
COMMIT_CHUNK = 1 << 20


def probe_format(path: str | os.PathLike[str]) -> str:
    """``"qcow2"`` if the file starts with qcow2's magic, else ``"raw"`` (what ``qemu-img info`` would say)."""
    try:
        with open(path, "rb") as handle:
            return "qcow2" if handle.read(4) == fmt.MAGIC else "raw"
    except OSError as error:
        raise StorageError(f"{path}: cannot open: {error.strerror}") from None


def backing_path(image_path: str, backing_file: str) -> str:
    """Where a backing file name stored in ``image_path`` points (relative to that image's folder)."""
    if os.path.isabs(backing_file):
        return backing_file
    return os.path.join(os.path.dirname(os.path.abspath(image_path)), backing_file)


def open_image(path: str | os.PathLike[str], writable: bool = False, space: Space | None = None,
               format: str | None = None, barriers: bool = True) -> DiskImage:
    """Open an image and its backing chain (backing images read-only); the format is probed unless given."""
    return _open(os.fspath(path), writable, space, format, barriers, [])


def _open(path: str, writable: bool, space: Space | None, format: str | None, barriers: bool,
          seen: list[str]) -> DiskImage:
    real = os.path.realpath(path)
    if real in seen:
        raise ImageFormatError(f"{path}: the backing chain loops back to it ({' -> '.join(seen + [real])})")
    if len(seen) >= MAX_CHAIN:
        raise ImageFormatError(f"{seen[0]}: the backing chain is deeper than {MAX_CHAIN} images")
    kind = format or probe_format(path)
    if kind == "raw":  # given, or probed (a backing file without a format extension is probed, as in QEMU)
        return RawImage.open(path, writable=writable, space=space)
    if kind != "qcow2":
        raise ConfigError(f"format {kind!r}: labkit reads raw and qcow2")
    file = ImageFile(path, lock=False)  # a look at the header for the backing file; the image opens below
    try:
        header = read_header(file)
    finally:
        file.close()
    backing: DiskImage | None = None
    if header.backing_file is not None:
        below = backing_path(path, header.backing_file)
        if not os.path.exists(below):
            raise StorageError(f"{path}: its backing file {header.backing_file!r} ({below}) does not exist: "
                               "without it the overlay is useless (a snapshot is not a backup)")
        backing = _open(below, False, space, header.backing_format, barriers, seen + [real])
    try:
        return Qcow2Image.open(path, writable=writable, space=space, backing=backing, barriers=barriers)
    except BaseException:
        if backing is not None:
            backing.close()
        raise


def create_overlay(path: str | os.PathLike[str], backing: str | os.PathLike[str], *,
                   cluster_size: int = 1 << fmt.DEFAULT_CLUSTER_BITS, size: int | None = None,
                   space: Space | None = None, relative: bool = True) -> None:
    """A new qcow2 overlay over ``backing`` (``qemu-img create -f qcow2 -b BACKING -F FORMAT``).

    The backing file's name is stored relative to the overlay's folder when ``relative`` (so a
    folder of images can be moved), else absolute. ``size`` defaults to the backing image's.
    """
    path, backing = os.fspath(path), os.fspath(backing)
    if not os.path.exists(backing):
        raise ConfigError(f"backing file {backing} does not exist")
    below_format = probe_format(backing)
    if size is None:
        below = open_image(backing)
        size = below.size
        below.close()
    name = os.path.relpath(os.path.abspath(backing), os.path.dirname(os.path.abspath(path))) if relative \
        else os.path.abspath(backing)
    Qcow2Image.create(path, size, cluster_size=cluster_size, backing_file=name, backing_format=below_format,
                      space=space)


def chain_of(image: DiskImage) -> list[DiskImage]:
    """``[image, its backing, ...]`` down to the base."""
    found = [image]
    while found[-1].backing is not None:
        below = found[-1].backing
        assert below is not None
        found.append(below)
    return found


def commit(path: str | os.PathLike[str], space: Space | None = None, empty: bool = True) -> int:
    """Copy every cluster the overlay at ``path`` holds into its backing image, then empty the overlay.

    Returns the bytes copied. The parent is opened writable (its own backing chain read-only), so it must not
    be open anywhere else: a base that other open overlays (linked clones) read is refused (it is in use),
    since committing into it would change what they read.
    A :class:`~labkit.errors.DatastoreFull` while the parent grows leaves both images valid and
    the overlay untouched: commit again when space is free.
    """
    path = os.fspath(path)
    overlay = open_image(path, writable=True, space=space)
    try:
        if not isinstance(overlay, Qcow2Image) or overlay.backing is None:
            raise ConfigError(f"{path} has no backing file to commit into")
        below = overlay.backing
        parent_path = below.filename
        parent_format = below.format
        below.close()  # its shared lock would keep the writer's lock from being taken
        parent = open_image(parent_path, writable=True, space=space, format=parent_format)
        overlay.replace_backing(parent)
        copied = 0
        for extent in overlay.extents():
            if extent.depth != 0 or extent.start >= parent.size:
                continue
            end = min(extent.start + extent.length, parent.size)
            for start in range(extent.start, end, COMMIT_CHUNK):
                count = min(COMMIT_CHUNK, end - start)
                parent.write(start, overlay.read(start, count))
                copied += count
        parent.flush()
        if empty:
            overlay.make_empty()
        return copied
    finally:
        overlay.close()


def info(path: str | os.PathLike[str], format: str | None = None) -> dict[str, Any]:
    """What ``qemu-img info --output json`` reports, with its key names, for a raw or qcow2 image."""
    path = os.fspath(path)
    image = open_image(path, format=format)
    try:
        report: dict[str, Any] = {
            "virtual-size": image.size,
            "filename": path,
            "format": image.format,
            "actual-size": image.actual_size(),
            "dirty-flag": False,
        }
        if isinstance(image, Qcow2Image):
            header = image.header
            report["cluster-size"] = header.cluster_size
            report["format-specific"] = {"type": "qcow2", "data": {
                "compat": "1.1", "compression-type": "zlib",
                "lazy-refcounts": bool(header.compatible_features & fmt.COMPAT_LAZY_REFCOUNTS),
                "refcount-bits": 1 << header.refcount_order, "corrupt": False, "extended-l2": False}}
            if header.backing_file is not None:
                report["backing-filename"] = header.backing_file
                report["full-backing-filename"] = os.path.join(os.path.dirname(path), header.backing_file)
                if header.backing_format is not None:
                    report["backing-filename-format"] = header.backing_format
        return report
    finally:
        image.close()
