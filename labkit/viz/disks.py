"""Notebook 09's measurements and figures: deltas that grow, chains that cost reads, VMs that fill a datastore.

    >>> from labkit.viz.disks import delta_growth, growth_figure, chain_reads, chain_figure, fill_datastore, fill_figure
    >>> growth_figure(delta_growth("emu"))          # overlay size against data written, per write pattern
    >>> chain_figure(chain_reads())                 # time to read the disk through 0..8 overlays
    >>> fill_figure(fill_datastore(vms=3, room=256 << 10, pattern="random", backend="emu"))

The measurements run real machines (this module sits above ``labkit.vmm``, ``labkit.virtio`` and
``labkit.storage``): ``blk64`` (``guests/blk64.S``) writes through the virtio block device
(:mod:`labkit.virtio.blk`) into a qcow2 overlay labkit writes, reads every sector back and prints a
checksum, which is compared with :func:`labkit.virtio.blk.blk64_console` (the guest saw every write it
was told was done).  Sizes are the overlay file's length, which is what a datastore counts.  The chain
reads are host work only (``labkit.storage`` in Python, no VM), and the figure says so.  Every figure
says what measured it, is drawn at 150 dpi with text of at least 11 points.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from labkit.errors import ConfigError, LabkitError, StorageError
from labkit.storage import Datastore, DiskImage, check_image, open_image
from labkit.virtio.blk import (PARAMS_ADDRESS, PATTERNS, SECTOR_SIZE, blk64_console, blk64_parameters, blk64_qword,
                               blk64_sectors, block_devices)
from labkit.viz.labels import measured_on
from labkit.viz.style import finish, new_figure, readable_fonts

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from labkit.vmm.machine import Machine
    from labkit.vmm.status import RunResult

KIB = 1 << 10
CLUSTER = 4096
"""The overlays' cluster size here: qcow2's smallest sensible one (QEMU's default is 64 KiB), so a small disk shows
the allocation of single clusters."""
GROWTH_DISK = 128 * KIB
"""The base disk of the growth experiment: 256 sectors, so the longest sequential run rewrites all of it."""
GROWTH_STEPS = (16, 64, 256)
"""Requests per growth run (one sector each)."""
FILL_DISK = 256 * KIB
FILL_REQUESTS = 64
FILL_SECTORS = 2
"""Each VM of the fill experiment writes this many requests of this many sectors (1 KiB each)."""
FORGOTTEN = 192 * KIB
"""What the stopped VM's forgotten snapshot holds (its delta), freed by committing it."""
RUN_TIMEOUT_S = 30.0
PATTERN_COLOURS = {"sequential": "#1f77b4", "random": "#d62728", "rewrite": "#2ca02c"}


def _origin(result: RunResult, backend: str) -> tuple[str, str | None]:
    origin = result.origin
    return (origin.backend, origin.flavour) if origin is not None else (backend, None)


def _blk64_machine(backend: str, opener: object, pattern: str, sectors: int, requests: int, seed: int) -> Machine:
    from labkit.vmm.machine import Machine

    machine = Machine("blk64", backend=backend, devices=block_devices(opener))
    try:
        machine.write_memory(PARAMS_ADDRESS, blk64_parameters(pattern, sectors, requests, seed))
    except BaseException:
        machine.close()
        raise
    return machine


# --- delta size against data written ------------------------------------------------------------------

@dataclass(frozen=True)
class GrowthPoint:
    """One run of ``blk64`` into a new, empty overlay over a raw base disk."""

    pattern: str
    requests: int
    sectors: int
    written: int
    """Bytes the guest wrote (the block device's ``bytes_written``)."""
    delta_bytes: int
    """The overlay file's length after the run (what the datastore counts)."""
    data_clusters: int
    """Guest clusters the overlay holds."""
    base_bytes: int
    backend: str
    flavour: str | None
    verified: bool
    """The guest read everything back and printed the expected checksum."""
    seed: int = 1

    @property
    def label(self) -> str:
        return measured_on(self.backend, self.flavour)


def empty_overlay_bytes(disk: int = GROWTH_DISK, cluster: int = CLUSTER) -> int:
    """The length of a new, empty qcow2 overlay (header, L1 table, refcount table and block) over a ``disk``-byte base."""
    with tempfile.TemporaryDirectory(prefix="labkit-09-") as folder:
        store = Datastore(folder, capacity=1 << 40)
        store.create_raw("base.raw", disk)
        store.create_overlay("delta.qcow2", "base.raw", cluster_size=cluster)
        return os.path.getsize(store.file("delta.qcow2"))


def delta_growth(backend: str = "auto", patterns: Sequence[str] = PATTERNS, steps: Sequence[int] = GROWTH_STEPS, *,
                 sectors: int = 1, disk: int = GROWTH_DISK, cluster: int = CLUSTER, seed: int = 1) -> list[GrowthPoint]:
    """For each pattern and each request count, a new overlay and one ``blk64`` run that writes into it."""
    from labkit.backend import choose_backend
    from labkit.vmm.status import StatusKind

    backend = choose_backend(backend).name
    if not patterns or any(p not in PATTERNS for p in patterns):
        raise ConfigError(f"patterns are some of {', '.join(PATTERNS)}, not {list(patterns)!r}")
    points = []
    for pattern in patterns:
        for requests in steps:
            if pattern == "sequential" and requests * sectors > disk // SECTOR_SIZE:
                raise ConfigError(f"{requests} sequential requests of {sectors} sectors run past a {disk // KIB} KiB disk")
            with tempfile.TemporaryDirectory(prefix="labkit-09-") as folder:
                store = Datastore(folder, capacity=1 << 40)
                store.create_raw("base.raw", disk)
                store.create_overlay("delta.qcow2", "base.raw", cluster_size=cluster)
                with _blk64_machine(backend, lambda: store.open("delta.qcow2"), pattern, sectors, requests, seed) \
                        as machine:
                    result = machine.run(timeout=RUN_TIMEOUT_S)
                    written = machine.device_state("virtio-blk")["bytes_written"]
                verified = (result.status.kind is StatusKind.EXITED and result.console == blk64_console(
                    pattern, sectors, requests, seed, capacity=disk // SECTOR_SIZE))
                delta = open_image(store.file("delta.qcow2"))
                try:
                    clusters = sum(e.length for e in delta.extents() if e.depth == 0 and e.data) // cluster
                finally:
                    delta.close()
                found_backend, flavour = _origin(result, backend)
                points.append(GrowthPoint(pattern, requests, sectors, written, os.path.getsize(store.file("delta.qcow2")),
                                          clusters, disk, found_backend, flavour, verified, seed))
    return points


def qemu_delta_bytes(point: GrowthPoint, cluster: int = CLUSTER) -> int | None:
    """The overlay size QEMU gives for ``point``'s writes: ``qemu-img create -b`` an overlay of the same cluster size,
    ``qemu-io`` writes the sectors ``blk64`` wrote, in its order.  ``None`` where QEMU's tools are not installed."""
    qemu_img, qemu_io = shutil.which("qemu-img"), shutil.which("qemu-io")
    if qemu_img is None or qemu_io is None:
        return None
    firsts = blk64_sectors(point.pattern, point.sectors, point.requests, point.seed, point.base_bytes // SECTOR_SIZE)
    commands = [f"write -P 0x5a {first * SECTOR_SIZE} {point.sectors * SECTOR_SIZE}" for first in firsts]
    with tempfile.TemporaryDirectory(prefix="labkit-09-qemu-") as folder:
        base, overlay = os.path.join(folder, "base.raw"), os.path.join(folder, "qemu.qcow2")
        with open(base, "wb") as handle:
            handle.truncate(point.base_bytes)
        for command in ([qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "-o",
                         f"cluster_size={cluster}", overlay],
                        [qemu_io, "-f", "qcow2", *(part for c in commands for part in ("-c", c)), overlay]):
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=folder)
            except (OSError, subprocess.TimeoutExpired) as error:
                raise StorageError(f"{os.path.basename(command[0])} did not run: {error}") from None
            if done.returncode != 0:
                raise StorageError(f"{os.path.basename(command[0])} failed (exit status {done.returncode}): "
                                   f"{done.stderr.strip()[:200]}")
        return os.path.getsize(overlay)


def growth_figure(points: Sequence[GrowthPoint], empty_bytes: int | None = None) -> Figure:
    """Overlay file size against bytes the guest wrote, one line per pattern, and the base disk's size."""
    if not points:
        raise ConfigError("growth_figure needs at least one GrowthPoint")
    empty = empty_overlay_bytes(points[0].base_bytes) if empty_bytes is None else empty_bytes
    with readable_fonts():
        figure = new_figure(8.0, 4.0)
        ax = figure.add_subplot()
        for pattern in dict.fromkeys(p.pattern for p in points):
            mine = sorted((p for p in points if p.pattern == pattern), key=lambda p: p.written)
            ax.plot([0] + [p.written / KIB for p in mine], [empty / KIB] + [p.delta_bytes / KIB for p in mine],
                    marker="o", color=PATTERN_COLOURS.get(pattern), label=pattern)
        ax.axhline(points[0].base_bytes / KIB, color="black", linestyle="--", label="base disk\n(raw file)")
        ax.set_xlabel("data the guest wrote (KiB)")
        ax.set_ylabel("delta file (KiB)")
        ax.set_title(f"qcow2 delta, {points[0].sectors * SECTOR_SIZE}-byte writes, {CLUSTER // KIB} KiB clusters\n"
                     f"{points[0].label}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set_ylim(bottom=0)
        finish(ax)
    return figure


# --- chain depth against read cost --------------------------------------------------------------------

@dataclass(frozen=True)
class ChainRead:
    """Reading the whole disk through ``depth`` overlays above a raw base: the best of a few passes."""

    depth: int
    where: str
    """``"base"``: the data is in the base, every overlay is empty (each read walks the chain);
    ``"top"``: the top overlay holds all of it."""
    seconds: float
    disk: int

    @property
    def ms_per_mib(self) -> float:
        return self.seconds * 1e3 / (self.disk / (1 << 20))


CHAIN_LABEL = "measured on this host (no VM): CPU time of labkit.storage (Python)"


def _read_pass(image: DiskImage, disk: int, piece: int) -> float:
    """The reading thread's CPU time (user and kernel) for one pass: what other processes on a busy host take of
    the CPU meanwhile is not counted, as wall time would."""
    started = time.thread_time()
    for offset in range(0, disk, piece):
        image.read(offset, piece)
    return time.thread_time() - started


def chain_reads(depths: Sequence[int] = range(9), *, disk: int = 1 << 20, cluster: int = 65536, piece: int = 4096,
                repeats: int = 4) -> list[ChainRead]:
    """Time reading ``disk`` bytes in ``piece``-byte reads through chains of each depth, data in the base or on top.

    Two chains share the base: empty overlays ``snap1`` .. ``snapN`` (the data stays in the base), and for each
    depth ``d`` an overlay ``full{d}`` in ``snap{d}``'s place that holds all the data.  Each chain is opened
    alone, read once to load its tables, then ``repeats`` times, keeping the pass that took the least CPU time
    of the reading thread (:func:`_read_pass`), with Python's garbage collector off as ``timeit`` has it.
    """
    depths = sorted(set(depths))
    if not depths or depths[0] < 0 or depths[-1] > 32:
        raise ConfigError(f"chain depths are 0 to 32 overlays, not {depths!r}")
    if not 1 <= repeats <= 100 or piece < 1 or disk % piece:
        raise ConfigError(f"chain_reads needs 1-100 repeats and a read size dividing the disk, not {repeats}, {piece}")
    data = os.urandom(disk)
    chains: list[tuple[int, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="labkit-09-chain-") as folder:
        store = Datastore(folder, capacity=1 << 40)
        store.create_raw("base.raw", disk)
        base = store.open("base.raw")
        try:
            base.write(0, data)
        finally:
            base.close()
        below = "base.raw"
        for depth in range(depths[-1] + 1):
            if depth:
                store.create_overlay(f"full{depth}.qcow2", below, cluster_size=cluster)
                full = store.open(f"full{depth}.qcow2")
                try:
                    full.write(0, data)
                finally:
                    full.close()
                store.create_overlay(f"snap{depth}.qcow2", below, cluster_size=cluster)
                below = f"snap{depth}.qcow2"
            if depth in depths:
                chains.append((depth, "base", store.file(below)))
                if depth:
                    chains.append((depth, "top", store.file(f"full{depth}.qcow2")))
        best = [float("inf")] * len(chains)
        collecting = gc.isenabled()
        gc.disable()  # as timeit does: a collection in one pass would be charged to whichever chain was read
        try:
            for index, (_depth, _where, path) in enumerate(chains):
                image = open_image(path)  # one chain open at a time; its first pass loads its tables
                try:
                    _read_pass(image, disk, piece)
                    for _ in range(repeats):
                        best[index] = min(best[index], _read_pass(image, disk, piece))
                finally:
                    image.close()
        finally:
            if collecting:
                gc.enable()
    return [ChainRead(depth, where, seconds, disk) for (depth, where, _path), seconds in zip(chains, best)]


def chain_figure(rows: Sequence[ChainRead]) -> Figure:
    """Milliseconds per MiB read against the number of overlays above the base."""
    if not rows:
        raise ConfigError("chain_figure needs at least one ChainRead")
    with readable_fonts():
        figure = new_figure(7.5, 3.8)
        ax = figure.add_subplot()
        for where, colour, label in (("base", "#d62728", "data in the base: every read walks the chain"),
                                     ("top", "#1f77b4", "data in the top overlay")):
            mine = sorted((r for r in rows if r.where == where), key=lambda r: r.depth)
            if mine:
                ax.plot([r.depth for r in mine], [r.ms_per_mib for r in mine], marker="o", color=colour, label=label)
        ax.set_xlabel("overlays above the base (chain depth)")
        ax.set_ylabel("CPU time to read (ms per MiB)")
        ax.set_title(f"Reading a {rows[0].disk >> 20} MiB disk through a backing chain\n{CHAIN_LABEL}")
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper left")
        finish(ax)
    return figure


# --- several VMs fill a datastore ---------------------------------------------------------------------

@dataclass(frozen=True)
class FillEvent:
    """Something that happened in a fill run, ``t`` seconds after the VMs started."""

    t: float
    vm: str
    """The VM's name, or ``"operator"`` for a freeing action."""
    kind: str
    """``"paused"``, ``"resumed"``, ``"finished"`` for a VM; ``"committed"``, ``"raised"`` for the operator."""
    detail: str
    used: int
    """Bytes in use in the datastore just then."""


@dataclass(frozen=True)
class VmRecord:
    name: str
    status: str
    """How its last run ended (``exited`` when it verified everything)."""
    verified: bool
    """blk64 printed the checksum of everything it wrote: it read back every acknowledged write."""
    lost_sectors: int
    """Sectors the guest was told are written that the overlay does not hold (opened after the run)."""
    clean: bool
    """``labkit disk check`` finds nothing wrong in its overlay."""
    pauses: int
    delta_bytes: int


@dataclass(frozen=True)
class FillRun:
    """Several VMs writing into their own overlays (linked clones of one base) in one datastore."""

    pattern: str
    room: int
    """Free bytes in the datastore when the VMs started."""
    backend: str
    flavour: str | None
    vms: tuple[VmRecord, ...]
    events: tuple[FillEvent, ...]
    samples: tuple[tuple[float, int, int], ...]
    """``(t, used, capacity)``, every few milliseconds."""
    capacity_start: int
    seconds: float

    @property
    def label(self) -> str:
        return measured_on(self.backend, self.flavour)

    @property
    def pauses(self) -> int:
        return sum(vm.pauses for vm in self.vms)

    def actions(self) -> list[FillEvent]:
        return [e for e in self.events if e.vm == "operator"]


class _Operator:
    """The VMs' states, and the operator who frees space once every VM still running is paused."""

    def __init__(self, names: Sequence[str]):
        self.condition = threading.Condition()
        self.state = {name: "running" for name in names}
        self.generation = 0

    def set(self, name: str, state: str) -> None:
        with self.condition:
            self.state[name] = state
            self.condition.notify_all()

    def wait_resume(self, name: str, generation: int) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.generation != generation)
            self.state[name] = "running"

    def all_stuck(self) -> bool:
        states = self.state.values()
        return any(s == "paused" for s in states) and all(s in ("paused", "finished") for s in states)


def _written_sectors(pattern: str, requests: int, sectors: int, seed: int, capacity: int) -> set[int]:
    return {first + k for first in blk64_sectors(pattern, sectors, requests, seed, capacity) for k in range(sectors)}


def _lost(path: str, written: set[int], seed: int) -> int:
    lost = 0
    image = open_image(path)
    try:
        for sector in written:
            expected = b"".join(blk64_qword(64 * sector + j, seed).to_bytes(8, "little") for j in range(64))
            if image.read(sector * SECTOR_SIZE, SECTOR_SIZE) != expected:
                lost += 1
    finally:
        image.close()
    return lost


def fill_datastore(vms: int = 3, room: int = 256 * KIB, pattern: str = "random", backend: str = "auto", *,
                   requests: int = FILL_REQUESTS, sectors: int = FILL_SECTORS, disk: int = FILL_DISK,
                   forgotten: int = FORGOTTEN, seed: int = 1) -> FillRun:
    """``vms`` VMs, each ``blk64`` writing ``requests`` x ``sectors`` sectors in ``pattern`` into its own overlay
    over one shared base, in a datastore with ``room`` bytes free when they start.

    The datastore also holds a stopped VM's forgotten snapshot (a raw disk and a delta holding
    ``forgotten`` bytes).  A VM whose write does not fit pauses (:mod:`labkit.virtio.blk`); once every
    VM still running is paused, the operator frees space: first they commit the forgotten snapshot into its
    disk (vSphere's "delete snapshot"), then they raise the capacity by what every unfinished VM's delta may
    still need; after each action the paused VMs run again (a retry refused again pauses again).
    """
    from labkit.backend import choose_backend
    from labkit.vmm.status import StatusKind

    if isinstance(vms, bool) or not isinstance(vms, int) or not 1 <= vms <= 8:
        raise ConfigError(f"the fill experiment runs 1 to 8 VMs, not {vms!r}")
    if isinstance(room, bool) or not isinstance(room, int) or room < 0:
        raise ConfigError(f"the free space at the start is a number of bytes >= 0, not {room!r}")
    blk64_parameters(pattern, sectors, requests, seed)  # the one clear error for a bad pattern or count
    backend = choose_backend(backend).name
    capacity_sectors = disk // SECTOR_SIZE
    names = [f"vm{number + 1}" for number in range(vms)]
    folder = tempfile.mkdtemp(prefix="labkit-09-lun-")
    try:
        store = Datastore(folder, capacity=1 << 40)
        store.create_raw("base.raw", disk)
        for name in names:
            store.create_overlay(f"{name}.qcow2", "base.raw", cluster_size=CLUSTER)
        if isinstance(forgotten, bool) or not isinstance(forgotten, int) or not 0 < forgotten <= 64 << 20 \
                or forgotten % CLUSTER:
            raise ConfigError(f"the forgotten snapshot holds whole {CLUSTER}-byte clusters, up to 64 MiB, not {forgotten!r}")
        store.create_raw("stopped.raw", forgotten)
        store.create_overlay("stopped-snapshot.qcow2", "stopped.raw", cluster_size=CLUSTER)
        snapshot = store.open("stopped-snapshot.qcow2")
        try:
            snapshot.write(0, bytes([0x5A]) * forgotten)
        finally:
            snapshot.close()
        capacity_start = store.used() + room
        store.set_capacity(capacity_start)
        operator = _Operator(names)
        events: list[FillEvent] = []
        samples: list[tuple[float, int, int]] = []
        records: dict[str, tuple[str, bool, int]] = {}
        started = time.monotonic()
        lock = threading.Lock()

        def event(vm: str, kind: str, detail: str = "") -> None:
            with lock:
                events.append(FillEvent(time.monotonic() - started, vm, kind, detail, store.used()))

        def run_vm(name: str) -> None:
            status, verified, pauses = "error", False, 0
            try:
                with _blk64_machine(backend, lambda: store.open(f"{name}.qcow2"), pattern, sectors, requests, seed) \
                        as machine:
                    while True:
                        generation = operator.generation
                        result = machine.run(timeout=RUN_TIMEOUT_S)
                        if result.status.kind is not StatusKind.PAUSED:
                            break
                        pauses += 1
                        event(name, "paused", result.status.message)
                        operator.set(name, "paused")
                        operator.wait_resume(name, generation)
                        event(name, "resumed")
                    status = result.status.kind.value
                    verified = (result.status.kind is StatusKind.EXITED and result.console == blk64_console(
                        pattern, sectors, requests, seed, capacity=capacity_sectors))
                    with lock:
                        origins.append(_origin(result, backend))
            except LabkitError as error:
                status = f"error: {error}"
            finally:
                records[name] = (status, verified, pauses)
                event(name, "finished", status)
                operator.set(name, "finished")

        origins: list[tuple[str, str | None]] = []
        threads = [threading.Thread(target=run_vm, args=(name,), daemon=True, name=f"labkit-09-{name}")
                   for name in names]
        for thread in threads:
            thread.start()
        actions = ["commit", "raise"]
        with operator.condition:
            while not all(s == "finished" for s in operator.state.values()):
                operator.condition.wait(0.005)
                samples.append((time.monotonic() - started, store.used(), store.capacity))
                if not operator.all_stuck():
                    continue
                action = actions.pop(0) if actions else "raise"
                if action == "commit":
                    freed = store.used()
                    store.commit("stopped-snapshot.qcow2")
                    freed -= store.used()
                    event("operator", "committed", f"committed the stopped VM's snapshot, freeing {freed // KIB} KiB")
                else:
                    unfinished = sum(1 for s in operator.state.values() if s != "finished")
                    store.set_capacity(store.capacity + unfinished * (disk + 16 * CLUSTER))
                    event("operator", "raised", f"raised the capacity to {store.capacity // KIB} KiB")
                operator.generation += 1
                operator.condition.notify_all()
        for thread in threads:
            thread.join()
        seconds = time.monotonic() - started
        samples.append((seconds, store.used(), store.capacity))
        vm_records = []
        for name in names:
            status, verified, pauses = records[name]
            path = store.file(f"{name}.qcow2")
            written = _written_sectors(pattern, requests, sectors, seed, capacity_sectors)
            vm_records.append(VmRecord(name, status, verified, _lost(path, written, seed), check_image(path).exit_code == 0,
                                       pauses, os.path.getsize(path)))
        found_backend, flavour = origins[0] if origins else (backend, None)
        return FillRun(pattern, room, found_backend, flavour, tuple(vm_records), tuple(sorted(events, key=lambda e: e.t)),
                       tuple(samples), capacity_start, seconds)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def fill_figure(run: FillRun) -> Figure:
    """Top: the datastore's bytes in use and its capacity over time, the operator's actions marked. Bottom: each
    VM running or paused."""
    with readable_fonts():
        figure = new_figure(7.5, 4.0 + 0.35 * len(run.vms))
        top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1 + 0.4 * len(run.vms)])
        times = [s[0] for s in run.samples]
        top.plot(times, [s[1] / KIB for s in run.samples], color="#1f77b4", label="in use")
        top.step(times, [s[2] / KIB for s in run.samples], where="post", color="black", linestyle="--",
                 label="capacity")
        styles = {"committed": ("#9467bd", "snapshot committed"), "raised": ("#ff7f0e", "capacity raised")}
        shown: set[str] = set()
        for action in run.actions():
            colour, label = styles[action.kind]
            top.axvline(action.t, color=colour, linestyle=":", linewidth=2,
                        label=None if action.kind in shown else label)
            shown.add(action.kind)
        top.set_ylabel("datastore (KiB)")
        top.set_title(f"{len(run.vms)} VMs, {run.pattern} writes, {run.room // KIB} KiB free at the start\n{run.label}")
        top.legend(loc="lower right")
        for row, vm in enumerate(run.vms):
            mine = [e for e in run.events if e.vm == vm.name]
            end = next((e.t for e in mine if e.kind == "finished"), run.seconds)
            bottom.broken_barh([(0, end)], (row - 0.35, 0.7), color="#2ca02c")
            paused_at = None
            for item in mine:
                if item.kind == "paused":
                    paused_at = item.t
                elif item.kind in ("resumed", "finished") and paused_at is not None:
                    bottom.broken_barh([(paused_at, max(item.t - paused_at, run.seconds / 400))], (row - 0.35, 0.7),
                                       color="#d62728")
                    paused_at = None
        bottom.set_yticks(range(len(run.vms)), [vm.name for vm in run.vms])
        bottom.set_ylim(-0.6, len(run.vms) - 0.4)
        bottom.invert_yaxis()
        bottom.set_xlabel("time since the VMs started (s)")
        bottom.set_title("green: running, red: paused (datastore full)")
        for ax in (top, bottom):
            finish(ax)
    return figure
