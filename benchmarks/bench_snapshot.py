"""Snapshot costs against their baselines (issue 12), ratios from one run.

- **Full snapshot + restore of a 64 MiB guest** (``Machine.snapshot()`` then
  ``Machine.restore`` into a machine made beforehand) against one 64 MiB ``memcpy``
  (``ctypes.memmove``) in the same process.  Target: at most 2x.  Measured twice: for
  hello64 stopped at its first exit, as the guest left its RAM (a few pages hold data, the
  rest was never written; the snapshot copies only pages that hold data), and ``filled``:
  the same machine after the host wrote every page from 1 MiB up, so the snapshot must copy
  all of it.  The filled row is the target's honest reading.  A snapshot's one copy goes
  into new memory (a memfd the kernel fills without zeroing or page faults); its floor, one
  64 MiB ``pwrite`` into a new memfd, is reported beside a memcpy into touched memory and one
  into fresh memory.  On KVM the restore maps the snapshot copy-on-write, so its cost moves
  into the guest's first writes: ``first_writes_after_restore_ms`` runs memtouch64 over
  every page from 1 MiB up once in a machine restored that way and in one restored by
  copying, and reports the difference (on the emulator both restores copy: its worker's RAM is
  a file the caller reads, so it is never mapped copy-on-write, and the difference is noise).
- **A diff with about 1,024 dirty pages** (memtouch64 rewriting 1,024 pages once) against a
  full snapshot of the same 64 MiB machine, its RAM filled first (a diff saves copying the
  RAM that holds data, so the full snapshot it is measured against must hold some).
  Target: at most 10%.
- **What the emulator's write tracking costs a compute-bound guest** (compute64, ring 3, summing
  the Collatz steps of 1..100,000: about 0.25 s on the emulator; its default 1..10,000 computes for
  20 ms, in which tracking's one-time cost, about 2 ms of faults and retranslation after the
  snapshot, reads as 10% of a rate it does not slow), after a snapshot started tracking, against
  the same guest without tracking, interleaved.  Target: at most 10% of its instruction rate.  memtouch64 (a write-heavy guest) is reported
  beside it.

Each measurement is the median of ``--rounds`` interleaved rounds.  KVM rows are skipped
(and say so) where ``/dev/kvm`` is not usable.  Writes ``benchmarks/results/snapshot.json``.

    python benchmarks/bench_snapshot.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import platform
import statistics
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from labkit import Machine, Snapshot  # noqa: E402
from labkit.backend import kvm_problem  # noqa: E402
from labkit.viz.snapshots import fill_memory  # noqa: E402

MIB = 1 << 20
FILL_FROM = 1 * MIB
RESULTS = ROOT / "benchmarks" / "results" / "snapshot.json"
COMPUTE_LIMIT = 100_000
"""compute64's N (its parameter block): long enough that tracking's one-time cost is not read as a rate."""


def memcpy_seconds(size: int, fresh: bool = False) -> float:
    """One ``size``-byte memcpy into memory already touched, or (``fresh``) into memory just allocated,
    whose pages fault in as they are written (what any copy a snapshot keeps must pay)."""
    source = ctypes.create_string_buffer(size)
    ctypes.memset(source, 1, size)
    target = None if fresh else ctypes.create_string_buffer(size)
    if target is not None:
        ctypes.memmove(target, source, size)
    started = time.perf_counter()
    if target is None:
        target = ctypes.create_string_buffer(size)  # calloc of fresh pages; the memmove faults them in
    ctypes.memmove(target, source, size)
    return time.perf_counter() - started


def memfd_write_seconds(size: int) -> float:
    """One ``size``-byte ``pwrite`` from touched memory into a new memfd: the floor of the one copy a full
    snapshot makes (the kernel allocates each page of the file, without zeroing it or a page fault)."""
    source = ctypes.create_string_buffer(size)
    ctypes.memset(source, 1, size)
    started = time.perf_counter()
    fd = os.memfd_create("bench-snapshot")
    try:
        os.ftruncate(fd, size)
        view, done = memoryview(source).cast("B"), 0
        while done < size:
            done += os.pwrite(fd, view[done:], done)
        return time.perf_counter() - started
    finally:
        os.close(fd)


def fill(machine: Machine, size: int) -> None:
    """Every page of RAM from 1 MiB up written with bytes of its own (notebook 08's ``fill_memory``)."""
    fill_memory(machine, FILL_FROM)


def snapshot_restore_seconds(backend: str, size: int, filled: bool = False) -> tuple[float, float]:
    """(snapshot, restore) seconds for a ``size``-byte hello64 machine stopped at its first exit; ``filled``:
    with all of its RAM from 1 MiB up written first (:func:`fill`), else as the guest left it (sparse)."""
    with Machine("hello64", backend=backend, memory=size) as machine, \
            Machine("hello64", backend=backend, memory=size) as target:
        steps = machine.steps()
        next(steps)
        steps.close()
        if filled:
            fill(machine, size)
        started = time.perf_counter()
        snapshot = machine.snapshot()
        taken = time.perf_counter()
        target.restore(snapshot)
        return taken - started, time.perf_counter() - taken


def diff_and_full_seconds(backend: str, size: int, pages: int) -> tuple[float, float, int]:
    """Seconds for a diff after memtouch64 rewrote ``pages`` pages once, and for a full snapshot then
    (of all of its RAM filled first: :func:`fill`)."""
    with Machine("memtouch64", backend=backend, memory=size) as machine:
        fill(machine, size)
        machine.write_memory(0x80000, struct.pack("<QQQ", pages, 1 << 40, 0))
        first = machine.snapshot()
        machine.run(timeout=0.05)  # rewrites its pages many times over: each is dirty once
        started = time.perf_counter()
        diff = machine.snapshot(parent=first)
        diff_s = time.perf_counter() - started
        started = time.perf_counter()
        machine.snapshot()
        return diff_s, time.perf_counter() - started, len(diff.diff.pages) if diff.diff else 0


def first_writes_seconds(backend: str, size: int, mapped_first: bool = True) -> tuple[float, float, float, float]:
    """Run time of memtouch64 writing every page of RAM from 1 MiB up once (then summing them) in a machine
    restored from a snapshot of it (on KVM its RAM is the snapshot's image mapped copy-on-write, so each
    first write copies a page) and in one restored from the same state with its RAM as bytes (copied
    whole at restore, the pages already there): what the cheap restore moves into the guest's run.  Returns
    the two runs' seconds, then the two restores'."""
    with Machine("memtouch64", backend=backend, memory=size) as source:
        fill(source, size)
        source.write_memory(0x80000, struct.pack("<QQQ", (size - FILL_FROM) >> 12, 1, 0))
        snapshot = source.snapshot()
    state = snapshot.state
    copied = Snapshot(dataclasses.replace(state, regions=tuple(dataclasses.replace(region, data=bytes(region.data))
                                                               for region in state.regions)))
    runs, restores = {}, {}
    for name in (("mapped", "copied") if mapped_first else ("copied", "mapped")):
        with Machine(snapshot.guest(), backend=backend, memory=size) as machine:
            started = time.perf_counter()
            machine.restore(snapshot if name == "mapped" else copied)
            restores[name] = time.perf_counter() - started
            runs[name] = machine.run(timeout=60)
    mapped_run, copied_run = runs["mapped"], runs["copied"]
    if mapped_run.console != copied_run.console or not mapped_run.console.startswith("memtouch: "):
        raise SystemExit(f"restored runs differ: {mapped_run.console!r} against {copied_run.console!r}")
    return mapped_run.elapsed_s, copied_run.elapsed_s, restores["mapped"], restores["copied"]


def tracked_run_seconds(guest: str, tracking: bool, parameters: bytes = b"") -> float:
    with Machine(guest, backend="emu") as machine:
        if parameters:
            machine.write_memory(0x80000, parameters)
        if tracking:
            machine.snapshot()
        result = machine.run(timeout=60)
        return result.elapsed_s


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    size = 64 * MIB
    report: dict = {"machine": platform.platform(), "python": platform.python_version(), "rounds": args.rounds}
    backends = ["emu"] + ([] if kvm_problem() else ["kvm"])
    if "kvm" not in backends:
        report["kvm"] = f"skipped: {kvm_problem()}"
    memcpy = median([memcpy_seconds(size) for _ in range(args.rounds)])
    fresh = median([memcpy_seconds(size, fresh=True) for _ in range(args.rounds)])
    report["memcpy_64mib_ms"] = memcpy * 1e3
    report["memcpy_64mib_into_fresh_memory_ms"] = fresh * 1e3
    report["pwrite_64mib_into_fresh_memfd_ms"] = median([memfd_write_seconds(size) for _ in range(args.rounds)]) * 1e3
    for backend in backends:
        pairs = [snapshot_restore_seconds(backend, size) for _ in range(args.rounds)]
        snap, restore = median([p[0] for p in pairs]), median([p[1] for p in pairs])
        filled = [snapshot_restore_seconds(backend, size, filled=True) for _ in range(args.rounds)]
        filled_snap, filled_restore = median([p[0] for p in filled]), median([p[1] for p in filled])
        diffs = [diff_and_full_seconds(backend, size, 1024) for _ in range(args.rounds)]
        diff_s, full_s = median([d[0] for d in diffs]), median([d[1] for d in diffs])
        writes = [first_writes_seconds(backend, size, mapped_first=index % 2 == 0) for index in range(args.rounds)]
        mapped_s, copied_s = median([w[0] for w in writes]), median([w[1] for w in writes])
        mapped_restore_s, copied_restore_s = median([w[2] for w in writes]), median([w[3] for w in writes])
        report[backend] = {
            "filled": {
                "snapshot_ms": filled_snap * 1e3, "restore_ms": filled_restore * 1e3,
                "snapshot_plus_restore_over_memcpy": (filled_snap + filled_restore) / memcpy,
                "snapshot_plus_restore_over_fresh_memcpy": (filled_snap + filled_restore) / fresh,
            },
            "first_writes_after_restore_ms": {"restore_maps_copy_on_write": backend == "kvm",
                                              "restored_from_the_image": mapped_s * 1e3,
                                              "restored_from_bytes": copied_s * 1e3,
                                              "moved_into_the_run": (mapped_s - copied_s) * 1e3,
                                              "restore_from_the_image": mapped_restore_s * 1e3,
                                              "restore_from_bytes": copied_restore_s * 1e3},
            "snapshot_ms": snap * 1e3, "restore_ms": restore * 1e3,
            "snapshot_plus_restore_over_memcpy": (snap + restore) / memcpy,
            "snapshot_plus_restore_over_fresh_memcpy": (snap + restore) / fresh,
            "diff_pages": max(d[2] for d in diffs), "diff_ms": diff_s * 1e3, "full_ms": full_s * 1e3,
            "diff_over_full": diff_s / full_s,
        }
    compute_on, compute_off, touch_on, touch_off = [], [], [], []
    touch = struct.pack("<QQQ", 256, 400, 0)
    compute = struct.pack("<Q", COMPUTE_LIMIT)
    for _ in range(args.rounds):
        compute_off.append(tracked_run_seconds("compute64", False, compute))
        compute_on.append(tracked_run_seconds("compute64", True, compute))
        touch_off.append(tracked_run_seconds("memtouch64", False, touch))
        touch_on.append(tracked_run_seconds("memtouch64", True, touch))
    report["emu_write_tracking"] = {
        "compute64_limit": COMPUTE_LIMIT,
        "compute64_ms": {"off": median(compute_off) * 1e3, "on": median(compute_on) * 1e3},
        "compute64_cost": median(compute_on) / median(compute_off) - 1,
        "memtouch64_ms": {"off": median(touch_off) * 1e3, "on": median(touch_on) * 1e3},
        "memtouch64_cost": median(touch_on) / median(touch_off) - 1,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
