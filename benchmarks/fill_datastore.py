"""100 runs that fill a datastore through the virtio block device: nothing acknowledged lost, every pause resumed.

Each run (``tests/machine/test_virtio_blk.py``'s ``fill_and_resume``, which the test runs once per backend):
``blk64`` writes 48 clusters sequentially into a qcow2 overlay (4 KiB clusters) on a datastore with room for
about eight, plus four 64 KiB filler files; each time the VM pauses on the full datastore (status ``paused``,
the message naming the disk), one filler is deleted and the VM is run again, until the guest has read back
and verified everything; then the overlay is opened and every sector checked.  Runs alternate between the
backends (KVM where /dev/kvm is usable, and the emulator) and vary the seed.

    python benchmarks/fill_datastore.py [--runs 100]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "machine")]

from test_virtio_blk import fill_and_resume  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "fill_datastore.json"))
    args = parser.parse_args()
    backends = ["kvm", "emu"] if os.access("/dev/kvm", os.R_OK | os.W_OK) else ["emu"]
    outcomes = {"runs": 0, "failed": 0, "pauses": 0, "resumed": 0, "failures": []}
    started = time.perf_counter()
    for run in range(args.runs):
        backend = backends[run % len(backends)]
        with tempfile.TemporaryDirectory(prefix="labkit-fill-") as tmp:
            try:
                messages = fill_and_resume(backend, Path(tmp) / "lun", seed=run + 1)
            except Exception as error:  # noqa: BLE001 - counted and reported, the sweep goes on
                outcomes["failed"] += 1
                outcomes["failures"].append(f"run {run} ({backend}): {type(error).__name__}: {error}")
            else:
                outcomes["pauses"] += len(messages)
                outcomes["resumed"] += len(messages)  # fill_and_resume ends only when the guest verified all
        outcomes["runs"] += 1
    outcomes["seconds"] = round(time.perf_counter() - started, 1)
    outcomes["backends"] = backends
    print(json.dumps(outcomes, indent=1))
    Path(args.results).write_text(json.dumps(outcomes, indent=1) + "\n")
    sys.exit(1 if outcomes["failed"] else 0)


if __name__ == "__main__":
    main()
