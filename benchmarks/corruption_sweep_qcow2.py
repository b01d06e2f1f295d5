"""Every single-byte flip in the header and tables, and every truncation, of two reference overlays
(issue 13: "reported by labkit disk check (exit 2) or refused on open with a clear error, never read
as wrong data").

The references (tests/storage/corruption.py): 1 MiB overlays with 4 KiB clusters over a raw base,
one written by labkit, one by qemu-io with the same writes. Flips: every byte of the header cluster,
the refcount table, the refcount blocks, the L1 table and the L2 tables, XORed with 0xFF (other
masks with ``--mask``). Truncations: every length from the file's length down to 0 (``--step`` to
thin it). Each outcome: refused on open, ``check`` (exit 2), ``same`` (reads the reference's data),
or WRONG (a failure). tests/storage/test_corruption.py runs a sample.

    python benchmarks/corruption_sweep_qcow2.py [--step 1] [--mask 0xff ...] [--no-truncations] [--results FILE]

With ``--mask 0x01`` the flips of bit 0 of each L2 entry read wrong data that no checker can see: it is
the zero flag, and a zero cluster (with or without its host cluster) is a valid state that QEMU writes too;
qcow2 has no checksums (results/corruption_sweep_qcow2_mask01.json: exactly those 256 entries per
reference, every other flip refused or harmless). The issue's byte flip (0xff) always sets reserved bits
there as well, and is refused.

Results go to benchmarks/results/corruption_sweep_qcow2.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "storage"))

from corruption import describe, flip, judge, make_references, table_offsets  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "corruption_sweep_qcow2.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", type=int, default=1, help="truncate at every STEP-th length")
    parser.add_argument("--mask", type=lambda text: int(text, 0), action="append",
                        help="XOR each byte with MASK (repeatable; default 0xff)")
    parser.add_argument("--no-truncations", action="store_true")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="corruption_"))
    start = time.monotonic()
    results: dict[str, object] = {"host": platform.node(), "load_average": os.getloadavg()}
    failures: list[str] = []
    try:
        for reference in make_references(folder):
            name = reference.path.name
            for mask in args.mask or [0xFF]:
                outcomes: collections.Counter[str] = collections.Counter()
                for offset in table_offsets(reference):
                    outcome = flip(reference, folder / "work.qcow2", offset, mask)
                    outcomes["WRONG" if outcome.startswith("WRONG") else outcome] += 1
                    if outcome.startswith("WRONG"):
                        failures.append(f"{describe(reference, offset)} ^ {mask:#x}: {outcome}")
                results[f"{name} flips ^{mask:#04x}"] = dict(outcomes)
                print(f"{name} flips ^{mask:#04x}: {dict(outcomes)} ({time.monotonic() - start:.0f} s)", flush=True)
            if args.no_truncations:
                continue
            outcomes = collections.Counter()
            work = folder / "work.qcow2"
            shutil.copyfile(reference.path, work)
            for length in range(os.path.getsize(reference.path) - 1, -1, -args.step):
                os.truncate(work, length)  # shorter and shorter: one copy for the whole sweep
                outcome = judge(work, reference.data)
                outcomes[outcome if outcome in ("refused", "check") else "WRONG"] += 1
                if outcome not in ("refused", "check"):
                    failures.append(f"{name} truncated to {length}: {outcome}")
            results[f"{name} truncations"] = dict(outcomes)
            print(f"{name} truncations: {dict(outcomes)} ({time.monotonic() - start:.0f} s)", flush=True)
    finally:
        shutil.rmtree(folder)
    results["seconds"] = time.monotonic() - start
    results["failures"] = failures[:100]
    results["failure_count"] = len(failures)
    Path(args.results).parent.mkdir(exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=2) + "\n")
    print(f"{len(failures)} failures in {results['seconds']:.0f} s")
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
