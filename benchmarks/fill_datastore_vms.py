"""Notebook 09's fill experiment, many times: several VMs fill one datastore, pause, and resume as space is freed.

Each run is :func:`labkit.viz.disks.fill_datastore` (the notebook's panel): 1-4 VMs (linked clones), each
``blk64`` writing into its own 4 KiB-cluster qcow2 delta, in a datastore with 0-256 KiB free; once every
running VM is paused the operator commits a forgotten snapshot, then raises the capacity.  A run passes when
every VM exited having read back everything it wrote (its checksum), no acknowledged sector is missing from its
delta, every delta checks clean, and every pause was followed by a resume.  Runs alternate between the backends
(KVM where /dev/kvm is usable, and the emulator) and vary the VMs, the free space, the pattern and the seed.

    python benchmarks/fill_datastore_vms.py [--runs 100]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from labkit.viz.disks import KIB, fill_datastore  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "fill_datastore_vms.json"))
    args = parser.parse_args()
    backends = ["kvm", "emu"] if os.access("/dev/kvm", os.R_OK | os.W_OK) else ["emu"]
    patterns = ["random", "random", "sequential", "rewrite"]
    outcomes = {"runs": 0, "failed": 0, "vms": 0, "pauses": 0, "resumed": 0, "lost_sectors": 0, "failures": []}
    started = time.perf_counter()
    for run in range(args.runs):
        backend = backends[run % len(backends)]
        vms, room, pattern = 1 + run % 4, (run % 5) * 64 * KIB, patterns[run % len(patterns)]
        try:
            fill = fill_datastore(vms, room, pattern, backend, seed=run + 1)
        except Exception as error:  # noqa: BLE001 - counted and reported, the sweep goes on
            outcomes["failed"] += 1
            outcomes["failures"].append(f"run {run} ({backend}): {type(error).__name__}: {error}")
            continue
        finally:
            outcomes["runs"] += 1
        resumed = sum(1 for event in fill.events if event.kind == "resumed")
        bad = [vm for vm in fill.vms if vm.status != "exited" or not vm.verified or vm.lost_sectors or not vm.clean]
        outcomes["vms"] += len(fill.vms)
        outcomes["pauses"] += fill.pauses
        outcomes["resumed"] += resumed
        outcomes["lost_sectors"] += sum(vm.lost_sectors for vm in fill.vms)
        if bad or resumed != fill.pauses:
            outcomes["failed"] += 1
            outcomes["failures"].append(f"run {run} ({backend}, {vms} VMs, {room // KIB} KiB, {pattern}): "
                                        f"{bad}, {fill.pauses} pauses, {resumed} resumed")
    outcomes["seconds"] = round(time.perf_counter() - started, 1)
    outcomes["backends"] = backends
    print(json.dumps(outcomes, indent=1))
    Path(args.results).write_text(json.dumps(outcomes, indent=1) + "\n")
    sys.exit(1 if outcomes["failed"] else 0)


if __name__ == "__main__":
    main()
