"""KVM's binary statistics (``KVM_GET_STATS_FD``, Documentation/virt/kvm/api.rst 4.133).

The stats fd holds a ``kvm_stats_header``, an id string, one ``kvm_stats_desc``
(plus its name) per statistic, and a data block of ``u64`` values.  The
descriptors never change, and are the same for every vCPU of a kernel, so
:class:`BinaryStats` parses them once per process (each new fd then reads only
its header) and each :meth:`BinaryStats.read` costs one ``pread`` of the data block.
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from labkit.kvm import bindings as kb


class BinaryStats:
    """The statistics of one VM or vCPU, read from the fd ``KVM_GET_STATS_FD`` returned (owned by this object)."""

    def __init__(self, fd: int):
        self.fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)
        header = kb.kvm_stats_header.from_buffer_copy(os.pread(fd, ctypes.sizeof(kb.kvm_stats_header), 0))
        self._header = header
        shape = bytes(header)
        known = _LAYOUTS.get(shape)
        if known is None:  # the first fd of this shape: read and parse its descriptors
            desc_size = ctypes.sizeof(kb.kvm_stats_desc) + header.name_size
            descs = os.pread(fd, desc_size * header.num_desc, header.desc_offset)
            known = _LAYOUTS.setdefault(shape, _parse_descriptors(descs, desc_size))
        self._data_offset = header.data_offset
        self._layout, self._data_size, self._unpack, self._cumulative = known

    @functools.cached_property
    def id(self) -> str:
        """The kernel's name for these statistics (``kvm-<pid>/vcpu-<n>``)."""
        header = self._header
        return os.pread(self.fd, header.name_size, header.id_offset).split(b"\0", 1)[0].decode()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _, _, _ in self._layout)

    def units(self) -> dict[str, int]:
        """Name -> ``KVM_STATS_TYPE_* | KVM_STATS_UNIT_* | KVM_STATS_BASE_*`` flags."""
        return {name: flags for name, _, _, flags in self._layout}

    def values(self) -> tuple[int, ...]:
        """The data block as it is now, unnamed (one ``pread``): keep it to measure :meth:`growth` from."""
        return self._unpack(os.pread(self.fd, self._data_size, self._data_offset))

    def read(self) -> dict[str, int | tuple[int, ...]]:
        """Name -> current value; histograms (``size`` > 1) as tuples of bucket counts."""
        values = self.values()
        return {
            name: values[index] if count == 1 else values[index:index + count]
            for name, index, count, _ in self._layout
        }

    def growth(self, before: tuple[int, ...]) -> dict[str, int]:
        """How much each plain cumulative counter (:func:`cumulative_counters`) grew since :meth:`values`
        gave ``before``: one ``pread``."""
        after = self.values()
        return {name: after[index] - before[index] for name, index in self._cumulative}

    def close(self) -> None:
        self._finalizer()


_LAYOUTS: dict[bytes, tuple[tuple[tuple[str, int, int, int], ...], int, Callable[[bytes], tuple[int, ...]],
                            tuple[tuple[str, int], ...]]] = {}
"""Parsed descriptors by the stats header's bytes: every vCPU of this kernel has the same, so a new stats
fd costs one ``pread`` of its header before its first read, not three reads and a parse."""


