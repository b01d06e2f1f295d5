"""Disk images and datastores: raw bases, qcow2 (version 3) overlays, backing chains, a datastore with a capacity::

    from labkit.storage import Datastore

    store = Datastore("/tmp/lun", capacity=64 << 20)     # a folder with a capacity (a LUN)
    store.create_raw("base.raw", 16 << 20)               # a thick base disk
    store.create_overlay("vm1.qcow2", "base.raw")        # a snapshot's delta file
    disk = store.open("vm1.qcow2")
    disk.write(0, b"x" * 4096)      # allocates a cluster in vm1.qcow2 (qcow2.rst "Cluster mapping")
    disk.close()

The files are real qcow2 that ``qemu-img info/check/compare`` accept. See :mod:`labkit.storage.qcow2`
for the format and the order of writes that keeps a crash from corrupting an image.
"""

from __future__ import annotations

from labkit.storage.chain import chain_of, commit, create_overlay, info, open_image, probe_format
from labkit.storage.check import CheckReport, check_image
from labkit.storage.datastore import Datastore, Waiter
from labkit.storage.hostfile import ImageFile, Space
from labkit.storage.image import DiskImage, Extent
from labkit.storage.qcow2 import Qcow2Image
from labkit.storage.raw import RawImage

__all__ = ["CheckReport", "Datastore", "DiskImage", "Extent", "ImageFile", "Qcow2Image", "RawImage", "Space", "Waiter",
           "chain_of", "check_image", "commit", "create_overlay", "info", "open_image", "probe_format"]
