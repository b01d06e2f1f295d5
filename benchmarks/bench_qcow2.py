"""qcow2 speed through labkit's storage layer, as ratios measured in one run (issue 13).

1. Sequential 1 MiB writes into a fresh overlay (64 KiB clusters, over a raw base): labkit's
   ``Qcow2Image.write`` against ``qemu-io -c 'write ...'`` into an overlay made the same way on the
   same file system, in the same run. labkit is measured with ``barriers=True`` (its default: an
   ``fdatasync`` before L2/L1 entries point at new clusters) and ``barriers=False`` (ordered writes
   only, safe against a crash of the process, not against power loss); qemu-io with ``-t writeback``
   (metadata cached, flushed at the end: the ratio's baseline, the faster of the two) and with its
   default ``-t writethrough`` (a flush after every write). Each side ends with a flush, inside the time.
   Target (issue 13, for the storage layer; the block device path comes later): >= 25%.
2. Reads of the whole disk in 1 MiB pieces through a chain of 8 overlays against the same reads from
   one overlay holding all the data: with the data in the bottom overlay and 7 empty ones above it, and
   with the data spread (overlay k holds every 8th cluster from k: a 1 MiB read visits every depth).
   Target <= 2x.

    python benchmarks/bench_qcow2.py [--mib 256] [--rounds 3]

Results go to benchmarks/results/qcow2.json. The medians of the rounds are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from labkit.storage import RawImage, create_overlay, open_image

RESULTS = Path(__file__).parent / "results" / "qcow2.json"
MIB = 1 << 20


def labkit_write(folder: Path, mib: int, barriers: bool) -> float:
    """Seconds for ``mib`` sequential 1 MiB writes plus a flush into a fresh labkit overlay."""
    path = folder / "labkit.qcow2"
    if path.exists():
        path.unlink()
    create_overlay(path, folder / "base.raw")
    image = open_image(path, writable=True, barriers=barriers)
    data = os.urandom(MIB)
    start = time.perf_counter()
    for i in range(mib):
        image.write(i * MIB, data)
    image.flush()
    elapsed = time.perf_counter() - start
    image.close()
    return elapsed


def qemu_write(folder: Path, mib: int, cache: str) -> float:
    """Seconds qemu-io takes for the same writes (``write -P`` of 1 MiB each, then ``flush``), less its start-up."""
    path = folder / "qemu.qcow2"
    if path.exists():
        path.unlink()
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(path)], check=True,
                   capture_output=True)
    args = ["qemu-io", "-t", cache, "-f", "qcow2"]
    for i in range(mib):
        args += ["-c", f"write -P {i % 250 + 1} {i * MIB} {MIB}"]
    args += ["-c", "flush"]
    start = time.perf_counter()
    subprocess.run([*args, str(path)], check=True, capture_output=True)
    whole = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "flush", str(path)], check=True, capture_output=True)
    startup = time.perf_counter() - start  # qemu-io's own start and exit, taken out of its time
    return max(whole - startup, 1e-9)


def chain_reads(folder: Path, mib: int) -> tuple[float, float, float]:
    """Seconds to read the whole disk: from the one overlay holding all the data; through 7 empty overlays
    above it; and through a chain of 8 overlays each holding every 8th cluster (reads go to every depth)."""
    for old in folder.glob("chain*.qcow2"):
        old.unlink()
    data = os.urandom(MIB)
    create_overlay(folder / "chain0.qcow2", folder / "base.raw")
    with open_image(folder / "chain0.qcow2", writable=True) as image:  # type: ignore[attr-defined]
        for i in range(mib):
            image.write(i * MIB, data)
    below = folder / "chain0.qcow2"
    for depth in range(1, 8):
        create_overlay(folder / f"chain{depth}.qcow2", below)
        below = folder / f"chain{depth}.qcow2"
    below = folder / "base.raw"
    for depth in range(8):
        create_overlay(folder / f"chainspread{depth}.qcow2", below)
        below = folder / f"chainspread{depth}.qcow2"
        with open_image(below, writable=True) as image:  # type: ignore[attr-defined]
            for cluster in range(depth, mib * 16, 8):
                image.write(cluster * 65536, data[:65536])

    def read_all(path: Path) -> float:
        image = open_image(path)
        start = time.perf_counter()
        for i in range(mib):
            image.read(i * MIB, MIB)
        elapsed = time.perf_counter() - start
        image.close()
        return elapsed

    read_all(folder / "chain0.qcow2")  # page cache warm for all
    read_all(folder / "chainspread7.qcow2")
    return (read_all(folder / "chain0.qcow2"), read_all(folder / "chain7.qcow2"),
            read_all(folder / "chainspread7.qcow2"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="MiB written and read per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="folder on the file system to measure (default: a temp dir)")
    args = parser.parse_args()
    if shutil.which("qemu-io") is None:
        raise SystemExit("qemu-io is missing: install Debian's qemu-utils (scripts/setup test does)")
    folder = Path(tempfile.mkdtemp(prefix="bench_qcow2_", dir=args.dir))
    try:
        RawImage.create(folder / "base.raw", args.mib * MIB).close()
        rows: dict[str, list[float]] = {"labkit_barriers": [], "labkit_ordered": [], "qemu_io": [],
                                        "qemu_io_writethrough": [], "single": [], "chain8": [], "chain8_spread": []}
        for _ in range(args.rounds):  # interleaved rounds
            rows["qemu_io"].append(qemu_write(folder, args.mib, "writeback"))
            rows["qemu_io_writethrough"].append(qemu_write(folder, args.mib, "writethrough"))
            rows["labkit_barriers"].append(labkit_write(folder, args.mib, barriers=True))
            rows["labkit_ordered"].append(labkit_write(folder, args.mib, barriers=False))
            single, chain, spread = chain_reads(folder, args.mib)
            rows["single"].append(single)
            rows["chain8"].append(chain)
            rows["chain8_spread"].append(spread)
        median = {k: statistics.median(v) for k, v in rows.items()}
        rate = {k: args.mib / median[k] for k in ("qemu_io", "qemu_io_writethrough", "labkit_barriers",
                                                  "labkit_ordered")}
        results = {
            "host": platform.node(), "load_average": os.getloadavg(),
            "file_system": subprocess.run(["stat", "-f", "-c", "%T", str(folder)], capture_output=True,
                                          text=True).stdout.strip(),
            "qemu_io": re.sub(r"\s+", " ", subprocess.run(["qemu-io", "--version"], capture_output=True,
                                                          text=True).stdout.splitlines()[0]),
            "mib": args.mib, "rounds": args.rounds, "seconds": rows,
            "write_mib_per_s": rate,
            "write_ratio_barriers": rate["labkit_barriers"] / rate["qemu_io"],
            "write_ratio_ordered": rate["labkit_ordered"] / rate["qemu_io"],
            "read_chain8_over_single": median["chain8"] / median["single"],
            "read_chain8_spread_over_single": median["chain8_spread"] / median["single"],
        }
    finally:
        shutil.rmtree(folder)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"sequential 1 MiB writes: qemu-io {rate['qemu_io']:.0f} MiB/s (writeback; writethrough "
          f"{rate['qemu_io_writethrough']:.0f}), labkit {rate['labkit_barriers']:.0f} MiB/s "
          f"with barriers ({results['write_ratio_barriers']:.0%}), {rate['labkit_ordered']:.0f} MiB/s ordered only "
          f"({results['write_ratio_ordered']:.0%}); target >= 25%")
    print(f"reads through 8 overlays / one overlay: {results['read_chain8_over_single']:.2f}x (data at the bottom), "
          f"{results['read_chain8_spread_over_single']:.2f}x (every 8th cluster at each depth); target <= 2x")


if __name__ == "__main__":
    main()
