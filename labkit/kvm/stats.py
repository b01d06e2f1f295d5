"""KVM's binary statistics (``KVM_GET_STATS_FD``, Documentation/virt/kvm/api.rst 4.133).

The stats fd holds a ``kvm_stats_header``, an id string, one ``kvm_stats_desc``
(plus its name) per statistic, and a data block of ``u64`` values.  The
descriptors never change, so :class:`BinaryStats` reads them once and each
:meth:`BinaryStats.read` costs one ``pread`` of the data block.
"""

from __future__ import annotations

import ctypes
import os
import struct
import weakref

from labkit.kvm import bindings as kb


class BinaryStats:
    """The statistics of one VM or vCPU, read from the fd ``KVM_GET_STATS_FD`` returned (owned by this object)."""

    def __init__(self, fd: int):
        self.fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)
        header = kb.kvm_stats_header.from_buffer_copy(os.pread(fd, ctypes.sizeof(kb.kvm_stats_header), 0))
        self.id = os.pread(fd, header.name_size, header.id_offset).split(b"\0", 1)[0].decode()
        desc_size = ctypes.sizeof(kb.kvm_stats_desc) + header.name_size
        descs = os.pread(fd, desc_size * header.num_desc, header.desc_offset)
        self._data_offset = header.data_offset
        layout = []  # (name, first u64 index, count, flags)
        end = 0
        for i in range(header.num_desc):
            raw = descs[i * desc_size:(i + 1) * desc_size]
            desc = kb.kvm_stats_desc.from_buffer_copy(raw)
            name = raw[ctypes.sizeof(kb.kvm_stats_desc):].split(b"\0", 1)[0].decode()
            layout.append((name, desc.offset // 8, desc.size, desc.flags))
            end = max(end, desc.offset + 8 * desc.size)
        self._layout = tuple(layout)
        self._data_size = end
        self._unpack = struct.Struct(f"<{end // 8}Q").unpack

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _, _, _ in self._layout)

    def units(self) -> dict[str, int]:
        """Name -> ``KVM_STATS_TYPE_* | KVM_STATS_UNIT_* | KVM_STATS_BASE_*`` flags."""
        return {name: flags for name, _, _, flags in self._layout}

    def read(self) -> dict[str, int | tuple[int, ...]]:
        """Name -> current value; histograms (``size`` > 1) as tuples of bucket counts."""
        values = self._unpack(os.pread(self.fd, self._data_size, self._data_offset))
        return {
            name: values[index] if count == 1 else values[index:index + count]
            for name, index, count, _ in self._layout
        }

    def close(self) -> None:
        self._finalizer()
