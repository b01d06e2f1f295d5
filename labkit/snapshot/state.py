"""A stopped VM's whole state as plain data (:class:`MachineState`), and its sections in a snapshot file.

What a snapshot holds, and why each part is there:

=================  ==============================================================================
``machine``        JSON: the guest (name, mode, load address, entry, ring), RAM size, where it was
                   taken (backend, flavour), the run's status, whether the guest was halted waiting
                   for an interrupt, an interrupt acknowledged but not yet delivered, the memory
                   regions, and the labkit version.
``cpu``            JSON: general-purpose registers, RIP, RFLAGS; segment registers with their
                   hidden parts, GDTR/IDTR/LDTR/TR, CR0/CR2/CR3/CR4/CR8, EFER; the MSRs in
                   :data:`SAVED_MSRS` (SYSCALL's STAR/LSTAR/CSTAR/FMASK, the FS/GS bases and
                   KERNEL_GS_BASE, SYSENTER's three, the TSC); x87/SSE (FXSAVE's view); DR0-3/6/7.
``devices``        JSON: every device's ``save()`` (UART registers, console bytes, PIC, PIT, ...).
``guest-code``     the guest program's bytes (so the guest can be rebuilt without its file).
``ram``,           each memory region's bytes, RAM first (full snapshots; in memory a sealed memfd,
``region:N``       :class:`labkit.snapshot.image.MemoryImage`, or ``bytes``), or
``pages``,         the numbers of the pages written since the parent snapshot (8 bytes each) and
``page-data``      their contents, 4 KiB each (diff snapshots).
=================  ==============================================================================

Device states are plain data (ints, bytes, strings, lists, dicts) or frozen dataclasses of
labkit's device modules; they travel as tagged JSON (:func:`encode_value`), and decoding builds
only dataclasses defined in ``labkit.vmm`` modules.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

from labkit.errors import SnapshotError
from labkit.snapshot.image import MemoryImage
from labkit.x86.state import DebugRegs, DescriptorTable, FpuState, Regs, Segment, SRegs

FORMAT = 1
"""The version of the sections' contents (the file's own version is in :mod:`labkit.snapshot.file`)."""

PAGE = 4096

SAVED_MSRS = (
    0x10,          # IA32_TIME_STAMP_COUNTER
    0x174,         # IA32_SYSENTER_CS
    0x175,         # IA32_SYSENTER_ESP
    0x176,         # IA32_SYSENTER_EIP
    0xC0000081,    # IA32_STAR
    0xC0000082,    # IA32_LSTAR
    0xC0000083,    # IA32_CSTAR
    0xC0000084,    # IA32_FMASK
    0xC0000100,    # IA32_FS_BASE
    0xC0000101,    # IA32_GS_BASE
    0xC0000102,    # IA32_KERNEL_GS_BASE
)
"""The MSRs a snapshot keeps (EFER travels with the control registers in ``sregs``)."""


@dataclass(frozen=True)
class GuestImage:
    """What rebuilds the :class:`labkit.Guest` a snapshot was taken of."""

    name: str
    mode: int
    load_address: int
    entry: int
    user: bool
    code: bytes = field(repr=False)


@dataclass(frozen=True)
class Region:
    """One memory region: guest-physical address, size, whether the guest may write it, and its bytes
    (empty in the state of a diff snapshot, whose memory is its parent's plus a :class:`PageDiff`)."""

    address: int
    size: int
    read_only: bool
    data: bytes | MemoryImage = field(default=b"", repr=False)
    """Bytes, or (a snapshot taken of a machine) a sealed :class:`labkit.snapshot.image.MemoryImage`."""


@dataclass(frozen=True)
class MachineState:
    """Everything a stopped VM is: vCPU, memory, devices, and the run's own state (see the module docstring)."""

    guest: GuestImage
    memory_size: int
    taken_on: dict[str, str | None]
    regs: Regs
    sregs: SRegs
    msrs: dict[int, int]
    fpu: FpuState
    debug: DebugRegs
    devices: dict[str, Any]
    regions: tuple[Region, ...]
    status: Any = None
    """The latest run's :class:`labkit.vmm.status.Status` (kind, exit code, fault, ...), ``None`` before the first run."""
    halted_waiting: bool = False
    """The guest executed HLT with interrupts enabled and waits for an interrupt."""
    pending_interrupt: int | None = None
    """An interrupt the controller handed over but the guest has not taken yet."""

    @property
    def has_memory(self) -> bool:
        """Whether every region's bytes are here (a full snapshot's state)."""
        return all(len(region.data) == region.size for region in self.regions)

    def with_pages(self, diff: PageDiff, base: MachineState) -> MachineState:
        """This (memoryless) state with ``base``'s memory and ``diff``'s pages written over it."""
        return dataclasses.replace(self, regions=tuple(_apply_diff(base, self.layout(), diff)))

    def with_regions(self, data: list[bytearray] | list[bytes]) -> MachineState:
        """This state with each region's bytes taken from ``data`` (same order and sizes)."""
        if [len(buffer) for buffer in data] != [region.size for region in self.regions]:
            raise SnapshotError("region contents do not match the state's memory layout")
        return dataclasses.replace(self, regions=tuple(Region(r.address, r.size, r.read_only, bytes(buffer))
                                                       for r, buffer in zip(self.regions, data)))

    def without_memory(self) -> MachineState:
        """This state with the regions' layout kept and their bytes left out."""
        return dataclasses.replace(self, regions=tuple(Region(r.address, r.size, r.read_only) for r in self.regions))

    def layout(self) -> list[tuple[int, int, bool]]:
        return [(region.address, region.size, region.read_only) for region in self.regions]


@dataclass(frozen=True)
class PageDiff:
    """The pages of memory written since the parent snapshot: guest-physical page numbers and their bytes
    (taken of a machine: a :class:`labkit.snapshot.image.MemoryImage`)."""

    pages: tuple[int, ...]
    data: bytes | MemoryImage = field(repr=False)


# --- tagged JSON for device state ----------------------------------------------------------------

def encode_value(value: Any) -> Any:
    """Plain data and labkit dataclasses as JSON-able values with tags for bytes, tuples, int-keyed dicts."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, tuple):
        return {"$tuple": [encode_value(item) for item in value]}
    if isinstance(value, list):
        return [encode_value(item) for item in value]
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("$") for key in value):
            return {key: encode_value(item) for key, item in value.items()}
        return {"$items": [[encode_value(key), encode_value(item)] for key, item in value.items()]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        kind = type(value)
        return {"$dataclass": f"{kind.__module__}:{kind.__qualname__}",
                "fields": {f.name: encode_value(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    raise SnapshotError(f"cannot save a {type(value).__name__} in a snapshot (device state must be plain data)")


def decode_value(value: Any) -> Any:
    """The inverse of :func:`encode_value`; refuses any dataclass outside labkit's device modules."""
    if isinstance(value, list):
        return [decode_value(item) for item in value]
    if not isinstance(value, dict):
        return value
    if "$bytes" in value:
        return base64.b64decode(value["$bytes"], validate=True)
    if "$tuple" in value:
        return tuple(decode_value(item) for item in value["$tuple"])
    if "$items" in value:
        return {decode_value(key): decode_value(item) for key, item in value["$items"]}
    if "$dataclass" in value:
        module, _, name = str(value["$dataclass"]).partition(":")
        if not module.startswith("labkit.vmm.") or not name.isidentifier():
            raise SnapshotError(f"snapshot names a state class outside labkit's devices: {value['$dataclass']!r}")
        kind = getattr(importlib.import_module(module), name, None)
        if not isinstance(kind, type) or not dataclasses.is_dataclass(kind):
            raise SnapshotError(f"snapshot names an unknown device state class {value['$dataclass']!r}")
        return kind(**{key: decode_value(item) for key, item in value["fields"].items()})
    return {key: decode_value(item) for key, item in value.items()}


# --- sections -------------------------------------------------------------------------------------

def _segment(raw: dict[str, int]) -> Segment:
    return Segment(**raw)


def encode_cpu(state: MachineState) -> bytes:
    return json.dumps({
        "regs": state.regs.as_dict(),
        "sregs": dataclasses.asdict(state.sregs),
        "msrs": {f"{index:#x}": value for index, value in state.msrs.items()},
        "fpu": {**dataclasses.asdict(state.fpu), "st": [f"{v:#x}" for v in state.fpu.st],
                "xmm": [f"{v:#x}" for v in state.fpu.xmm]},
        "debug": dataclasses.asdict(state.debug),
    }).encode()


def decode_cpu(data: bytes) -> tuple[Regs, SRegs, dict[int, int], FpuState, DebugRegs]:
    cpu = json.loads(data)
    sregs_raw = dict(cpu["sregs"])
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        sregs_raw[name] = _segment(sregs_raw[name])
    for name in ("gdt", "idt"):
        sregs_raw[name] = DescriptorTable(**sregs_raw[name])
    fpu_raw = dict(cpu["fpu"])
    fpu_raw["st"] = tuple(int(v, 16) for v in fpu_raw["st"])
    fpu_raw["xmm"] = tuple(int(v, 16) for v in fpu_raw["xmm"])
    return (Regs(**cpu["regs"]), SRegs(**sregs_raw), {int(k, 16): int(v) for k, v in cpu["msrs"].items()},
            FpuState(**fpu_raw), DebugRegs(**cpu["debug"]))


def region_section(index: int) -> str:
    return "ram" if index == 0 else f"region:{index}"


def encode_machine(state: MachineState, regions: list[dict[str, int | bool]]) -> bytes:
    guest = state.guest
    return json.dumps({
        "format": FORMAT,
        "guest": {"name": guest.name, "mode": guest.mode, "load_address": guest.load_address,
                  "entry": guest.entry, "user": guest.user},
        "memory_size": state.memory_size, "taken_on": state.taken_on,
        "status": encode_value(state.status),
        "halted_waiting": state.halted_waiting, "pending_interrupt": state.pending_interrupt,
        "regions": regions,
    }).encode()


def state_sections(state: MachineState, diff: PageDiff | None = None) -> dict[str, bytes | memoryview]:
    """The file sections for ``state``: every region's bytes, or (``diff``) only the changed pages."""
    regions = [{"address": region.address, "size": region.size, "read_only": region.read_only}
               for region in state.regions]
    sections: dict[str, bytes | memoryview] = {
        "machine": encode_machine(state, regions), "cpu": encode_cpu(state),
        "devices": json.dumps(encode_value(state.devices)).encode(), "guest-code": state.guest.code}
    if diff is None:
        if not state.has_memory:
            raise SnapshotError("a full snapshot needs every region's bytes")
        for index, region in enumerate(state.regions):
            sections[region_section(index)] = memoryview(region.data)
    else:
        sections["pages"] = struct.pack(f"<{len(diff.pages)}Q", *diff.pages)
        sections["page-data"] = memoryview(diff.data)
    return sections


def state_from_sections(read: Any, parent: MachineState | None = None) -> MachineState:
    """Rebuild a :class:`MachineState` from a file's sections (``read(name) -> bytes``).

    A diff's pages are applied over ``parent``'s memory; every page number and length is checked.
    """
    try:
        machine = json.loads(bytes(read("machine")))
        if machine.get("format") != FORMAT:
            raise SnapshotError(f"snapshot contents format {machine.get('format')!r}; this labkit reads {FORMAT}")
        guest_raw = machine["guest"]
        guest = GuestImage(str(guest_raw["name"]), int(guest_raw["mode"]), int(guest_raw["load_address"]),
                           int(guest_raw["entry"]), bool(guest_raw["user"]), bytes(read("guest-code")))
        regs, sregs, msrs, fpu, debug = decode_cpu(bytes(read("cpu")))
        devices = decode_value(json.loads(bytes(read("devices"))))
        layout_ = [(int(r["address"]), int(r["size"]), bool(r["read_only"])) for r in machine["regions"]]
        status = machine["status"]
        pending = machine["pending_interrupt"]
    except SnapshotError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise SnapshotError(f"snapshot contents are malformed: {type(error).__name__}: {error}") from None
    if not layout_ or layout_[0][0] != 0:
        raise SnapshotError("snapshot has no RAM region at guest-physical 0")
    if parent is None:
        regions = []
        for index, (address, size, read_only) in enumerate(layout_):
            data = bytes(read(region_section(index)))
            if len(data) != size:
                raise SnapshotError(f"snapshot region {index} has {len(data)} bytes, its table says {size}")
            regions.append(Region(address, size, read_only, data))
    else:
        regions = _apply_diff(parent, layout_, page_diff(bytes(read("pages")), read("page-data")))
    return MachineState(
        guest=guest, memory_size=int(machine["memory_size"]), taken_on=dict(machine["taken_on"]), regs=regs,
        sregs=sregs, msrs=msrs, fpu=fpu, debug=debug, devices=devices, regions=tuple(regions),
        status=decode_value(status),
        halted_waiting=bool(machine["halted_waiting"]), pending_interrupt=None if pending is None else int(pending))


def page_diff(pages_raw: bytes, page_data: Any) -> PageDiff:
    """A diff's ``pages`` and ``page-data`` sections, checked: whole entries, increasing, 4 KiB each."""
    if len(pages_raw) % 8:
        raise SnapshotError("diff snapshot's page list is not a whole number of 8-byte entries")
    pages = struct.unpack(f"<{len(pages_raw) // 8}Q", pages_raw)
    if len(page_data) != PAGE * len(pages):
        raise SnapshotError(f"diff snapshot has {len(page_data)} bytes of page data for {len(pages)} pages")
    if any(later <= earlier for earlier, later in zip(pages, pages[1:])):
        raise SnapshotError("diff snapshot's page numbers are not strictly increasing")
    return PageDiff(tuple(pages), bytes(page_data))


def _apply_diff(parent: MachineState, layout_: list[tuple[int, int, bool]], diff: PageDiff) -> list[Region]:
    if not parent.has_memory:
        raise SnapshotError("a diff applies to a parent whose memory is whole")
    if parent.layout() != layout_:
        raise SnapshotError("diff snapshot's memory regions differ from its parent's")
    regions = []
    for region, pages in zip(parent.regions, place_pages(parent.regions, diff)):
        if not pages:
            data: bytes | MemoryImage = region.data  # unchanged, and immutable: shared with the parent
        elif isinstance(region.data, MemoryImage):
            data = MemoryImage.with_pages(region.data, pages)
        else:
            buffer = bytearray(region.data)
            for offset, page in pages:
                buffer[offset:offset + PAGE] = page
            data = bytes(buffer)
        regions.append(Region(region.address, region.size, region.read_only, data))
    return regions


def place_pages(regions: Sequence[Region], diff: PageDiff) -> list[list[tuple[int, memoryview]]]:
    """For each of ``regions``, the (offset in the region, 4 KiB) of each of ``diff``'s pages it holds;
    a page outside every region is an error."""
    data = memoryview(diff.data)
    placed: list[list[tuple[int, memoryview]]] = [[] for _ in regions]
    for index, page in enumerate(diff.pages):
        address = page * PAGE
        for slot, region in enumerate(regions):
            if region.address <= address and address + PAGE <= region.address + region.size:
                placed[slot].append((address - region.address, data[index * PAGE:(index + 1) * PAGE]))
                break
        else:
            raise SnapshotError(f"diff snapshot writes page {page:#x}, outside every memory region")
    return placed


def write_pages(buffers: Sequence[bytearray], regions: Sequence[Region], diff: PageDiff) -> None:
    """Write each of ``diff``'s pages into the buffer of the region (``regions``, same order) that holds it:
    a diff over its parent's memory, or the pages a live migration's round sends to the receiving side."""
    for buffer, pages in zip(buffers, place_pages(regions, diff)):
        for offset, page in pages:
            buffer[offset:offset + PAGE] = page
