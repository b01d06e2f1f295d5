"""N random virtio-blk requests and chains against the block device (tests/unit/test_virtio_blk_requests.py's fuzz, which runs 100).

Each case: a fresh device over 2 MiB of host RAM and a 32 KiB in-memory disk, one random request (random type,
sector near the capacity or near 2**64, length, buffer address inside, across or outside RAM, data on either
side) or a random chain of 1-4 descriptors with random flags, lengths, addresses and next indexes, a random avail
idx step; then one notification.  Checked: nothing raised, every changed RAM byte lies in a device-writable buffer
a descriptor names or the used ring, the disk changed only within the one write's sectors, a reset comes with a
reason.  ``python benchmarks/fuzz_blk.py [--cases 10000]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "unit")]

import test_virtio_blk_requests as test_virtio_blk  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    args = parser.parse_args()
    test_virtio_blk.CASES = args.cases
    started = time.perf_counter()
    test_virtio_blk.test_hostile_requests_and_rings_leave_the_host_ram_and_disk_as_they_must()  # raises on a problem
    print(f"{args.cases} cases, 0 problems, {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