def _parse_descriptors(descs: bytes, desc_size: int) -> tuple[tuple[tuple[str, int, int, int], ...], int,
                                                             Callable[[bytes], tuple[int, ...]],
                                                             tuple[tuple[str, int], ...]]:
    """The layout ((name, first u64 index, count, flags), ...), the data block's size, its unpacker, and
    (name, index) of the plain cumulative counters, from the descriptors' bytes."""
    layout = []
    end = 0
    for i in range(len(descs) // desc_size):
        raw = descs[i * desc_size:(i + 1) * desc_size]
        desc = kb.kvm_stats_desc.from_buffer_copy(raw)
        name = raw[ctypes.sizeof(kb.kvm_stats_desc):].split(b"\0", 1)[0].decode()
        layout.append((name, desc.offset // 8, desc.size, desc.flags))
        end = max(end, desc.offset + 8 * desc.size)
    cumulative = tuple((name, index) for name, index, count, flags in layout
                       if count == 1 and flags & kb.KVM_STATS_TYPE_MASK == kb.KVM_STATS_TYPE_CUMULATIVE)
    return tuple(layout), end, struct.Struct(f"<{end // 8}Q").unpack, cumulative


def cumulative_counters(stats: BinaryStats) -> tuple[str, ...]:
    """The names of the plain cumulative counters (``KVM_STATS_TYPE_CUMULATIVE``, one value each)."""
    return tuple(name for name, _ in stats._cumulative)


@dataclass(frozen=True)
class CounterRow:
    """One line of "in the kernel against userspace": a kind of exit, what labkit saw, what KVM counted."""

    what: str
    userspace: int
    """Returns of ``KVM_RUN`` to labkit of this kind (exits labkit's run loop saw)."""
    counter: str | None
    """The vCPU stat compared with it (``io_exits``, ...); ``None`` where KVM keeps none."""
    kernel: int | None
    """That stat's growth over the same run; ``None`` where KVM keeps none."""
    note: str = ""
    """Why the two are not comparable on this flavour, where they are not (then :attr:`in_kernel` is ``None``)."""

    @property
    def in_kernel(self) -> int | None:
        """What KVM counted that never reached userspace (``kernel - userspace``), where that means something."""
        if self.kernel is None or self.note:
            return None
        return self.kernel - self.userspace


ROWS: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    ("all exits", ("*",), "exits"),
    ("port I/O", ("IO",), "io_exits"),
    ("MMIO", ("MMIO",), "mmio_exits"),
    ("HLT", ("HLT",), "halt_exits"),
    ("signal / kick", ("INTR",), "signal_exits"),
    ("interrupt window", ("IRQ_WINDOW_OPEN",), "irq_window_exits"),
    ("hypercall", ("HYPERCALL",), "hypercalls"),
    ("RDMSR / WRMSR", ("X86_RDMSR", "X86_WRMSR"), None),
    ("host interrupts", (), "irq_exits"),
    ("page faults", (), "pf_taken"),
    ("emulated instructions", (), "insn_emulation"),
)
"""(row, userspace exit reasons summed, vCPU stat): ``*`` sums every reason."""

NOT_COMPARABLE = {
    ("kvm_pvm", "io_exits"): "PVM runs ring-0 in/out in KVM's instruction emulator, which never takes the "
                             "VMX/SVM I/O-exit handler that counts io_exits (insn_emulation counts them)",
}
"""(flavour, stat) -> why that stat does not count the userspace exits of its row there (measured)."""


@dataclass(frozen=True)
class KvmRunStats:
    """What KVM counted for a machine's vCPU against what reached labkit, since the machine was created.

    ``counters`` is the growth of every cumulative vCPU stat of the binary stats
    fd (``KVM_GET_STATS_FD``) since the machine was created; ``userspace`` counts
    the returns of ``KVM_RUN`` labkit's run loop saw, by exit reason name
    (``IO``, ``MMIO``, ``HLT``, ``X86_RDMSR``, ``INTR``, ...; a string ``ins``/``outs``
    is one exit however many elements it moves); ``delivered`` counts the
    writes KVM kept in the kernel that labkit then handed to the devices
    (``coalesced_mmio``, ``coalesced_pio``, ``ioeventfd``).  Which counter counts
    what depends on the flavour: see :meth:`rows` and notebook 05.
    """

    flavour: str
    counters: Mapping[str, int]
    userspace: Mapping[str, int]
    delivered: Mapping[str, int]
    controls: tuple[str, ...] = ()

    def __getitem__(self, name: str) -> int:
        """A vCPU stat's growth: ``stats["insn_emulation"]``."""
        return self.counters[name]

    @property
    def userspace_total(self) -> int:
        return sum(self.userspace.values())

    def rows(self) -> list[CounterRow]:
        """The kernel's counters beside the exits labkit saw, one :class:`CounterRow` per kind."""
        rows = []
        for what, reasons, counter in ROWS:
            seen = self.userspace_total if reasons == ("*",) else sum(self.userspace.get(r, 0) for r in reasons)
            kernel = None if counter is None else self.counters.get(counter)
            if counter is not None and kernel is None:
                continue  # this kernel keeps no such stat
            note = NOT_COMPARABLE.get((self.flavour, counter), "") if counter is not None else ""
            rows.append(CounterRow(what, seen, counter, kernel, note))
        return rows


def counters_delta(before: Mapping[str, int | tuple[int, ...]], after: Mapping[str, int | tuple[int, ...]],
                   names: tuple[str, ...]) -> dict[str, int]:
    """``after - before`` of the named scalar counters."""
    delta = {}
    for name in names:
        old, new = before.get(name), after.get(name)
        if isinstance(old, int) and isinstance(new, int):
            delta[name] = new - old
    return delta
